"""The console: progress lines per interval, third-party chatter dropped (from child processes too), the relay of a
Ray Train worker's progress to the driver."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.console import IMG2DATASET_CHATTER, ChatterFilter, Progress, filtered_output
from pipelines.train.stage import relay_progress
from stores.workspace import Workspace


def test_progress_logs_once_per_interval_with_the_time_left(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    progress = Progress(logging.getLogger("t"), "stage 1", every=0.2, start_at=100)
    assert not progress.update(110, 200, "steps")  # a short stage says nothing
    time.sleep(0.25)
    assert progress.update(150, 200, "steps, loss 0.5")
    assert not progress.update(151, 200, "steps")
    assert progress.update(160, 200, "steps", force=True)
    first, second = (r.getMessage() for r in caplog.records)
    assert first.startswith("stage 1: 150/200 steps, loss 0.5, about ") and first.endswith("s left")
    assert second.startswith("stage 1: 160/200 steps")
    assert Progress(logging.getLogger("t"), "x").line(5, None, "images", 3.0) == "x: 5 images"


def test_chatter_filter_keeps_warnings_and_real_messages() -> None:
    keep = ChatterFilter()

    def record(msg: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("prefect.task_runs", level, __file__, 1, msg, None, None)

    assert not keep.filter(record("Finished in state Completed()"))
    assert not keep.filter(record("Downloading starting now, check your bandwidth speed (with bwm-ng)"))
    assert keep.filter(record("Finished in state Failed('boom')"))
    assert keep.filter(record("Finished in state Completed()", logging.WARNING))
    assert keep.filter(record("download: 368/406 images"))


def test_filtered_output_drops_chatter_of_child_processes(capfd: pytest.CaptureFixture[str]) -> None:
    script = (
        "import sys; print('Sharding file number 1 of 1 called x'); print('a real problem', file=sys.stderr); "
        "print('worker  - success: 0.9 - count: 64'); print('total   - success: 0.9 - count: 64')"
    )
    with filtered_output(IMG2DATASET_CHATTER):
        subprocess.run([sys.executable, "-c", script], check=True)
        print("ours", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "a real problem" in err and "ours" in err
    assert "Sharding file" not in err and "worker  - success" not in err and "total   - success" not in err


def test_the_driver_relays_the_workers_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipelines.train.stage")
    ws = Workspace(str(tmp_path))
    path = ws.path("progress.json")
    ws.write_bytes(
        path, json.dumps({"line": "stage 1: 5/9 from an earlier attempt", "time": time.time() - 60}).encode()
    )
    with relay_progress(ws, path, poll=0.05):
        for step in (20, 40):
            ws.write_bytes(path, json.dumps({"line": f"stage 1: {step}/100 steps", "time": time.time()}).encode())
            time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.train.stage"]
    assert lines == ["stage 1: 20/100 steps", "stage 1: 40/100 steps"]
