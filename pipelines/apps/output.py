"""The applications' images: PNG bytes, written whole to a local path or an fsspec URL (the workspace's options)."""

from __future__ import annotations

import io
import posixpath
from typing import Any

from stores.workspace import Workspace


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _place(path: str, storage_options: dict[str, Any]) -> tuple[Workspace, str]:
    parent, name = posixpath.split(path)
    ws = Workspace(parent or ".", storage_options)
    return ws, ws.path(name)


def write_file(path: str, data: bytes, storage_options: dict[str, Any]) -> None:
    """Write one file atomically: a rename of a temporary file beside it locally, one PUT on object stores."""
    ws, where = _place(path, storage_options)
    ws.write_bytes(where, data)


def file_exists(path: str, storage_options: dict[str, Any]) -> bool:
    """True when the file is there."""
    ws, where = _place(path, storage_options)
    return ws.exists(where)
