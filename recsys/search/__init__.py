"""The query path: item lookups, similar items and recommendations over pgvector."""
