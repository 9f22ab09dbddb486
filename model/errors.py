"""The model layer's refusals of a file or input a user gave (importable without torch)."""

from __future__ import annotations


class ModelInputError(ValueError):
    """A weight file, tokenizer or media input that cannot be used; the message names it and says why."""
