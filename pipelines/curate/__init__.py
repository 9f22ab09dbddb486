"""Curate: filter each source into url lists."""
