"""Infer: answers about any mix of inputs, with the cache."""
