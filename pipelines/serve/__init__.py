"""Serving: the OpenAI-style HTTP API, the web chat page, and its scale-out on Ray Serve."""
