"""The demo end to end: through the Prefect flow in a test harness, and as `ibllm demo` in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.demo import DemoResult, demo_flow
from pipelines.config import Config


@pytest.fixture(scope="session")
def prefect_harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_demo_flow_runs_every_stage(prefect_harness: None, config: Config) -> None:
    result = demo_flow(config)
    assert isinstance(result, DemoResult)
    assert result.synthetic.rows == 40 and result.synthetic.served["ok"] == result.synthetic.good
    assert result.ingest.sources[0].rows == 40
    kept = result.curate.sources[0].rows_out
    assert 0 < kept < 40
    (dl,) = result.download.sources
    assert dl.attempted == kept and 0 < dl.succeeded < kept
    assert result.report.totals[0]["downloaded"] == dl.succeeded
    (ext,) = result.extract.sources
    assert ext.rows + ext.failures == dl.succeeded and ext.shards == dl.shards
    assert result.index.built and result.index.count == ext.rows and result.index.recall_at_10 >= 0.9
    text = result.summary()
    for block in (
        "== synthetic source",
        "== ingest",
        "== curate: the funnel",
        "== download",
        "== extract",
        "== report",
    ):
        assert block in text
    again = demo_flow(config)  # a rerun redoes nothing
    assert again.ingest.sources[0].written == 0 and again.curate.sources[0].skipped
    assert again.download.sources[0].new_shards == 0 and again.extract.sources[0].new_shards == 0
    assert not again.index.built


@pytest.mark.slow
def test_ibllm_demo_command(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--json", "--workspace", str(tmp_path / "ws"),
         "--set", "synthetic.count=60"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["synthetic"]["rows"] == 60
    assert result["download"]["sources"][0]["succeeded"] > 0
    assert (tmp_path / "ws" / "synthetic" / "metadata.parquet").is_file()
    assert Path(result["report"]["html"]).is_file()
