"""recsys: vector-search recommendations on Azure Functions over PostgreSQL with pgvector."""

__version__ = "0.1.0"
