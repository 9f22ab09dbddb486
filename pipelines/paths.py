"""Local paths of a configuration: made absolute once at load time, and checked before a stage runs."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pipelines.errors import STORAGE_ERRNOS, InputError

if TYPE_CHECKING:
    from pipelines.config import Config

# The model settings that name files or folders loaded by a stage.
MODEL_PATHS = (
    "imagebind_checkpoint",
    "imagebind_vocab",
    "point_checkpoint",
    "llama_path",
    "tokenizer_path",
    "adapter_checkpoint",
)
ENCODER_PATHS = ("imagebind_checkpoint", "imagebind_vocab")


class WorkspaceError(ValueError):
    """The workspace cannot be used (not creatable, not a folder); the message names it with its absolute path."""


def is_url(value: str) -> bool:
    """True for an fsspec URL (`s3://...`, `file://...`), which is kept as written."""
    return "://" in value


def absolute(value: str) -> str:
    """A local path as an absolute one (against the current directory, `~` expanded); URLs unchanged.

    Ray Train workers, Ray tasks, img2dataset's processes and Prefect workers may each run in another working
    directory, so every local path a configuration hands across a process boundary must be absolute.
    """
    if not value or is_url(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def absolute_paths(values: Iterable[str]) -> list[str]:
    """`absolute` of each value."""
    return [absolute(v) for v in values]


def check_workspace(cfg: Config) -> None:
    """Create a local workspace folder now; raise WorkspaceError naming `workspace` and the absolute path if it
    cannot be, or the storage's OSError (read-only, no permission, full) naming the folder."""
    root = cfg.workspace
    if is_url(root):
        return
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise OSError(e.errno, e.strerror, root) from None  # the storage's refusal (exit 5), naming the folder
        raise WorkspaceError(f"workspace: cannot create {root}: {e.strerror or e}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(root).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code), root)


def check_model_paths(cfg: Config, fields: Iterable[str] = MODEL_PATHS) -> None:
    """Raise InputError naming the setting and its absolute path for each configured local model path that is absent."""
    missing = []
    for name in fields:
        value = getattr(cfg.model, name)
        if value and not is_url(value) and not os.path.exists(value):
            missing.append(f"model.{name}: {value} does not exist")
    if missing:
        raise InputError("; ".join(missing))
