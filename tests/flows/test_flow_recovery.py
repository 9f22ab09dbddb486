"""Flows recover: a task that fails once is retried and its flow completes; a killed extraction flow resumes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

from flows.stages import extract_flow, report_flow
from pipelines.config import Config
from stores.ledger import Ledger
from stores.workspace import Workspace
from tests.pipelines.test_extract import feature_rows, make_workspace


async def _task_runs(name: str) -> list:
    async with get_client() as client:
        return await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))


def test_a_task_that_fails_once_is_retried_and_the_flow_completes(prefect_harness: None, tmp_path: Path) -> None:
    cfg = Config.from_yaml(None, [f"workspace={tmp_path / 'ws'}"])
    blocker = tmp_path / "ws" / "reports"  # a file where the report's folder goes: the first attempt fails for real
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    before = {r.id for r in asyncio.run(_task_runs("report"))}

    def unblock_once_retrying() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [r for r in asyncio.run(_task_runs("report")) if r.id not in before]
            if any(r.state and r.state.name == "AwaitingRetry" for r in runs):
                blocker.unlink()
                return
            time.sleep(0.2)

    fixer = threading.Thread(target=unblock_once_retrying)
    fixer.start()
    state = report_flow(cfg, return_state=True)
    fixer.join()
    assert state.is_completed(), state
    (run,) = [r for r in asyncio.run(_task_runs("report")) if r.id not in before]
    assert run.run_count == 2 and run.state.is_completed()
    assert list((tmp_path / "ws" / "reports").glob("*/curation.html"))


@pytest.mark.slow
def test_a_killed_extraction_flow_resumes_where_it_stopped(prefect_harness: None, tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path, shards=8, per_shard=12, broken=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ledger = Ledger.reader(Workspace(cfg.workspace), "extract", "imagebind-tiny-init0.s")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "RAY_AUTH_MODE": "disabled"}
    env.pop("PREFECT_API_URL", None)  # its own ephemeral server, as a flow run started by hand
    script = f"from flows.stages import extract_flow; extract_flow({str(path)!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not ledger.committed() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # as soon as the first shard is committed
    proc.wait()
    done_before = len(ledger.committed())
    assert 0 < done_before < 8, done_before
    result = extract_flow(str(path))
    (src,) = result.sources
    assert src.shards == 8 and src.new_shards == 8 - done_before  # only what the killed run had not committed
    rows = feature_rows(cfg, result.encoder_id)
    assert len(rows) == len({u for u, _ in rows}) == 8 * 10  # every good sample exactly once (2 a shard fail)
