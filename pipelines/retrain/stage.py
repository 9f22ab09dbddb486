"""Retrain: find the shards new since the last retrain, extract, index, train both stages, promote if as good."""

from __future__ import annotations

import hashlib
import logging
import math

from pydantic import BaseModel

from model.imagebind.encoder import encoder_id_for
from pipelines.config import Config, dump_config, with_settings
from pipelines.errors import InputError
from pipelines.evaluate import benchmark
from pipelines.evaluate import stage as evaluate
from pipelines.extract import stage as extract
from pipelines.train import stage as train
from pipelines.train.data import is_heldout
from pipelines.train.setup import stage1_features
from pipelines.train.stage import TrainResult
from stores import features, registry
from stores.features import read_uids
from stores.index import current_version, read_meta
from stores.ledger import Ledger
from stores.registry import METRIC as HELD_OUT
from stores.registry import Decision, HeldOut, Lineage, ModelRef, Promotion
from stores.runs import Runs
from stores.workspace import Workspace

log = logging.getLogger(__name__)


class DataShard(BaseModel):
    """One committed download shard, as extraction names it (retry rounds prefixed `retry-NN-`)."""

    source: str
    shard: str
    fingerprint: str


class RetrainPlan(BaseModel):
    """What is new since the last retrain, and whether there is anything to do."""

    encoder_id: str
    shards: list[DataShard]
    new: list[DataShard]
    removed: list[DataShard]
    since: str | None
    promoted: Promotion | None
    force: bool
    has_work: bool
    reason: str

    def summary(self) -> str:
        since = f"since decision {self.since}" if self.since else "(no earlier retrain)"
        return (
            f"retrain plan: {len(self.shards)} downloaded shard(s), {len(self.new)} new and {len(self.removed)} "
            f"gone {since}: {'work to do' if self.has_work else 'nothing to do'} ({self.reason})"
        )


def current_shards(cfg: Config, ws: Workspace) -> list[DataShard]:
    """Every committed download shard of the configured sources (first round and retry rounds)."""
    return [
        DataShard(source=s.name, shard=it["shard"], fingerprint=it["input"])
        for s in cfg.sources
        for it in extract.shard_items(ws, s.name)
    ]


def seen_shards(ws: Workspace, decision: Decision | None) -> dict[tuple[str, str], str]:
    """(source, shard) -> fingerprint of the shards the last decided candidate was trained with."""
    lineage = registry.read_lineage(ws, decision.candidate.stage2_run_id) if decision else None
    if lineage is None:
        return {}
    return {(src, shard): fp for src, shards in lineage.data.items() for shard, fp in shards.items()}


def plan(cfg: Config, force: bool = False) -> RetrainPlan:
    """The downloaded shards new (or changed, or gone) since the last retrain's lineage; all of them before the
    first. There is work when something changed, when nothing is promoted yet, or when forced."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    encoder_id = encoder_id_for(cfg.model.imagebind, cfg.model.imagebind_checkpoint, cfg.seed)
    shards = current_shards(cfg, ws)
    last = registry.last_decision(ws)
    seen = seen_shards(ws, last)
    new = [s for s in shards if seen.get((s.source, s.shard)) != s.fingerprint]
    present = {(s.source, s.shard) for s in shards}
    removed = [DataShard(source=k[0], shard=k[1], fingerprint=fp) for k, fp in sorted(seen.items()) if k not in present]
    incumbent = registry.promoted(ws)
    if not shards:
        has_work, reason = False, "no downloaded shards: run ingest, curate and download first"
    elif incumbent is None:
        has_work, reason = True, "no model promoted yet"
    elif force:
        has_work, reason = True, "forced"
    elif new or removed:
        has_work, reason = True, f"{len(new)} new or changed shard(s), {len(removed)} gone"
    else:
        has_work, reason = False, f"no new shards; stage-2 run {incumbent.stage2_run_id} stays in service"
    return RetrainPlan(
        encoder_id=encoder_id,
        shards=shards,
        new=new,
        removed=removed,
        since=last.stamp if last else None,
        promoted=incumbent,
        force=force,
        has_work=has_work,
        reason=reason,
    )


def stage1_init(cfg: Config) -> str | None:
    """Where stage 1 starts: the promoted stage-1 checkpoint (continued training), None before the first."""
    incumbent = registry.promoted(Workspace(cfg.workspace, cfg.storage_options))
    return incumbent.stage1_checkpoint if incumbent else None


def train_candidate(cfg: Config, stage: int, init: str | None) -> TrainResult:
    """Train one stage of the candidate from `init`; a complete run of the same job is reused, an unfinished one
    continued (so a retrain that died mid-way picks up where it stopped)."""
    return train.run(cfg, stage, init=init, reuse=True, local=cfg.retrain.local)


def heldout_set(cfg: Config) -> HeldOut:
    """The frozen held-out uids; the first call freezes up to `retrain.heldout_size` of the held-out split
    (`train.holdout`), chosen by the uid hash, so that new data never changes the yardstick."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    held = registry.frozen_heldout(ws)
    if held is not None:
        if held.holdout != cfg.train.holdout:
            log.warning(
                "train.holdout is %s but the held-out set was frozen at %s: some of its rows may be trained on",
                cfg.train.holdout,
                held.holdout,
            )
        return held
    encoder_id = encoder_id_for(cfg.model.imagebind, cfg.model.imagebind_checkpoint, cfg.seed)
    uids = {
        u for f in stage1_features(cfg, ws, encoder_id) for u in read_uids(ws, f) if is_heldout(u, cfg.train.holdout)
    }
    chosen = sorted(uids, key=lambda u: (hashlib.sha256(u.encode()).hexdigest(), u))[: cfg.retrain.heldout_size]
    if len(chosen) < 2:
        raise InputError(f"{len(chosen)} held-out rows at train.holdout {cfg.train.holdout}: raise it to retrain")
    return registry.freeze_heldout(ws, chosen, cfg.train.holdout, encoder_id)


def verdict(
    candidate: float, incumbent: float | None, incumbent_run: str | None = None, metric: str = HELD_OUT
) -> tuple[bool, str]:
    """(promote, why): the candidate goes into service when it is at least as good as the incumbent: a held-out
    loss at most the incumbent's, a benchmark score at least the incumbent's."""
    what, lower = ("held-out loss", True) if metric == HELD_OUT else (f"{metric} score", False)
    if not math.isfinite(candidate):
        return False, f"the candidate's {what} is {candidate}"
    if incumbent is None:
        return True, f"{what} {candidate:.4f}; nothing was promoted before"
    if not math.isfinite(incumbent):
        return True, f"{what} {candidate:.4f}; the promoted stage-2 run {incumbent_run} scores {incumbent}"
    if (candidate <= incumbent) if lower else (candidate >= incumbent):
        sign = "<=" if lower else ">="
        return True, f"{what} {candidate:.4f} {sign} {incumbent:.4f} of stage-2 run {incumbent_run}"
    sign = ">" if lower else "<"
    return False, f"{what} {candidate:.4f} {sign} {incumbent:.4f} of stage-2 run {incumbent_run}, which stays"


def lineage(cfg: Config, plan: RetrainPlan, stage1: TrainResult, stage2: TrainResult) -> Lineage:
    """Where the candidate comes from: the shards extracted for it, features, index, config, checkpoints."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    enc = plan.encoder_id
    data: dict[str, dict[str, str]] = {}
    for s in plan.shards:
        if Ledger.reader(ws, "extract", f"{enc}.{s.source}").is_current(s.shard, s.fingerprint):
            data.setdefault(s.source, {})[s.shard] = s.fingerprint
    parts, fingerprints = {}, {}
    for src in cfg.sources:
        files, fingerprint = features.feature_files(ws, enc, src.name)
        if files:
            parts[src.name], fingerprints[src.name] = [ws.as_url(f) for f in files], fingerprint
    meta = read_meta(ws, cfg.index.name)
    built = (
        {
            "name": cfg.index.name,
            "version": current_version(ws, cfg.index.name),
            "fingerprint": meta.get("fingerprint"),
            "count": meta.get("count"),
        }
        if meta
        else None
    )
    job1 = _job(ws, 1, stage1.run_id)
    job2 = _job(ws, 2, stage2.run_id)
    text = dump_config(cfg)
    return Lineage(
        stage2_run_id=stage2.run_id,
        stage1_run_id=stage1.run_id,
        created_at=registry.now(),
        data=data,
        features=registry.FeatureLineage(encoder_id=enc, parts=parts, fingerprints=fingerprints),
        index=built,
        instructions=list(job2.get("instruction_files") or []),
        parent_checkpoint=job1.get("init_checkpoint"),
        stage1_checkpoint=stage1.checkpoint,
        stage2_checkpoint=stage2.checkpoint,
        config=text,
        config_digest=registry.digest(text),
    )


def _job(ws: Workspace, stage: int, run_id: str) -> dict:
    rec = Runs.of_stage(ws, stage).record(run_id)
    return rec.job if rec else {}


def _measure(cfg: Config, checkpoint: str, held: HeldOut | None) -> tuple[float, int]:
    """(the yardstick's value for `checkpoint`, the examples or questions it was measured on)."""
    r = cfg.retrain
    cfg = with_settings(cfg, {"infer.checkpoint": checkpoint, "infer.batch": r.eval_batch_size})
    if held is not None:
        result = evaluate.run(cfg, 2, batch_size=r.eval_batch_size, uids=held.uids)
        return result.loss, result.examples
    name, _, part = r.metric.partition(":")
    assert r.metric_data is not None  # the config requires it with a benchmark metric
    scored = benchmark.run(cfg, name, r.metric_data)
    rows = {row.subtask: row.score for row in scored.rows}
    if part:
        if part not in rows:
            raise InputError(f"retrain.metric {r.metric}: {r.metric_data} has no {part} questions")
        return rows[part], scored.questions
    if name == "mme":
        return rows.get("perception", 0.0) + rows.get("cognition", 0.0), scored.questions
    return rows["all"], scored.questions


def decide(cfg: Config, plan: RetrainPlan, stage1: TrainResult, stage2: TrainResult) -> Decision:
    """Measure the candidate and the promoted model with `retrain.metric` (the frozen held-out set's loss, or a
    benchmark's score), promote the candidate when it is at least as good, and record lineage, promotion and
    decision, in that order (the decision is the commit)."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    metric = cfg.retrain.metric
    held = heldout_set(cfg) if metric == HELD_OUT else None
    value, examples = _measure(cfg, stage2.checkpoint, held)
    candidate = ModelRef(
        stage1_run_id=stage1.run_id,
        stage1_checkpoint=stage1.checkpoint,
        stage2_run_id=stage2.run_id,
        stage2_checkpoint=stage2.checkpoint,
        value=value,
    )
    log.info("candidate stage-2 run %s: %s %.4f on %d examples", stage2.run_id, metric, value, examples)
    promoted = registry.promoted(ws)
    incumbent = None
    if promoted is not None:
        same = promoted.stage2_checkpoint == stage2.checkpoint
        served = value if same else _measure(cfg, promoted.stage2_checkpoint, held)[0]
        incumbent = ModelRef(**promoted.model_dump(include=set(ModelRef.model_fields)) | {"value": served})
        log.info("promoted stage-2 run %s: %s %.4f", promoted.stage2_run_id, metric, served)
    promote, reason = verdict(
        value, incumbent.value if incumbent else None, incumbent.stage2_run_id if incumbent else None, metric
    )
    yardstick = held.digest if held else hashlib.sha256(f"{metric} {cfg.retrain.metric_data}".encode()).hexdigest()
    stamp = registry.new_stamp()
    where = registry.write_lineage(ws, lineage(cfg, plan, stage1, stage2))
    if promote:
        registry.promote(ws, Promotion(**candidate.model_dump(), promoted_at=registry.now(), decision=stamp))
    decision = Decision(
        stamp=stamp,
        decided_at=registry.now(),
        promoted=promote,
        reason=reason,
        candidate=candidate,
        metric=metric,
        incumbent=incumbent,
        heldout_digest=yardstick,
        heldout_examples=examples,
        new_shards=len(plan.new),
        lineage=ws.as_url(where),
    )
    registry.record_decision(ws, decision)
    log.info("%s", decision.summary())
    return decision
