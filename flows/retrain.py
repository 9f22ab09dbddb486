"""The `retrain` flow: new shards, features, index, stage 1 from the promoted model, stage 2, promote or not."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from pydantic import BaseModel, SerializeAsAny

from flows import artifacts
from flows.demo_hook import prepared
from flows.tasks import DAY, HOUR, extract_task, index_task, stage_task
from pipelines.config import Config, resolve_config
from pipelines.extract.stage import ExtractResult
from pipelines.index.stage import IndexResult
from pipelines.retrain import stage as retrain
from pipelines.train.stage import TrainResult
from stores.registry import Decision


class RetrainResult(BaseModel):
    """One retrain: the plan, and when there was work, what each stage did and the decision."""

    plan: retrain.RetrainPlan
    extract: ExtractResult | None = None
    index: IndexResult | None = None
    inputs: SerializeAsAny[BaseModel] | None = None  # the demo's base and instructions (its RetrainInputs)
    stage1: TrainResult | None = None
    stage2: TrainResult | None = None
    decision: Decision | None = None
    seconds: float

    def summary(self) -> str:
        lines = [self.plan.summary()]
        if self.decision is None:
            in_service = self.plan.promoted
            if in_service:
                value = "unmeasured" if in_service.value is None else f"{in_service.value:.4f}"
                lines.append(f"in service: stage-2 run {in_service.stage2_run_id} ({in_service.metric} {value})")
            return "\n".join(lines)
        for part in (self.extract, self.index, self.stage1, self.stage2, self.decision):
            if part is not None:
                lines += part.summary().splitlines()
        return "\n".join(lines)


@stage_task(name="retrain-plan", timeout_seconds=HOUR)
def plan_task(cfg: Config, force: bool = False) -> retrain.RetrainPlan:
    """What is new since the last retrain."""
    return retrain.plan(cfg, force)


@stage_task(name="retrain-inputs", retries=1, timeout_seconds=6 * HOUR)
def inputs_task(cfg: Config) -> BaseModel | None:
    """The demo's own base model and instructions, on the demo configuration (else None)."""
    with prepared(cfg, "retrain") as made:
        return made


@stage_task(
    name="retrain-train",
    task_run_name="retrain-stage{stage}",
    retries=1,
    retry_delay_seconds=10,
    timeout_seconds=30 * DAY,
)
def candidate_task(cfg: Config, stage: int, init: str | None) -> TrainResult:
    """Train a stage of the candidate (a retry continues the same run)."""
    return retrain.train_candidate(cfg, stage, init)


@stage_task(name="retrain-decide", timeout_seconds=DAY)
def decide_task(cfg: Config, plan: retrain.RetrainPlan, stage1: TrainResult, stage2: TrainResult) -> Decision:
    """Evaluate candidate and promoted model on the frozen held-out set; promote when at least as good."""
    return retrain.decide(cfg, plan, stage1, stage2)


@flow(name="ibllm-retrain", log_prints=True)
def retrain_flow(
    config: Config | str | None = None, overrides: list[str] | None = None, force: bool = False
) -> RetrainResult:
    """Retrain on what is new since the last retrain and promote the candidate only if it is at least as good."""
    logger = get_run_logger()
    start = time.perf_counter()
    cfg = resolve_config(config, overrides)
    plan = plan_task(cfg, force)
    logger.info("%s", plan.summary())
    if not plan.has_work:
        result = RetrainResult(plan=plan, seconds=round(time.perf_counter() - start, 3))
        _decision_artifact(result)
        return result
    ext = extract_task(cfg)
    idx = index_task(cfg)
    inputs = inputs_task(cfg)
    s1 = candidate_task(cfg, 1, retrain.stage1_init(cfg))
    artifacts.training(s1)
    s2 = candidate_task(cfg, 2, s1.checkpoint)
    artifacts.training(s2)
    decision = decide_task(cfg, plan, s1, s2)
    result = RetrainResult(
        plan=plan,
        extract=ext,
        index=idx,
        inputs=inputs,
        stage1=s1,
        stage2=s2,
        decision=decision,
        seconds=round(time.perf_counter() - start, 3),
    )
    _decision_artifact(result)
    logger.info("%s", decision.summary())
    return result


def _decision_artifact(result: RetrainResult) -> None:
    """The promotion decision (or why there was nothing to do) as markdown."""
    d = result.decision
    lines = ["# Retrain", "", result.plan.summary(), ""]
    if d is not None:
        inc = d.incumbent
        lines += [
            f"**{'Promoted' if d.promoted else 'Not promoted'}**: {d.reason}",
            "",
            f"| model | stage-2 run | {d.metric} |",
            "|---|---|---:|",
            f"| candidate | {d.candidate.stage2_run_id} | {_value(d.candidate.value)} |",
        ]
        if inc is not None:
            lines.append(f"| in service | {inc.stage2_run_id} | {_value(inc.value)} |")
        lines += ["", f"Lineage: `{d.lineage}`"]
    create_markdown_artifact("\n".join(lines), key="retrain-decision", description="The promotion decision")


def _value(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def scheduled(cfg: Config, name: str = "retrain") -> RunnerDeployment:
    """The retrain flow over `cfg` as a deployment on `retrain.cron` in `retrain.timezone`, one run at a time
    (`ibllm retrain --serve` runs it in this process, as prefect.yaml's `retrain` does on a work pool)."""
    schedule = Cron(cfg.retrain.cron, timezone=cfg.retrain.timezone)
    config = cfg.model_dump(mode="json")
    return retrain_flow.to_deployment(name, schedules=[schedule], parameters={"config": config}, concurrency_limit=1)
