"""The shard ledger: atomic shard commits, one record per committed shard, written last, and settings checks."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from stores.lease import lease
from stores.workspace import OutsideWorkspace, Workspace

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MANIFEST = "_output.json"
TMP_MARK = ".tmp-"
M = TypeVar("M", bound=BaseModel)


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short stable hash of the settings that shape an output (canonical JSON, sha256)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class FileEntry(BaseModel):
    """One committed file of a shard."""

    path: str
    bytes: int
    sha256: str


class ShardRecord(BaseModel):
    """What the ledger knows of one committed shard."""

    stage: str
    output: str
    shard_id: str
    path: str = Field(description="the shard's main output file")
    checksum: str = Field(description="sha256 of the main output file")
    rows: int
    files: list[FileEntry]
    config_hash: str
    encoder_id: str | None = None
    seconds: float
    committed_at: str
    extra: dict[str, Any] = Field(default_factory=dict)
    relative: bool = Field(False, description="paths are relative to the workspace root (older records: full paths)")

    @property
    def fingerprint(self) -> str:
        """Changes when any file of the shard changes."""
        return hashlib.sha256("".join(f.sha256 for f in self.files).encode()).hexdigest()[:32]


class ShardFailure(BaseModel):
    """The last failure of a shard that has not been committed since."""

    stage: str
    output: str
    shard_id: str
    error: str
    failed_at: str


class LedgerConflict(RuntimeError):
    """An output was committed under other output-shaping settings than the ones asked for now."""


class PendingShard:
    """A shard being written: hands out temporary paths; nothing is visible until the ledger commits it."""

    def __init__(self, ws: Workspace, shard_id: str) -> None:
        self.ws = ws
        self.shard_id = shard_id
        self.rows = 0
        self.extra: dict[str, Any] = {}
        self.files: list[tuple[str, str]] = []  # (temporary, final)
        self._token = secrets.token_hex(4)

    def path(self, final: str) -> str:
        """A temporary path to write `final` to; the commit renames it. Stale temporaries of `final` are removed."""
        for stale in self.ws.glob(f"{final}{TMP_MARK}*"):
            self.ws.remove(stale)
        tmp = f"{final}{TMP_MARK}{self._token}"
        if self.ws.is_local:
            self.ws.makedirs(posixpath.dirname(final))
        self.files.append((tmp, final))
        return tmp

    def put(self, local: str, final: str) -> None:
        """Hand over a finished local file to be committed as `final`."""
        self.ws.upload(local, self.path(final))

    def discard(self) -> None:
        """Remove every temporary written so far."""
        for tmp, _ in self.files:
            self.ws.remove(tmp)


class Ledger:
    """Commits the shards of one output of one stage and remembers which are done.

    Layout: `ledger/<stage>/<output>/_output.json` (the settings the output was made with),
    `.../shards/<shard_id>.json` (one record per committed shard), `.../failed/<shard_id>.json`.

    Args:
        ws: the workspace.
        stage: the stage name (`download`, `extract`, ...).
        output: the output's name (a source, a feature set, an index).
        settings: the settings that shape the output; a rerun with others is refused.
        encoder_id: the encoder that made the output, where one did.
        force: discard committed shards made with other settings instead of refusing.
    """

    def __init__(
        self,
        ws: Workspace,
        stage: str,
        output: str,
        settings: Mapping[str, Any],
        encoder_id: str | None = None,
        force: bool = False,
        read_only: bool = False,
    ) -> None:
        for label, value in (("stage", stage), ("output", output)):
            if not _NAME.match(value):
                raise ValueError(f"ledger {label} {value!r} must match {_NAME.pattern}")
        self.ws, self.stage, self.output = ws, stage, output
        self.settings = dict(settings)
        self.config_hash = settings_hash(self.settings)
        self.encoder_id = encoder_id
        self.read_only = read_only
        self._dir = ws.ledger(stage, output)
        if not read_only:
            self._open(force)

    @classmethod
    @contextmanager
    def writing(
        cls, ws: Workspace, stage: str, output: str, settings: Mapping[str, Any], **options: Any
    ) -> Iterator[Ledger]:
        """Open an output for writing while holding its lease, so that no other run writes it meanwhile (a
        concurrent one raises LeaseHeld); the settings check and a --force reset happen under the lease."""
        with lease(ws, stage, output):
            yield cls(ws, stage, output, settings, **options)  # encoder_id, force

    @classmethod
    def reader(cls, ws: Workspace, stage: str, output: str) -> Ledger:
        """A read-only view of an output's ledger, whatever settings it was made with."""
        return cls(ws, stage, output, {}, read_only=True)

    def files(self, suffix: str = "") -> list[str]:
        """Every committed file ending in `suffix`, in shard order: what a reader of this output should read."""
        recs = sorted(self.committed().values(), key=lambda r: r.shard_id)
        return [f.path for r in recs for f in r.files if f.path.endswith(suffix)]

    def is_current(self, shard_id: str, input_fingerprint: str, *older: str) -> bool:
        """True when the shard is committed and was made from an input with this fingerprint (or with one of the
        `older` ways of writing it that earlier records kept)."""
        path = self._record(shard_id)
        if not self.ws.exists(path):
            return False
        return self._read_record(path).extra.get("input") in (input_fingerprint, *older)

    # -- settings -----------------------------------------------------------------------------------------------
    def _open(self, force: bool) -> None:
        manifest = posixpath.join(self._dir, MANIFEST)
        if self.ws.exists(manifest):
            old = json.loads(self.ws.read_bytes(manifest))
            if old["config_hash"] == self.config_hash and old.get("encoder_id") == self.encoder_id:
                return
            committed = len(self.ws.glob(self._record("*")))
            if committed and not force:
                raise LedgerConflict(self._conflict_message(old, committed))
            self.reset()
        body = {
            "stage": self.stage,
            "output": self.output,
            "config_hash": self.config_hash,
            "encoder_id": self.encoder_id,
            "settings": self.settings,
            "created_at": _now(),
        }
        self._write_json(manifest, body)

    def _conflict_message(self, old: Mapping[str, Any], n: int) -> str:
        changes = _diff(old.get("settings", {}), self.settings)
        if old.get("encoder_id") != self.encoder_id:
            changes.append(f"encoder_id: {old.get('encoder_id')!r} -> {self.encoder_id!r}")
        return (
            f"{self.stage} output {self.output!r} already has {n} committed shard(s) made with other settings "
            f"({'; '.join(changes) or 'hash ' + old['config_hash']}). Mixing them would give an inconsistent "
            f"output: write to a new output name, or pass --force to discard the committed shards and redo them."
        )

    def reset(self) -> None:
        """Forget every committed shard of this output and delete its files (only those inside the workspace)."""
        for path in self.ws.glob(self._record("*")):
            try:
                rec = self._read_record(path)
            except OutsideWorkspace as e:  # a copied workspace's old record: its files are not ours to delete
                log.warning("forgetting %s without deleting its files: %s", path, e)
                continue
            for f in rec.files:
                self.ws.remove(f.path)
        for p in self.ws.glob(posixpath.join(self._dir, "*", "*.json")):
            self.ws.remove(p)

    # -- queries ------------------------------------------------------------------------------------------------
    def committed(self) -> dict[str, ShardRecord]:
        """Every committed shard by id."""
        recs = (self._read_record(p) for p in self.ws.glob(self._record("*")))
        return {r.shard_id: r for r in recs}

    def is_committed(self, shard_id: str) -> bool:
        """True when the shard has a ledger record."""
        return self.ws.exists(self._record(shard_id))

    def pending(self, shard_ids: list[str]) -> list[str]:
        """The shards of `shard_ids` still to do, in order."""
        done = set(self.committed())
        return [s for s in shard_ids if s not in done]

    def failures(self) -> dict[str, ShardFailure]:
        """Shards whose last attempt failed and that have not been committed since."""
        recs = (self._read_model(p, ShardFailure) for p in self.ws.glob(self._failure("*")))
        return {r.shard_id: r for r in recs}

    # -- writing ------------------------------------------------------------------------------------------------
    @contextmanager
    def shard(self, shard_id: str) -> Iterator[PendingShard]:
        """Write one shard: write to the paths `pending.path(final)` hands out and set `pending.rows`.

        On success every file is renamed into place and the record is written last; on an exception the
        temporaries are removed, a failure record is written, and the exception propagates.
        """
        if not _NAME.match(shard_id):
            raise ValueError(f"shard id {shard_id!r} must match {_NAME.pattern}")
        if self.read_only:
            raise RuntimeError(f"ledger {self.stage}/{self.output} was opened read-only")
        pending = PendingShard(self.ws, shard_id)
        start = time.perf_counter()
        try:
            yield pending
        except BaseException as e:
            pending.discard()
            self.record_failure(shard_id, f"{type(e).__name__}: {e}")
            raise
        self._commit(pending, time.perf_counter() - start)

    def record_existing(
        self, shard_id: str, paths: list[str], rows: int, extra: Mapping[str, Any] | None = None
    ) -> ShardRecord:
        """Commit a shard that a tool wrote in place with its own completion mark (img2dataset's stats file).

        The caller checks the mark first; the record is still the commit point for every reader of the ledger.
        """
        if self.read_only:
            raise RuntimeError(f"ledger {self.stage}/{self.output} was opened read-only")
        entries = []
        for p in paths:
            size, digest = _sha256(self.ws, p)
            entries.append(FileEntry(path=p, bytes=size, sha256=digest))
        return self._write_record(shard_id, entries, rows, 0.0, extra or {})

    def record_failure(self, shard_id: str, error: str) -> None:
        """Remember that a shard failed, so that it never silently vanishes."""
        fail = ShardFailure(
            stage=self.stage, output=self.output, shard_id=shard_id, error=error[:4000], failed_at=_now()
        )
        self._write_json(self._failure(shard_id), fail.model_dump())

    def _commit(self, pending: PendingShard, seconds: float) -> ShardRecord:
        if not pending.files:
            raise ValueError(f"shard {pending.shard_id!r} wrote no file")
        previous = self.committed_record(pending.shard_id)
        entries = []
        for tmp, final in pending.files:
            if not self.ws.exists(tmp):
                raise FileNotFoundError(f"shard {pending.shard_id!r}: {tmp} was handed out but never written")
            size, digest = _sha256(self.ws, tmp)
            self.ws.rename(tmp, final)
            entries.append(FileEntry(path=final, bytes=size, sha256=digest))
        rec = self._write_record(pending.shard_id, entries, pending.rows, seconds, pending.extra)
        if previous is not None:  # a redone shard: its old files that the new commit did not replace go
            for f in previous.files:
                if f.path not in {e.path for e in entries}:
                    self.ws.remove(f.path)
        return rec

    def _write_record(
        self, shard_id: str, entries: list[FileEntry], rows: int, seconds: float, extra: Mapping[str, Any]
    ) -> ShardRecord:
        """Write a shard's record (the commit point) and clear its failure record."""
        rec = ShardRecord(
            stage=self.stage,
            output=self.output,
            shard_id=shard_id,
            path=entries[0].path,
            checksum=entries[0].sha256,
            rows=rows,
            files=entries,
            config_hash=self.config_hash,
            encoder_id=self.encoder_id,
            seconds=round(seconds, 3),
            committed_at=_now(),
            extra=dict(extra),
        )
        stored = [FileEntry(path=self.ws.relative(e.path), bytes=e.bytes, sha256=e.sha256) for e in entries]
        body = rec.model_copy(update={"files": stored, "path": stored[0].path, "relative": True})
        self._write_json(self._record(shard_id), body.model_dump())
        self.ws.remove(self._failure(shard_id))
        return rec

    def committed_record(self, shard_id: str) -> ShardRecord | None:
        """The record of a committed shard, or None."""
        path = self._record(shard_id)
        return self._read_record(path) if self.ws.exists(path) else None

    # -- helpers ------------------------------------------------------------------------------------------------
    def _record(self, shard_id: str) -> str:
        return posixpath.join(self._dir, "shards", f"{shard_id}.json")

    def _failure(self, shard_id: str) -> str:
        return posixpath.join(self._dir, "failed", f"{shard_id}.json")

    def _write_json(self, path: str, body: Mapping[str, Any]) -> None:
        data = json.dumps(body, indent=1, sort_keys=True, default=str).encode()
        if self.ws.is_local:  # write then rename: a reader never sees half a record
            tmp = f"{path}{TMP_MARK}{secrets.token_hex(4)}"
            self.ws.write_bytes(tmp, data)
            self.ws.rename(tmp, path)
        else:  # one PUT: object stores show all of it or nothing
            self.ws.write_bytes(path, data)

    def _read_record(self, path: str) -> ShardRecord:
        """A shard record with its paths as paths of this workspace (found again in a copied one)."""
        rec = self._read_model(path, ShardRecord)
        where = self.ws.inside if rec.relative else self.ws.resolve_legacy
        try:
            files = [FileEntry(path=where(f.path), bytes=f.bytes, sha256=f.sha256) for f in rec.files]
            main = where(rec.path)
        except OutsideWorkspace as e:
            raise OutsideWorkspace(f"ledger record {path}: {e}") from None
        return rec.model_copy(update={"files": files, "path": main, "relative": True})

    def _read_model(self, path: str, model: type[M]) -> M:
        try:
            return model.model_validate_json(self.ws.read_bytes(path))
        except ValueError as e:
            raise ValueError(f"ledger record {path} is unreadable: {e}") from e


def _sha256(ws: Workspace, path: str) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with ws.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    missing = object()
    changed = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            show = ["(unset)" if v is missing else repr(v) for v in (va, vb)]
            changed.append(f"{k}: {show[0]} -> {show[1]}")
    return changed


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
