"""Every training run of the workspace, one row each: status, steps, losses, settings hash and parent."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from typing import Any

from pydantic import BaseModel

from pipelines.errors import InputError
from stores.runs import EVALUATIONS, RunRecord, Runs
from stores.workspace import Workspace

STAGES = (1, 2)
_PARENT = re.compile(r"checkpoints/stage\d+/([^/]+)/")


class RunRow(BaseModel):
    """One training run."""

    stage: int
    run_id: str
    status: str
    attempts: int
    steps: int | None
    planned_steps: int | None
    final_loss: float | None
    best_heldout_loss: float | None
    settings_hash: str
    parent: str | None  # the run (or checkpoint) it started from: stage 2's stage-1 run
    started: str


class RunsResult(BaseModel):
    """The runs of every stage, oldest first."""

    runs: list[RunRow]

    def summary(self) -> str:
        if not self.runs:
            return "no training runs yet: `ibllm train --stage 1` starts one"
        lines = [
            f"{'stage':<6}{'run':<22}{'status':<10}{'steps':>12}  {'final loss':>10}  {'best held-out':>13}  "
            f"{'settings':<10}parent"
        ]
        for r in self.runs:
            steps = f"{r.steps or 0}/{r.planned_steps or '?'}"
            lines.append(
                f"{r.stage:<6}{r.run_id:<22}{r.status:<10}{steps:>12}  {_num(r.final_loss):>10}  "
                f"{_num(r.best_heldout_loss):>13}  {r.settings_hash:<10}{r.parent or ''}"
            )
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def settings_hash(record: RunRecord, ws: Workspace) -> str:
    """A short hash of what a run was made from and how (its job but for the run id and the workspace's place)."""
    job = ws.portable(record.job)[0] | {"run_id": None, "workspace": None}
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:8]


def row(
    ws: Workspace, stage: int, run_id: str, record: RunRecord, heldout: list[tuple[int | None, float]] | None = None
) -> RunRow:
    """The listing's row of a run (`heldout`: its `heldout_losses`, when the caller read them already)."""
    runs = Runs.of_stage(ws, stage)
    losses = [loss for _, loss in (heldout_losses(ws, stage, run_id) if heldout is None else heldout)]
    parent = record.get("init_checkpoint")
    found = _PARENT.search(ws.to_record(parent)) if parent else None
    return RunRow(
        stage=stage,
        run_id=run_id,
        status=record.status,
        attempts=record.attempts,
        steps=record.steps if record.steps is not None else _latest_step(runs, run_id),
        planned_steps=record.get("total_steps"),
        final_loss=record.final_loss,
        best_heldout_loss=min(losses) if losses else None,
        settings_hash=settings_hash(record, ws),
        parent=found[1] if found else parent,
        started=f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]} {run_id[9:11]}:{run_id[11:13]}:{run_id[13:15]}",
    )


def heldout_losses(ws: Workspace, stage: int, run_id: str) -> list[tuple[int | None, float]]:
    """A run's recorded held-out losses, each with the step of the checkpoint it was measured on (None: unknown)."""
    out = []
    for path in ws.glob(posixpath.join(Runs.of_stage(ws, stage).run_folder(run_id), EVALUATIONS, "*.json")):
        doc = json.loads(ws.read_bytes(path))
        loss, where = doc.get("loss"), str(doc.get("checkpoint") or "")
        if isinstance(loss, int | float):
            out.append((int(where.split("step-")[1].split("/")[0]) if "step-" in where else None, float(loss)))
    return out


def _latest_step(runs: Runs, run_id: str) -> int | None:
    latest = runs.latest(run_id)
    return latest.step if latest else None


def all_runs(ws: Workspace) -> list[tuple[int, str, RunRecord]]:
    """(stage, run id, record) of every run, stage by stage, oldest first."""
    out = []
    for stage in STAGES:
        runs = Runs.of_stage(ws, stage)
        for run_id in runs.run_ids():
            record = runs.record(run_id)
            if record is not None:
                out.append((stage, run_id, record))
    return out


def find(
    ws: Workspace, given: str, every: list[tuple[int, str, RunRecord]] | None = None
) -> tuple[int, str, RunRecord]:
    """The run a user named: its id, or a part of it that names one run only (InputError otherwise), among `every`
    run (default: `all_runs`)."""
    every = all_runs(ws) if every is None else every
    exact = [r for r in every if r[1] == given]
    matches = exact or [r for r in every if given in r[1]]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(r[1] for r in every[-5:]) or "none yet"
        raise InputError(f"no training run {given!r} in {ws.root} (the newest: {known}; `ibllm runs` lists them)")
    raise InputError(f"{given!r} names {len(matches)} runs ({', '.join(r[1] for r in matches)}): give more of the id")


def listing(ws: Workspace) -> RunsResult:
    """Every run of every stage."""
    return RunsResult(runs=[row(ws, stage, run_id, rec) for stage, run_id, rec in all_runs(ws)])


def flat_settings(record: RunRecord, ws: Workspace) -> dict[str, Any]:
    """A run's job as dotted settings (nested sections flattened; workspace files relative to the root)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", ws.portable(record.job)[0])
    for key in ("run_id", "workspace", "notes"):
        out.pop(key, None)
    return out
