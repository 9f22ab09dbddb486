"""Download against the loopback server: every failure has its reason, a killed run resumes, retry rounds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from pipelines.config import Config, load_config
from pipelines.curate import stage as curate
from pipelines.demo import synthetic
from pipelines.demo.synthetic_server import server_for, serving
from pipelines.download import stage as download
from pipelines.ingest import stage as ingest
from stores.catalog import Catalog
from stores.lease import LeaseHeld
from stores.workspace import Workspace

# What each bad kind of the synthetic source must end as.
EXPECTED_REASON = {
    "good": "success",
    "duplicate": "success",
    "404": "http_404",
    "500": "http_500",
    "slow": "timeout",
    "html": "decode",
    "huge": "too_large",
    "loop": "redirect_loop",
    "noai": "opt_out",
    "truncated": "decode",
}


def write_config(tmp_path: Path) -> Path:
    data = {
        "workspace": str(tmp_path / "ws"),
        "synthetic": {
            "count": 48,
            "seed": 5,
            "bad_fraction": 0.25,
            "slow_seconds": 3.0,
            "audio_clips": 0,
            "video_seconds": 0.5,
        },
        "sources": [{"name": "synthetic", "format": "synthetic"}],
        "download": {
            "image_size": 64,
            "processes": 1,
            "threads": 4,
            "timeout": 1.0,
            "retries": 0,
            "samples_per_shard": 6,
            "allow_private_addresses": True,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def prepare(cfg: Config) -> None:
    with server_for(cfg) as server:
        synthetic.run(cfg, server.base_url, check=False)
    ingest.run(cfg)
    curate.run(cfg)


def kinds(ws: Workspace) -> dict[str, str]:
    cat = Catalog(ws)
    return dict(cat.query("SELECT uid, json_extract_string(extra, '$.kind') FROM metadata"))


@pytest.mark.slow
def test_killed_download_resumes_and_every_outcome_has_its_reason(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    cfg = load_config(path)
    prepare(cfg)
    ws = Workspace(cfg.workspace)
    shard_dir = tmp_path / "ws" / "shards" / "synthetic"
    staging = tmp_path / "ws" / ".staging" / "download" / "synthetic"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "download", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(staging.glob("*/*_stats.json")):
        time.sleep(0.05)
    with pytest.raises(LeaseHeld, match=r"download output 'synthetic' is being written by another run"):
        download.run(cfg)  # a second download of the same output while the first runs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(staging.glob("*/*_stats.json")))
    expected = download.expected_shards(ws, curate.curated_files(ws, "synthetic"), 6)
    assert 0 < done_before < len(expected), "the kill should land half-way"
    assert not list(shard_dir.glob("*.tar"))  # nothing was written in place

    with serving(cfg):
        result = download.run(cfg)  # takes over the dead run's lease, commits what it completed, does the rest
    (src,) = result.sources
    assert src.shards == len(expected) and not src.failed_shards
    assert src.new_shards == len(expected) - done_before and not list(staging.iterdir())
    parquets = sorted(str(p) for p in shard_dir.glob("*.parquet"))
    keys = duckdb.sql(f"SELECT key FROM read_parquet({parquets!r})").fetchall()
    assert len(keys) == len({k for (k,) in keys})  # no duplicated keys
    tar_keys = []
    for tar in shard_dir.glob("*.tar"):
        with tarfile.open(tar) as tf:
            tar_keys += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".jpg")]
    assert len(tar_keys) == len(set(tar_keys)) == src.succeeded

    cat = Catalog(ws)
    curated = {u for (u,) in cat.query("SELECT uid FROM curated")}
    attempts = dict(cat.query("SELECT uid, count(*) FROM downloads GROUP BY uid"))
    assert set(attempts) == curated and set(attempts.values()) == {1}  # nothing missing, nothing twice
    kind_of = kinds(ws)
    outcome = dict(cat.query("SELECT uid, reason FROM download_latest"))
    for uid, reason in outcome.items():
        assert reason == EXPECTED_REASON[kind_of[uid]], (kind_of[uid], reason)
    assert {kind_of[u] for u in outcome} >= {"good", "404", "500", "slow", "html", "huge", "loop", "noai"}

    # Retry only what is retryable, with a timeout the slow entries can meet.
    patient = load_config(path, ["download.timeout=6"])
    with serving(patient):
        retry = download.run(patient, retry_failed=True)
    slow = sum(1 for u in outcome if kind_of[u] == "slow")
    errors = sum(1 for u in outcome if kind_of[u] == "500")
    assert retry.sources[0].attempted == slow + errors and retry.sources[0].succeeded == slow
    latest = dict(Catalog(ws).query("SELECT reason, count(*) FROM download_latest GROUP BY reason"))
    assert "timeout" not in latest and latest["http_500"] == errors
    with serving(patient):
        again = download.run(patient, retry_failed=True)  # only the 500s are left to try
    assert again.sources[0].attempted == errors and again.sources[0].output.endswith("retry-02")


@pytest.mark.slow
def test_ray_distributor_on_a_local_instance(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    overrides = ["download.distributor=ray", "ray.num_cpus=2", "synthetic.bad_fraction=0"]
    cfg = load_config(path, overrides)
    prepare(cfg)
    code = (
        "import sys; from pipelines.config import load_config; from pipelines.download import stage as download; "
        "from pipelines.demo.synthetic_server import serving; "
        "cfg = load_config(sys.argv[1], sys.argv[2:]);\n"
        "with serving(cfg): r = download.run(cfg)\n"
        "print(r.sources[0].succeeded, r.sources[0].attempted)"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    succeeded, attempted = map(int, proc.stdout.split()[-2:])
    assert succeeded == attempted == 48
