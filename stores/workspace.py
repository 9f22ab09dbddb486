"""The workspace: one root (local path or fsspec URL) and the storage layout of every stage under it."""

from __future__ import annotations

import os
import posixpath
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stores.errors import StoreInputError

# The top-level folders of the layout: where a path recorded by an older ibllm (absolute, under the root the
# workspace had then) is found again in a copied or moved workspace.
LAYOUT = (
    "synthetic",
    "sources",
    "curated",
    "shards",
    "features",
    "index",
    "checkpoints",
    "reports",
    "ledger",
    "models",
    "registry",
    "instructions",
    "evaluations",
    "demo",
)


class OutsideWorkspace(StoreInputError):
    """A recorded or given path lies outside the workspace: it is never read or deleted from there."""


@dataclass
class Workspace:
    """Paths and file access under one root; `s3://bucket/run` and `/data/run` behave the same.

    Args:
        root: a local directory or an fsspec URL.
        storage_options: fsspec options (credentials, endpoint_url, ...).
    """

    root: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Other processes (Ray workers, img2dataset's) write here too: a cached listing would hide their files.
        fresh = {"use_listings_cache": False} if "://" in self.root and not self.root.startswith("file://") else {}
        self.fs, path = fsspec.core.url_to_fs(self.root, **fresh, **dict(self.storage_options))
        self.base = path.rstrip("/") or "/"
        if self.is_local and "://" not in self.root:
            self.root = self.base  # absolute: a Workspace handed to another process names the same folder there

    @property
    def is_local(self) -> bool:
        """True when renames are atomic (a local filesystem)."""
        return isinstance(self.fs, LocalFileSystem)

    def options_for(self, url: str) -> dict[str, Any]:
        """fsspec options for a URL outside the workspace: the workspace's own (its endpoint, credentials) when the
        URL is on the same kind of storage (s3://, gs://, ...), none otherwise."""
        protocol = url.partition("://")[0] if "://" in url else "file"
        mine = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return dict(self.storage_options) if protocol in mine and not self.is_local else {}

    def path(self, *parts: str) -> str:
        """A path inside the workspace, in the filesystem's own notation (no protocol)."""
        return posixpath.join(self.base, *parts)

    def url(self, *parts: str) -> str:
        """A path inside the workspace as a full URL that other tools (DuckDB, img2dataset) accept."""
        return self.as_url(self.path(*parts))

    def as_url(self, path: str) -> str:
        """A path of this filesystem (as `path()` and `glob()` give) as a URL other tools accept."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def relative(self, path: str) -> str:
        """A path of this filesystem inside the workspace as a path relative to its root (how records store it)."""
        norm = posixpath.normpath(path)
        if norm == self.base or not norm.startswith(self.base.rstrip("/") + "/"):
            raise OutsideWorkspace(f"{path} is not inside the workspace {self.root}")
        return norm[len(self.base.rstrip("/")) + 1 :]

    def inside(self, relative: str) -> str:
        """A path relative to the root (as records store it) as a path of this filesystem; refuses a way out."""
        rel = posixpath.normpath(relative)
        if posixpath.isabs(rel) or "://" in relative or rel in ("..", ".") or rel.startswith("../"):
            raise OutsideWorkspace(f"recorded path {relative!r} leads outside the workspace {self.root}")
        return self.path(rel)

    def resolve_legacy(self, recorded: str) -> str:
        """A full path an older ibllm recorded, as a path inside this workspace.

        Taken as it is when it lies inside; otherwise (the workspace was copied or moved since) found again under
        this root by its layout folder. A path with no copy inside raises OutsideWorkspace: it is never read or
        deleted where it points.
        """
        path = fsspec.core.url_to_fs(recorded)[1] if "://" in recorded else recorded
        norm = posixpath.normpath(path)
        if norm.startswith(self.base.rstrip("/") + "/"):
            return norm
        parts = norm.strip("/").split("/")
        for i, part in enumerate(parts[:-1]):
            if part in LAYOUT and ".." not in parts[i:]:
                candidate = self.path(*parts[i:])
                if self.exists(candidate):
                    return candidate
        raise OutsideWorkspace(
            f"recorded path {recorded} is outside the workspace {self.root} and has no copy inside it (the "
            "workspace was copied or moved from where an older ibllm wrote it); it is never read or deleted there: "
            "rerun the stage with --force to redo its output in this workspace"
        )

    def to_record(self, location: str) -> str:
        """How a record stores a location: relative to the root when it lies inside the workspace, else unchanged."""
        try:
            return self.relative(self.fs._strip_protocol(location))
        except OutsideWorkspace:
            return location

    def from_record(self, recorded: str) -> str:
        """A location a record stores (see `to_record`; older records: full paths) as a URL inside the workspace."""
        if posixpath.isabs(recorded) or "://" in recorded:
            return self.as_url(self.resolve_legacy(recorded))
        return self.as_url(self.inside(recorded))

    def locate(self, recorded: str) -> str:
        """A location a record names, for reading: relative ones from this root; a full path an older ibllm wrote as
        `resolve_legacy` finds it here; any other (a user's model, a remote source) unchanged."""
        if not (posixpath.isabs(recorded) or "://" in recorded):
            return self.as_url(self.inside(recorded))
        try:
            return self.as_url(self.resolve_legacy(recorded))
        except OutsideWorkspace:
            return recorded

    def portable(self, record: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """A record's fields with every location inside the workspace (a string, or the strings of a list) made
        relative to the root, and the names of the fields that hold them (for `placed`)."""
        out, keys = dict(record), []
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if values and all(isinstance(v, str) and self._within(v) for v in values):
                rel = [self.to_record(v) for v in values]
                out[key], keys = (rel if isinstance(value, list) else rel[0]), [*keys, key]
        return out, keys

    def placed(self, record: Mapping[str, Any], relative: list[str] | None) -> dict[str, Any]:
        """A record `portable` wrote, its `relative` fields as locations of this workspace; an older record (no
        list) has its full paths found again here by `locate` (the workspace was moved or copied since)."""
        out = dict(record)
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            legacy = relative is None and values and all(isinstance(v, str) and posixpath.isabs(v) for v in values)
            if (relative is not None and key in relative) or legacy:
                found = [self.locate(v) for v in values]
                out[key] = found if isinstance(value, list) else found[0]
        return out

    def _within(self, location: str) -> bool:
        """A full path or URL inside the workspace (a bare name, say an encoder id, is no location)."""
        if not (posixpath.isabs(location) or "://" in location):
            return False
        try:
            self.relative(posixpath.normpath(self.fs._strip_protocol(location)))
        except OutsideWorkspace:
            return False
        return True

    # -- layout (DESIGN.md) -------------------------------------------------------------------------------------
    def synthetic(self, *parts: str) -> str:
        """The generated demo source."""
        return self.path("synthetic", *parts)

    def sources(self, source: str, *parts: str) -> str:
        """Normalised metadata of one source."""
        return self.path("sources", source, *parts)

    def curated(self, source: str, *parts: str) -> str:
        """Curated url lists of one source."""
        return self.path("curated", source, *parts)

    def shards(self, source: str, *parts: str) -> str:
        """Downloaded webdataset shards of one source."""
        return self.path("shards", source, *parts)

    def features(self, encoder_id: str, source: str, *parts: str) -> str:
        """Feature Parquet of one source under one encoder."""
        return self.path("features", encoder_id, source, *parts)

    def index(self, name: str, *parts: str) -> str:
        """One cache index."""
        return self.path("index", name, *parts)

    def checkpoints(self, stage: str, run_id: str, *parts: str) -> str:
        """One training run's checkpoints."""
        return self.path("checkpoints", stage, run_id, *parts)

    def reports(self, date: str, *parts: str) -> str:
        """Reports of one day."""
        return self.path("reports", date, *parts)

    def ledger(self, *parts: str) -> str:
        """Ledger records."""
        return self.path("ledger", *parts)

    # -- file access --------------------------------------------------------------------------------------------
    def open(self, path: str, mode: str = "rb") -> IO[Any]:
        """Open a workspace path; parent folders are made when writing to a local disk."""
        if "w" in mode and self.is_local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        return self.fs.open(path, mode)

    def exists(self, path: str) -> bool:
        """True when the path exists."""
        return bool(self.fs.exists(path))

    def makedirs(self, path: str) -> None:
        """Make a folder (a no-op on object stores, which have none)."""
        self.fs.makedirs(path, exist_ok=True)

    def glob(self, pattern: str) -> list[str]:
        """Sorted paths matching a glob."""
        return sorted(self.fs.glob(pattern))

    def rename(self, src: str, dst: str) -> None:
        """Move a file: atomic on a local disk, copy + delete on object stores."""
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        self.fs.mv(src, dst)

    def remove(self, path: str) -> None:
        """Delete a file if it exists."""
        if self.fs.exists(path):
            self.fs.rm(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file atomically: a single PUT on object stores, a rename of a temporary file locally."""
        if not self.is_local:
            with self.open(path, "wb") as f:
                f.write(data)
            return
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def read_bytes(self, path: str) -> bytes:
        """Read a whole file."""
        with self.open(path, "rb") as f:
            return f.read()

    def upload(self, local: str, path: str) -> None:
        """Move a local file to a workspace path (a rename on a local workspace, an upload otherwise)."""
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            shutil.move(local, path)
        else:
            self.fs.put_file(local, path)
            os.remove(local)

    def upload_dir(self, local: str, path: str) -> None:
        """Copy a local folder to a workspace path that must not exist yet (renamed into place when local)."""
        if self.is_local:
            tmp = f"{path}.tmp-{secrets.token_hex(4)}"
            shutil.copytree(local, tmp)
            os.rename(tmp, path)
        else:
            self.fs.put(local.rstrip("/") + "/", path, recursive=True)

    def download_dir(self, path: str, local: str) -> None:
        """Copy a workspace folder to a local folder."""
        self.fs.get(path.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)

    @contextmanager
    def scratch(self) -> Iterator[str]:
        """A private local folder for intermediate files, removed afterwards (inside the workspace when local,
        so that moving results into place is a rename)."""
        if self.is_local:
            path = self.path(".scratch", secrets.token_hex(6))
            os.makedirs(path)
        else:
            path = tempfile.mkdtemp(prefix="ibllm-")
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
