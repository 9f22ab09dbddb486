"""Benchmark: what watching a run costs a training step: the metric history (rank 0's recorder) and the guard.

Usage: python -m bench.train_watch [--rounds 5] [--steps 40] [--micro-batch 16] [--seq 48] [--flush-every 500]
       [--history-rows 1000000]
Runs the loop's real steps (`bench.train_gpu.step_rate`, the tiny shape on the CPU, the demo's stage-1 batch) in
alternating rounds without and with the recorder and the divergence guard, and prints the median step times and the
overhead as a ratio measured in this run; then the cost of one segment flush of `--flush-every` rows (the demo
checkpoints every 500 steps), spread over those steps. Absolute times are noisy on a shared machine: read the ratio.
Last, a generated history of `--history-rows` steps (segments of 10,000) and the time of catalog queries over it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bench.train_gpu import step_rate
from pipelines.train.guard import Guard
from pipelines.train.metrics import Recorder
from stores.catalog import Catalog
from stores.workspace import Workspace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=48)
    p.add_argument("--flush-every", type=int, default=500)
    p.add_argument("--history-rows", type=int, default=1_000_000)
    a = p.parse_args()
    torch.set_num_threads(2)
    plain, watched = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        for r in range(a.rounds):
            args = {"stage": 1, "shape": "tiny", "micro_batch": a.micro_batch, "seq": a.seq, "steps": a.steps}
            plain.append(step_rate(**args)["ms_per_step"])
            recorder = Recorder(ws, 1, f"bench-{r}", 1)
            watched.append(step_rate(**args, recorder=recorder, guard=Guard(10.0))["ms_per_step"])
        rows = [
            {"step": i, "loss": 1.0, "lr": 1e-4, "grad_norm": 0.5, "tokens": 700, "samples": 16, "step_seconds": 0.1}
            for i in range(1, a.flush_every + 1)
        ]
        recorder = Recorder(ws, 1, "bench-flush", 1)
        for row in rows:
            recorder.rows.append(row)
        start = time.perf_counter()
        recorder.flush()
        flush_ms = (time.perf_counter() - start) * 1e3
        adds = Recorder(ws, 1, "bench-adds", 1)
        start = time.perf_counter()
        for step in range(1, 10_001):
            adds.add(step=step, loss=1.0, lr=1e-4, grad_norm=0.5, tokens=700, samples=16, step_seconds=0.02)
        add_us = (time.perf_counter() - start) / 10_000 * 1e6
        queries = history_queries(ws, a.history_rows)
    p_ms, w_ms = statistics.median(plain), statistics.median(watched)
    print(f"step, tiny stage 1, micro-batch {a.micro_batch} x {a.seq} tokens, {a.rounds} rounds of {a.steps} steps")
    print(f"  without recorder and guard: {p_ms:.2f} ms  (rounds: {', '.join(f'{x:.1f}' for x in plain)})")
    print(f"  with recorder and guard:    {w_ms:.2f} ms  (rounds: {', '.join(f'{x:.1f}' for x in watched)})")
    print(f"  overhead: {100 * (w_ms / p_ms - 1):+.2f}% of a step (median over rounds; noise is about that size)")
    print(
        f"one segment flush of {a.flush_every} rows: {flush_ms:.1f} ms = {100 * flush_ms / a.flush_every / p_ms:.3f}%"
        f" of each of the {a.flush_every} steps it covers"
    )
    print(f"recording one step (Recorder.add, no flush): {add_us:.1f} us = {add_us / 10 / p_ms:.4f}% of a step")
    for sql, seconds in queries:
        print(f"catalog over {a.history_rows:,} logged steps: {seconds * 1e3:.0f} ms  {sql}")


def history_queries(ws: Workspace, rows: int, segment: int = 10_000) -> list[tuple[str, float]]:
    """Write a run's history of `rows` steps in segments, then time catalog queries over it (the views' set-up
    first)."""
    log = Recorder(ws, 1, "bench-history", 1).log
    for first in range(1, rows + 1, segment):
        steps = range(first, min(first + segment, rows + 1))
        log.write(
            [
                {
                    "stage": 1,
                    "run_id": "bench-history",
                    "attempt": 1,
                    "step": s,
                    "loss": 1 / s,
                    "lr": 1e-4,
                    "grad_norm": 0.5,
                    "tokens": 700,
                    "samples": 16,
                    "tokens_per_s": 7000.0,
                }
                for s in steps
            ]
        )
    start = time.perf_counter()
    catalog = Catalog(ws)
    out = [("(the catalog's views defined)", time.perf_counter() - start)]
    for sql in (
        "SELECT count(*), min(loss), avg(tokens_per_s) FROM training_metrics WHERE run_id = 'bench-history'",
        "SELECT step // 1000 AS k, avg(loss) FROM training_metrics GROUP BY k ORDER BY k",
        "SELECT run_id, status, steps FROM runs",
    ):
        start = time.perf_counter()
        catalog.query(sql)
        out.append((sql, time.perf_counter() - start))
    return out


if __name__ == "__main__":
    main()
