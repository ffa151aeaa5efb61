-- pgvector provides the vector and halfvec types and the HNSW index.
CREATE EXTENSION IF NOT EXISTS vector;
