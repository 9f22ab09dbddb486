"""ImageBind-LLM: LLaMA with the bind network, gated injection, cache, generation and converters."""
