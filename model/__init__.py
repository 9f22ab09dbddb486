"""Torch models: ImageBind, the bind network, ImageBind-LLM, cache mixing, converters; no I/O formats."""
