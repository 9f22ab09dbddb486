"""Ingest: normalise each source's metadata."""
