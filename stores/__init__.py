"""Every on-disk format and the storage layout: workspace, ledger, Parquet, FAISS, DuckDB, checkpoints."""
