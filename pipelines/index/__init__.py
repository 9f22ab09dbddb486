"""Index: the visual cache over a feature set."""
