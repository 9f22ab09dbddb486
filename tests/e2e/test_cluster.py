"""Scale-out on one machine: the pipeline flow on a two-node Ray cluster with its workspace on a local S3 server."""

from __future__ import annotations

import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.ray_cluster import SLOT, Cluster, two_nodes, wait_for_nodes
from tests.e2e.test_demo import SMALL_TRAINING

pytestmark = pytest.mark.slow

SCALE_OUT = [
    "download.samples_per_shard=8",  # 4-5 shards: work for both nodes, and a kill that lands between shards
    "extract.actors=2", f"extract.actor_resources={{{SLOT}: 1}}",  # one encoder actor per node
    "extract.batch_size=8", "extract.buffer_mb=64",
    "train.stage1.workers=2", f"train.stage1.worker_resources={{{SLOT}: 1}}", "train.stage1.placement=STRICT_SPREAD",
    "train.stage2.workers=2", f"train.stage2.worker_resources={{{SLOT}: 1}}", "train.stage2.placement=STRICT_SPREAD",
]  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two Ray nodes; this process is the driver (a local Ray instance of an earlier test is shut down first)."""
    import ray

    ray.shutdown()
    with two_nodes() as c:
        ray.init(address=c.address, log_to_driver=False)
        wait_for_nodes(c, 2)
        yield c
        ray.shutdown()


def test_pipeline_on_two_nodes_and_s3(prefect_harness: None, cluster: Cluster, s3_endpoint: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from flows.pipeline import pipeline_flow
    from pipelines.config import Config, SyntheticConfig
    from stores.workspace import Workspace

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the demo's relative workspace would land here: nothing may
    bucket = f"ibllm-{uuid.uuid4().hex[:8]}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    overrides = [f"workspace=s3://{bucket}/run", f"storage_options={options}", f"ray.address={cluster.address}",
                 "download.timeout=1.5", *SCALE_OUT, *SMALL_TRAINING]  # fmt: skip
    cfg = Config.from_yaml(None, overrides)
    cfg.synthetic = SyntheticConfig(count=40, seed=3, bad_fraction=0.25, slow_seconds=3.0, audio_clips=3,
                                    video_seconds=1.0)  # fmt: skip
    ws = Workspace(cfg.workspace, cfg.storage_options)
    ws.fs.mkdir(bucket)
    start = time.time()
    result = pipeline_flow(cfg)
    print(f"pipeline on two nodes and S3: {time.time() - start:.0f} s", file=sys.stderr)
    assert result.stage2.steps == result.stage2.total_steps > 0
    print(_placements(), file=sys.stderr)
    assert list(cwd.iterdir()) == []


def _placements() -> dict[str, Counter]:
    """Which nodes ran which actors (dead ones included), by class name."""
    from ray.util.state import list_actors

    out: dict[str, Counter] = {}
    for a in list_actors(limit=10_000, raise_on_missing_output=False):
        out.setdefault(a.class_name, Counter())[a.node_id[:8]] += 1
    return out
