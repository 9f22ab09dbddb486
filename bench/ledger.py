"""Benchmark: what the ledger's atomic commit costs over a plain write, per shard, on a local disk."""

from __future__ import annotations

import os
import tempfile
import time

from stores.ledger import Ledger
from stores.workspace import Workspace

SHARDS = int(os.environ.get("BENCH_SHARDS", "200"))
SHARD_BYTES = int(os.environ.get("BENCH_SHARD_BYTES", str(4 << 20)))


def main() -> None:
    payload = os.urandom(SHARD_BYTES)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        start = time.perf_counter()
        for i in range(SHARDS):
            ws.write_bytes(ws.shards("plain", f"{i:05d}.bin"), payload)
        plain = time.perf_counter() - start

        ledger = Ledger(ws, "bench", "committed", {"shard_bytes": SHARD_BYTES})
        start = time.perf_counter()
        for i in range(SHARDS):
            with ledger.shard(f"{i:05d}") as shard:
                ws.write_bytes(shard.path(ws.shards("committed", f"{i:05d}.bin")), payload)
                shard.rows = 1
        committed = time.perf_counter() - start

        start = time.perf_counter()
        todo = Ledger(ws, "bench", "committed", {"shard_bytes": SHARD_BYTES}).pending(
            [f"{i:05d}" for i in range(SHARDS)]
        )
        resume = time.perf_counter() - start
    mb = SHARDS * SHARD_BYTES / 1e6
    print(f"shards: {SHARDS} x {SHARD_BYTES / 1e6:.1f} MB")
    print(f"plain write:     {plain:.3f} s  ({mb / plain:.0f} MB/s)")
    print(f"ledger commit:   {committed:.3f} s  ({mb / committed:.0f} MB/s, incl. sha256 + rename + record)")
    print(f"commit / plain:  {committed / plain:.2f}x")
    print(f"resume scan:     {resume * 1e3:.1f} ms for {SHARDS} records ({len(todo)} pending)")


if __name__ == "__main__":
    main()
