"""A training run's metric history: Parquet segments of logged steps in the run's folder (`metrics/`)."""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stores.workspace import Workspace

METRICS = "metrics"  # the folder of a run's segments
# one row a logged step; `heldout_loss` only at the steps it was measured
SCHEMA = pa.schema(
    [
        ("stage", pa.int32()),
        ("run_id", pa.string()),
        ("attempt", pa.int32()),
        ("step", pa.int64()),
        ("time", pa.float64()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("tokens", pa.int64()),
        ("samples", pa.int64()),
        ("step_seconds", pa.float64()),
        ("tokens_per_s", pa.float64()),
        ("samples_per_s", pa.float64()),
        ("peak_memory_mb", pa.float64()),
        ("heldout_loss", pa.float64()),
    ]
)
_SEGMENT = re.compile(r"steps-(\d+)-(\d+)\.parquet$")


class MetricLog:
    """The metric segments of one run: `steps-<first>-<last>.parquet`, each written whole (atomically on a local
    disk), so a killed run loses at most the steps it had not flushed yet.

    Args:
        ws: the workspace.
        run_folder: the run's folder, a path of `ws`.
    """

    def __init__(self, ws: Workspace, run_folder: str) -> None:
        self.ws, self.folder = ws, posixpath.join(run_folder, METRICS)

    def segments(self) -> list[tuple[int, int, str]]:
        """(first step, last step, path) of every segment, in step order."""
        found = []
        for path in self.ws.glob(posixpath.join(self.folder, "steps-*.parquet")):
            m = _SEGMENT.search(path)
            if m:
                found.append((int(m[1]), int(m[2]), path))
        return sorted(found)

    def write(self, rows: Sequence[dict[str, Any]]) -> str | None:
        """Write logged steps (in step order) as one segment; returns its path (None for no rows)."""
        if not rows:
            return None
        table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)
        path = posixpath.join(self.folder, f"steps-{rows[0]['step']:09d}-{rows[-1]['step']:09d}.parquet")
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.ws.write_bytes(path, buffer.getvalue())
        return path

    def keep_until(self, step: int) -> None:
        """Forget every logged step after `step` (a run resumed from its checkpoint at `step` logs them again): a
        segment wholly after it is removed, one that straddles it is rewritten without them."""
        for first, last, path in self.segments():
            if first > step:
                self.ws.remove(path)
            elif last > step:
                kept = self._read(path).filter(pc.field("step") <= step)
                self.write(kept.to_pylist())
                self.ws.remove(path)

    def read(self) -> pa.Table:
        """Every logged step of the run, in step order."""
        tables = [self._read(path) for _, _, path in self.segments()]
        return pa.concat_tables(tables).sort_by("step") if tables else SCHEMA.empty_table()

    def _read(self, path: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.ws.read_bytes(path))).cast(SCHEMA)
