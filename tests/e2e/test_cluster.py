"""Scale-out on one machine: the pipeline flow on a two-node Ray cluster with its workspace on a local S3 server,
then a node lost during extraction and the rerun that completes it."""

from __future__ import annotations

import os
import posixpath
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipelines.config import Config, SyntheticConfig, dump_config
from stores.workspace import Workspace
from tests.e2e.ray_cluster import SLOT, Cluster, two_nodes, wait_for_nodes
from tests.e2e.test_demo import SMALL_TRAINING

pytestmark = pytest.mark.slow

SCALE_OUT = [
    "download.samples_per_shard=8",  # 4-5 shards: work for both nodes, and a kill that lands between shards
    "extract.actors=2",
    f"extract.actor_resources={{{SLOT}: 1}}",  # each node offers one slot: an actor per node
    "extract.batch_size=4",
    "extract.buffer_mb=64",
    "train.stage1.workers=2",
    f"train.stage1.worker_resources={{{SLOT}: 1}}",
    "train.stage1.placement=STRICT_SPREAD",
    "train.stage2.workers=2",
    f"train.stage2.worker_resources={{{SLOT}: 1}}",
    "train.stage2.placement=STRICT_SPREAD",
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two Ray nodes, both up. The pipeline connects this process as its driver, as `ibllm` would (with the job's
    runtime environment); a local Ray instance of an earlier test, and the connection that waited, are shut first."""
    import ray

    ray.shutdown()
    with two_nodes() as c:
        ray.init(address=c.address, log_to_driver=False)
        wait_for_nodes(c, 2)
        ray.shutdown()
        yield c
        ray.shutdown()


@pytest.fixture(scope="module")
def scaled_out(
    prefect_harness: None, cluster: Cluster, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The pipeline flow, once, on the cluster and a fresh bucket, from a working directory that must stay empty."""
    from flows.pipeline import pipeline_flow

    cwd = tmp_path_factory.mktemp("cwd")
    bucket = f"ibllm-{uuid.uuid4().hex[:8]}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    overrides = [
        f"workspace=s3://{bucket}/run",
        f"storage_options={options}",
        f"ray.address={cluster.address}",
        "download.timeout=1.5",
        *SCALE_OUT,
        *SMALL_TRAINING,
    ]
    cfg = Config.from_yaml(None, overrides)
    cfg.synthetic = SyntheticConfig(
        count=40, seed=3, bad_fraction=0.25, slow_seconds=3.0, audio_clips=3, video_seconds=1.0
    )
    Workspace(cfg.workspace, cfg.storage_options).fs.mkdir(bucket)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # the demo's relative `workspace` folder would appear here: nothing may
        start = time.time()
        result = pipeline_flow(cfg)
        seconds = time.time() - start
    yield {"cfg": cfg, "result": result, "cwd": cwd, "seconds": seconds, "placements": _placements(cluster.address)}


def test_the_pipeline_runs_on_two_nodes_through_s3_only(scaled_out: dict[str, Any]) -> None:
    result, cfg, placements = scaled_out["result"], scaled_out["cfg"], scaled_out["placements"]
    print(f"\npipeline on two nodes and S3: {scaled_out['seconds']:.0f} s; actors by node: {placements}")
    (dl,) = result.curation.download.sources
    assert dl.succeeded > 0 and dl.shards >= 4
    (ext,) = result.extract.sources
    assert ext.rows + ext.failures == dl.succeeded and ext.shards == dl.shards and not ext.failed_shards
    assert result.index.built and result.index.count == ext.rows
    assert result.stage1.steps == result.stage1.total_steps > 0 and result.stage1.workers == 2
    assert result.stage2.steps == result.stage2.total_steps > 0 and result.stage2.workers == 2
    assert result.evaluation.examples > 0 and result.check is not None
    assert all(a.answer for a in result.answers.asked)  # generation, with and without the cache
    # where the work ran: an encoder actor on each node, each training stage's two workers on two nodes
    encoders = [c for name, c in placements.items() if "Encoder" in name]
    assert encoders and len(sum(encoders, Counter())) == 2, placements
    assert len(placements.get("RayTrainWorker", Counter())) == 2, placements
    assert sum(placements["RayTrainWorker"].values()) >= 4  # stage 1 and stage 2, two each
    # every output is in the bucket, nothing on local disk
    ws = Workspace(cfg.workspace, cfg.storage_options)
    for folder in ("shards", "features", "index", "checkpoints", "ledger", "reports"):
        assert ws.glob(ws.path(folder, "*")), folder
    assert ws.exists(ws.path("catalog.duckdb"))
    assert list(scaled_out["cwd"].iterdir()) == []
    assert result.workspace.startswith("s3://")


def test_a_node_lost_during_extraction_then_the_rerun_gives_one_row_per_sample(
    scaled_out: dict[str, Any], cluster: Cluster, tmp_path: Path
) -> None:
    from pipelines.extract import stage as extract

    cfg, result = scaled_out["cfg"], scaled_out["result"]
    ws = Workspace(cfg.workspace, cfg.storage_options)
    features = ws.features(result.extract.encoder_id, "synthetic")
    expected = _uids(ws, features)
    assert len(expected) == len(set(expected)) == result.extract.sources[0].rows
    for path in (features, ws.ledger("extract")):  # forget the feature set: extraction starts over
        ws.fs.rm(path, recursive=True)
    # `ibllm extract` in its own process; node b's raylet is killed once a first shard is committed
    config = tmp_path / "cluster.yaml"
    config.write_text(dump_config(cfg))
    log = tmp_path / "extract.log"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "extract", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=scaled_out["cwd"],
        )
    committed = _wait_for(lambda: len(ws.glob(posixpath.join(features, "part-*.parquet"))), proc, timeout=240)
    cluster.nodes["b"].raylet().kill()
    cluster.join("b")  # a replacement node with the same labels
    code = _finish(proc, timeout=180)
    print(
        f"\nnode b killed after {committed} committed shard(s) of {result.extract.sources[0].shards}; the killed "
        f"run exited {code}:\n{log.read_text()[-1500:]}"
    )
    assert committed < result.extract.sources[0].shards  # the kill landed while shards were in flight
    rerun = extract.run(cfg)
    (src,) = rerun.sources
    print(f"the rerun committed {src.new_shards} more shard(s)")
    assert src.rows == len(expected) and not src.failed_shards
    got = _uids(ws, features)
    assert len(got) == len(set(got)) and sorted(got) == sorted(expected)  # exactly one row per sample


def _uids(ws: Workspace, folder: str) -> list[str]:
    uids: list[str] = []
    for path in ws.glob(posixpath.join(folder, "part-*.parquet")):
        with ws.open(path) as f:
            uids += pq.read_table(f, columns=["uid"]).column("uid").to_pylist()
    return uids


def _wait_for(count: Any, proc: subprocess.Popen, timeout: float) -> int:
    """Until count() > 0 (polled); the count. Fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        n = count()
        if n:
            return n
        if proc.poll() is not None:
            raise AssertionError(f"the extraction ended (exit {proc.returncode}) before a shard was committed")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no shard committed within {timeout} s")


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    """The process's exit code; interrupted (as Ctrl-C would) if it is still waiting on the lost node after
    `timeout` seconds, killed if that does not end it."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _placements(address: str) -> dict[str, Counter]:
    """Which nodes of the cluster at `address` ran which actors (finished ones included), by class name; the address
    is given, since another Ray instance on this machine makes the state API refuse to guess."""
    from ray.util.state import list_actors

    out: dict[str, Counter] = {}
    for a in list_actors(address=address, limit=10_000, raise_on_missing_output=False):
        if a.node_id:  # an actor that died before it was placed (a pool scaled down at once) ran nowhere
            out.setdefault(a.class_name, Counter())[a.node_id[:8]] += 1
    return out
