"""The Parquet shard format: schema and metadata, the atomic writer, the preprocess filling it."""
