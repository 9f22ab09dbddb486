"""prefect.yaml: every deployment names a flow that loads, on the ibllm process pool, with a config that loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.flows import Flow, load_flow_from_entrypoint

from pipelines.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = (
    "pipeline",
    "curate",
    "extract",
    "index",
    "report",
    "train-stage1",
    "train-stage2",
    "evaluate",
    "retrain",
)


@pytest.mark.parametrize(
    ("file", "pool", "config"),
    [("prefect.yaml", "ibllm", None), ("deploy/prefect-cluster.yaml", "ibllm-cluster", "configs/cluster.yaml")],
)
def test_every_deployment_loads(file: str, pool: str, config: str | None) -> None:
    """Each file's deployments target one pool (`prefect deploy --all` refuses a pool that does not exist)."""
    spec = yaml.safe_load((ROOT / file).read_text())
    assert spec["deployments"]
    for dep in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
        assert isinstance(flow, Flow)
        assert dep["work_pool"]["name"] == pool
        assert config is None or dep["parameters"]["config"] == config
        params = dep.get("parameters", {})
        assert set(params) <= set(flow.parameters.properties), dep["name"]
        if params.get("config"):
            load_config(ROOT / params["config"], params.get("overrides"))


def test_the_retrain_deployment_runs_weekly_on_the_config_schedule_one_at_a_time() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == "retrain"]
    cfg = load_config(ROOT / dep["parameters"]["config"])
    assert dep["schedules"] == [{"cron": cfg.retrain.cron, "timezone": cfg.retrain.timezone}]
    assert dep["concurrency_limit"] == 1
    names = {d["name"] for d in spec["deployments"]}
    assert set(DEPLOYMENTS) <= names


def test_retrain_serve_schedules_the_config_cron_in_its_timezone() -> None:
    """`ibllm retrain --serve` deploys the retrain flow on retrain.cron / retrain.timezone, over the config itself."""
    from flows.retrain import scheduled

    cfg = load_config(None, ["retrain.cron=15 4 * * 1", "retrain.timezone=Europe/Paris"])
    deployment = scheduled(cfg)
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("15 4 * * 1", "Europe/Paris")
    assert deployment.parameters["config"]["retrain"]["cron"] == "15 4 * * 1"
    assert deployment.concurrency_limit == 1
