"""Errors the command line maps to exit codes, importable without pulling in torch or Ray."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (a file, field or value) named in the message; nothing was overwritten."""
