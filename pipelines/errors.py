"""Errors the command line maps to exit codes, importable without pulling in torch or Ray."""

from __future__ import annotations

import errno


class InputError(ValueError):
    """Bad input (a file, field or value) named in the message; nothing was overwritten."""


# The storage's refusals of a write (full, read-only, no permission): what a rerun with room or rights completes.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})
