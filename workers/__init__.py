"""Training and measurement workers: torch, numpy and tokenizers only (never ray or duckdb)."""
