"""The model registry in the workspace: the promoted model, every retrain decision, lineage, the frozen held-out set."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from stores.workspace import Workspace

REGISTRY = "registry"
PROMOTED = "promoted.json"
HELDOUT = "heldout.json"
DECISIONS = "decisions"
LINEAGE = "lineage"
METRIC = "heldout_caption_loss"
CHECKPOINTS = ("stage1_checkpoint", "stage2_checkpoint")
M = TypeVar("M", bound=BaseModel)


class ModelRef(BaseModel):
    """A stage-1 checkpoint and the stage-2 checkpoint trained from it, with its value of the metric."""

    stage1_run_id: str
    stage1_checkpoint: str
    stage2_run_id: str
    stage2_checkpoint: str
    value: float | None = Field(None, description="the metric on the frozen held-out set (lower is better)")


class Promotion(ModelRef):
    """The model in service (`registry/promoted.json`)."""

    metric: str = METRIC
    promoted_at: str
    decision: str = Field(description="stamp of the decision that promoted it")


class Decision(BaseModel):
    """One retrain's verdict (`registry/decisions/<stamp>.json`): the candidate, the incumbent, and why."""

    stamp: str
    decided_at: str
    promoted: bool
    reason: str
    metric: str = METRIC
    candidate: ModelRef
    incumbent: ModelRef | None = None
    heldout_digest: str
    heldout_examples: int
    new_shards: int
    lineage: str = Field(description="workspace path of the candidate's lineage record")

    def summary(self) -> str:
        verdict = "promoted" if self.promoted else "not promoted"
        return f"decision {self.stamp}: stage-2 run {self.candidate.stage2_run_id} {verdict}: {self.reason}"


class FeatureLineage(BaseModel):
    """The feature set a run trained on: the encoder and, per source, the parts and their fingerprint."""

    encoder_id: str
    parts: dict[str, list[str]]
    fingerprints: dict[str, str]


class Lineage(BaseModel):
    """Where a stage-2 checkpoint comes from (`registry/lineage/<stage2 run id>.json`)."""

    stage2_run_id: str
    stage1_run_id: str
    created_at: str
    data: dict[str, dict[str, str]] = Field(description="source -> download shard -> fingerprint, as extracted")
    features: FeatureLineage
    index: dict[str, Any] | None = Field(None, description="name, version and fingerprint of the index in service")
    instructions: list[str] = Field(default_factory=list, description="stage 2's instruction files")
    parent_checkpoint: str | None = Field(None, description="what stage 1 started from (the promoted stage 1)")
    stage1_checkpoint: str
    stage2_checkpoint: str
    config: str = Field(description="the resolved configuration, as YAML")
    config_digest: str


class HeldOut(BaseModel):
    """The held-out uids every candidate is measured on, frozen at the first retrain (`registry/heldout.json`)."""

    uids: list[str]
    digest: str
    holdout: float = Field(description="train.holdout when frozen: these rows are never trained on at this share")
    encoder_id: str
    created_at: str


def now() -> str:
    """The time as ISO 8601 UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_stamp() -> str:
    """A decision stamp: UTC time to the microsecond, so stamps sort in the order they were made."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")


def digest(text: str) -> str:
    """A short sha256 of a text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def uids_digest(uids: list[str]) -> str:
    """A short digest of a uid list, order included."""
    return digest("\n".join(uids))


def path(ws: Workspace, *parts: str) -> str:
    """A path under the registry folder of the workspace."""
    return ws.path(REGISTRY, *parts)


def promoted(ws: Workspace) -> Promotion | None:
    """The model in service, or None when nothing was ever promoted (its checkpoints as locations in `ws`)."""
    found = _read(ws, path(ws, PROMOTED), Promotion)
    if found is None:
        return None
    return found.model_copy(update={k: ws.from_record(getattr(found, k)) for k in CHECKPOINTS})


def promote(ws: Workspace, promotion: Promotion) -> None:
    """Put a model in service (one atomic write of `promoted.json`; checkpoints relative to the workspace, so that a
    copied or moved workspace serves its own)."""
    _write(
        ws,
        path(ws, PROMOTED),
        promotion.model_copy(update={k: ws.to_record(getattr(promotion, k)) for k in CHECKPOINTS}),
    )


def record_decision(ws: Workspace, decision: Decision) -> str:
    """Write a decision record (the commit point of a retrain: written after lineage and promotion)."""
    target = path(ws, DECISIONS, f"{decision.stamp}.json")
    _write(ws, target, _decision_located(decision, ws.to_record))  # workspace files relative to the root
    return target


def decisions(ws: Workspace) -> list[Decision]:
    """Every recorded decision, oldest first."""
    return [_read_decision(ws, p) for p in ws.glob(path(ws, DECISIONS, "*.json"))]


def last_decision(ws: Workspace) -> Decision | None:
    """The newest decision, or None before the first retrain."""
    files = ws.glob(path(ws, DECISIONS, "*.json"))
    return _read_decision(ws, files[-1]) if files else None


def _read_decision(ws: Workspace, target: str) -> Decision:
    return _decision_located(Decision.model_validate_json(ws.read_bytes(target)), ws.locate)


def _decision_located(decision: Decision, where: Callable[[str], str]) -> Decision:
    """The decision with `where` applied to its lineage record and its models' checkpoints."""
    models = {k: _ref_located(getattr(decision, k), where) for k in ("candidate", "incumbent")}
    return decision.model_copy(update={"lineage": where(decision.lineage), **models})


def _ref_located(ref: ModelRef | None, where: Callable[[str], str]) -> ModelRef | None:
    return None if ref is None else ref.model_copy(update={k: where(getattr(ref, k)) for k in CHECKPOINTS})


def lineage_path(ws: Workspace, stage2_run_id: str) -> str:
    """Where the lineage of a stage-2 run is recorded."""
    return path(ws, LINEAGE, f"{stage2_run_id}.json")


def write_lineage(ws: Workspace, lineage: Lineage) -> str:
    """Record the lineage of a stage-2 run (replacing an earlier record of the same run)."""
    target = lineage_path(ws, lineage.stage2_run_id)
    _write(ws, target, _located(lineage, ws.to_record))  # workspace files relative to the root
    return target


def read_lineage(ws: Workspace, stage2_run_id: str) -> Lineage | None:
    """The lineage of a stage-2 run, or None when none was recorded."""
    found = _read(ws, lineage_path(ws, stage2_run_id), Lineage)
    return None if found is None else _located(found, ws.locate)


def _located(lineage: Lineage, where: Callable[[str], str]) -> Lineage:
    """The lineage with `where` applied to each location it names (its checkpoints and instruction files)."""
    names = ("parent_checkpoint", *CHECKPOINTS)
    update: dict[str, Any] = {k: where(getattr(lineage, k)) for k in names if getattr(lineage, k)}
    parts = {source: [where(f) for f in files] for source, files in lineage.features.parts.items()}
    update["features"] = lineage.features.model_copy(update={"parts": parts})
    return lineage.model_copy(update=update | {"instructions": [where(f) for f in lineage.instructions]})


def frozen_heldout(ws: Workspace) -> HeldOut | None:
    """The frozen held-out set, or None before the first retrain froze it."""
    return _read(ws, path(ws, HELDOUT), HeldOut)


def freeze_heldout(ws: Workspace, uids: list[str], holdout: float, encoder_id: str) -> HeldOut:
    """Freeze the held-out set; an existing frozen set is kept and returned (it never changes)."""
    existing = frozen_heldout(ws)
    if existing is not None:
        return existing
    held = HeldOut(uids=uids, digest=uids_digest(uids), holdout=holdout, encoder_id=encoder_id, created_at=now())
    _write(ws, path(ws, HELDOUT), held)
    return held


def _read(ws: Workspace, target: str, model: type[M]) -> M | None:
    return model.model_validate_json(ws.read_bytes(target)) if ws.exists(target) else None


def _write(ws: Workspace, target: str, doc: BaseModel) -> None:
    ws.write_bytes(target, json.dumps(doc.model_dump(mode="json"), indent=1).encode())
