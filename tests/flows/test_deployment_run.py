"""The deployment workflow for real: a local Prefect server, the `ibllm` pool, `prefect deploy --all`, a worker, and
the `pipeline` deployment run on the demo config until Completed, with its outputs and artifacts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.e2e.test_demo import SMALL_TRAINING
from tests.flows.test_deployments import DEPLOYMENTS

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Prefect server on a loopback port, in its own PREFECT_HOME; yields the environment to talk to it."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "IBLLM_HOME": str(ROOT),
    }
    proc = _start(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "server.log"
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield env
    finally:
        _stop(proc)


def _prefect(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.slow
def test_pipeline_deployment_runs_on_a_worker(server: dict[str, str], tmp_path: Path) -> None:
    env = server
    _prefect(env, "work-pool", "create", "ibllm", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all")
    listed = _prefect(env, "deployment", "ls")
    for name in DEPLOYMENTS:
        assert name in listed, listed
    worker = _start([*PREFECT, "worker", "start", "--pool", "ibllm", "--limit", "1"], env, tmp_path / "worker.log")
    ws = tmp_path / "ws"
    overrides = [f"workspace={ws}", "synthetic.count=40", "download.timeout=1.5", *SMALL_TRAINING]
    try:
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            run = run_deployment("ibllm-pipeline/pipeline", parameters={"overrides": overrides}, timeout=0)
            state = asyncio.run(_wait(run.id, timeout=900))
            assert state.is_completed(), f"{state}\n" + (tmp_path / "worker.log").read_text()[-4000:]
            keys = {a.key for a in asyncio.run(_artifacts(run.id))}
    finally:
        _stop(worker)
    assert list((ws / "features").glob("*/synthetic/part-*.parquet"))
    assert list((ws / "checkpoints" / "stage2").glob("*/run.json"))
    assert list((ws / "reports").glob("*/curation.html"))
    assert {"curation-funnel", "curation-report", "training-stage1", "training-stage2", "demo-check"} <= keys, keys


async def _wait(run_id: UUID, timeout: float) -> State:
    async with get_client() as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = await client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run.state
            await asyncio.sleep(3)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s")


async def _artifacts(run_id: UUID) -> list:
    """Artifacts of the run and of its subflow runs."""
    async with get_client() as client:
        runs = await client.read_flow_runs()
        ids = {run_id} | {r.id for r in runs if r.parent_task_run_id is not None}
        return [a for a in await client.read_artifacts() if a.flow_run_id in ids]
