"""Errors the command line maps to exit codes, importable without pulling in torch or Ray."""

from __future__ import annotations

import errno
import os


class InputError(ValueError):
    """Bad input (a file, field or value) named in the message; nothing was overwritten."""


# The storage's refusals of a write (full, read-only, no permission): what a rerun with room or rights completes.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})


def folder_expected(what: str, path: str) -> str:
    """The message for a benchmark's folder given as `path`: not found, or a file where the folder goes."""
    if os.path.isfile(path):
        return f"{path} is a file: the {what} benchmark takes its folder (--data DIR)"
    return f"{what} folder not found: {path}"


class Diverged(RuntimeError):
    """A training step whose loss or gradient must not be applied (non-finite, or a spike): the run stops there."""

    def __init__(self, step: int, value: str, why: str) -> None:
        super().__init__(step, value, why)
        self.step, self.value, self.why = step, value, why

    def __str__(self) -> str:
        return f"diverged at step {self.step}: {self.value} ({self.why})"


class RunDiverged(Diverged):
    """A run that diverged, as its driver says it: the worker's message and what the run keeps."""

    def __str__(self) -> str:
        return f"{self.value}; {self.why}"
