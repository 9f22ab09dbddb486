"""The divergence guard: a non-finite or spiking step stops the run before it is applied; the run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows import exits
from pipelines.config import with_settings
from pipelines.errors import RunDiverged
from pipelines.train import loop
from pipelines.train import stage as train
from pipelines.train.guard import Guard
from stores.catalog import Catalog
from stores.metrics import MetricLog
from stores.runs import Runs
from stores.workspace import Workspace
from tests.pipelines.train_fixture import train_config


def test_a_non_finite_loss_stops_the_run_at_its_last_good_checkpoint_and_resume_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = train_config(tmp_path, checkpoint_every_steps=4, epochs=1.5)
    real, calls = loop._accumulate, []

    def poisoned(session, run, micros):
        tokens, total = real(session, run, micros)
        calls.append(1)
        return tokens, total * float("nan") if len(calls) == 7 else total

    monkeypatch.setattr(loop, "_accumulate", poisoned)
    with pytest.raises(RunDiverged) as raised:
        train.run(cfg, 1, local=True)
    runs = Runs.of_stage(Workspace(cfg.workspace), 1)
    (run_id,) = runs.run_ids()
    said = str(raised.value)
    assert said.startswith(f"stage 1 run {run_id} diverged at step 7: loss nan (a non-finite loss)"), said
    assert "newest checkpoint, step 4, is the last good one: `ibllm train --stage 1 --resume`" in said
    assert exits.exit_code(raised.value) == exits.DIVERGED == 8
    assert runs.record(run_id).status == "diverged" and runs.latest(run_id).step == 4
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in runs.latest(run_id).history)
    monkeypatch.setattr(loop, "_accumulate", real)
    done = train.run(cfg, 1, resume=True, local=True)
    assert (done.run_id, done.resumed_from, done.status) == (run_id, 4, "complete")
    assert runs.divergence(run_id) is None  # the new attempt cleared the old one's record
    steps = MetricLog(runs.ws, runs.run_folder(run_id)).read().column("step").to_pylist()
    assert steps == list(range(1, done.total_steps + 1))
    catalog = Catalog(runs.ws)  # `ibllm catalog` sees the history and the run
    assert catalog.query("SELECT count(*), count(DISTINCT step), max(attempt) FROM training_metrics") == [
        (done.total_steps, done.total_steps, 2)
    ]
    assert catalog.query("SELECT run_id, status, attempts, steps FROM runs") == [(run_id, "complete", 2, done.steps)]


def test_a_learning_rate_too_large_diverges_and_the_run_resumes_from_its_last_good_checkpoint(tmp_path: Path) -> None:
    """Twelve good steps, then the learning rate raised a million-fold: the next steps blow up and the guard stops
    the run before applying a bad one; its newest checkpoint is still step 12, and the run resumes from it."""
    cfg = train_config(tmp_path, checkpoint_every_steps=12, epochs=2)
    first = train.run(cfg, 1, local=True, max_steps=12)
    with pytest.raises(RunDiverged, match=r"diverged at step \d+: (loss|gradient norm) ") as raised:
        train.run(with_settings(cfg, {"train.stage1.blr": 1e6, "train.max_loss_ratio": 10}), 1, resume=True, local=True)
    runs = Runs.of_stage(Workspace(cfg.workspace), 1)
    assert raised.value.step > 12 and runs.latest(first.run_id).step == 12  # never a checkpoint of a bad step
    record = json.loads((Path(runs.run_folder(first.run_id)) / "run.json").read_text())
    assert record["status"] == "diverged"
    done = train.run(cfg, 1, resume=True, local=True)
    assert (done.run_id, done.resumed_from, done.status) == (first.run_id, 12, "complete")
    assert done.final_loss < done.losses[0]


def test_a_spike_is_judged_against_the_median_of_recent_steps() -> None:
    guard = Guard(10.0)
    guard.seen([1.0] * 5)
    guard.check(6, 50.0, 1.0)  # too little history to judge a spike
    guard.seen([1.0] * 10)
    guard.check(17, 9.9, 1.0)
    with pytest.raises(Exception, match=r"step 18: loss 10\.5 \(more than train.max_loss_ratio 10 x the median 1\)"):
        guard.check(18, 10.5, 1.0)
    with pytest.raises(Exception, match=r"step 19: gradient norm inf"):
        guard.check(19, 1.0, float("inf"))
    Guard(None).check(1, 1e9, 1.0)  # spikes unchecked; non-finite values still are
    with pytest.raises(Exception, match="non-finite loss"):
        Guard(None).check(1, float("nan"), 1.0)
