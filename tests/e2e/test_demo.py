"""The demo end to end: through the Prefect flow in a test harness, and as `ibllm demo` in a fresh process."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.pipeline import PipelineResult, pipeline_flow
from flows.retrain import retrain_flow
from pipelines.config import Config

# training sized for 40 synthetic rows (about 20-30 features): every stage runs, quickly; learning is the slow test's.
# A held-out share of 0.4: which images download depends on the machine's load, and with 0.2 one set of 27 features
# held out a single caption (by uid hash), too few to evaluate.
SMALL_TRAINING = [
    "train.holdout=0.4",
    "train.stage0.dim=32",
    "train.stage0.n_layers=2",
    "train.stage0.intermediate_size=64",
    "train.stage0.steps=30",
    "train.stage0.texts=300",
    "train.stage1.global_batch_size=4",
    "train.stage1.epochs=2",
    "train.stage1.warmup_epochs=0",
    "train.stage2.global_batch_size=4",
    "train.stage2.epochs=1",
    "train.stage2.warmup_epochs=0",
]


def test_demo_flow_runs_every_stage(prefect_harness: None, config: Config) -> None:
    result = pipeline_flow(config, SMALL_TRAINING)
    assert isinstance(result, PipelineResult)
    cur = result.curation
    assert cur.synthetic.rows == 40 and cur.synthetic.served["ok"] == cur.synthetic.good
    assert cur.ingest.sources[0].rows == 40
    kept = cur.curate.sources[0].rows_out
    assert 0 < kept < 40
    (dl,) = cur.download.sources
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
        "== stage 0",
        "== stage 1",
        "== stage 2",
        "== evaluate",
        "== what the model says",
        "== MME benchmark",
    ):
        assert block in text
    assert result.base.trained and result.stage1.steps == result.stage1.total_steps > 0
    assert result.instructions.images > 0 and result.stage2.steps == result.stage2.total_steps > 0
    assert result.check.heldout == result.evaluation.examples or result.check.heldout >= 2
    again = pipeline_flow(config, SMALL_TRAINING)  # a rerun redoes nothing
    assert again.curation.ingest.sources[0].written == 0 and again.curation.curate.sources[0].skipped
    assert again.curation.download.sources[0].new_shards == 0 and again.extract.sources[0].new_shards == 0
    assert not again.index.built
    assert not again.base.trained
    assert (again.stage1.run_id, again.stage2.run_id) == (result.stage1.run_id, result.stage2.run_id)
    first = retrain_flow(config, SMALL_TRAINING)  # nothing promoted yet: the pipeline's runs are reused, promoted
    assert first.decision is not None and first.decision.promoted
    assert first.stage2.run_id == result.stage2.run_id
    idle = retrain_flow(config, SMALL_TRAINING)  # no new shards: no work, nothing promoted
    assert not idle.plan.has_work and idle.decision is None
    keys = {a.key for a in asyncio.run(_artifacts())}
    assert {
        "curation-funnel",
        "curation-report",
        "training-stage1",
        "training-stage2",
        "evaluation-stage1",
        "demo-check",
        "retrain-decision",
    } <= keys


async def _artifacts() -> list:
    async with get_client() as client:
        return await client.read_artifacts()


@pytest.mark.slow
def test_ibllm_demo_learns_to_see_the_colour(tmp_path: Path) -> None:
    """`ibllm demo` as `make demo` runs it, on the embedded default: the model really learns from the features; and
    in a copy of its workspace (`cp -a`, the original moved away) the demo reuses everything, since records name
    their files relative to the root: nothing is ingested, downloaded, trained or asked again.

    With IBLLM_DEMO_WORKSPACE (CI: the workspace `make demo` of this checkout has just made) the demo is not trained
    a second time: the copy is of that workspace, and the learning is asserted on the copy's result."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    made = os.environ.get("IBLLM_DEMO_WORKSPACE")
    original = Path(made) if made else tmp_path / "ws"
    if not made:
        fresh = _demo(original, env)
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        # the console: a short log with a progress line at least every 30 s (third-party chatter filtered;
        # --verbose brings it back)
        lines = fresh.stderr.splitlines()
        assert len(lines) < 60, fresh.stderr
        assert longest_silence(lines) <= 30, fresh.stderr
    trained = [sorted(p.name for p in (original / "checkpoints" / f"stage{s}").iterdir()) for s in (1, 2)]
    shutil.copytree(original, tmp_path / "copy", symlinks=True)
    if not made:
        original.rename(tmp_path / "gone")
    proc = _demo(tmp_path / "copy", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) < 60, proc.stderr
    result = json.loads(proc.stdout)
    assert [s["written"] for s in result["curation"]["ingest"]["sources"]] == [0]
    assert [[result["stage1"]["run_id"]], [result["stage2"]["run_id"]]] == trained  # reused, not trained again
    assert result["stage2"]["checkpoint"].startswith(str(tmp_path / "copy"))
    assert result["mme"]["asked_now"] == 0 and result["mme"]["resumed"] == 32
    assert "reusing it" in proc.stderr and f"{original}/" not in proc.stdout
    assert result["curation"]["synthetic"]["rows"] == 500
    assert result["curation"]["download"]["sources"][0]["succeeded"] > 0
    check = result["check"]
    assert check["heldout"] >= 40
    # Which slow downloads finish depends on the machine's load, so the training and held-out sets vary between runs:
    # colour accuracy measured 0.86-0.99 over 76-86 held-out images, against 1/8 by chance.
    assert check["colour_accuracy"] >= 0.8, check  # the caption names the shape's colour
    assert check["shuffled_accuracy"] <= 0.3, check  # near chance (1/8) with another image's feature
    assert check["answer_accuracy"] >= 0.8, check  # stage 2 answers the question
    # the second turn of each conversation asks the shape: trained on whole conversations, stage 2 follows it (the
    # tiny encoder tells shapes apart less well than colours: 33% right measured, against 17% by chance)
    assert check["followup_on_topic"] >= 0.9, check
    losses = result["stage1"]["losses"]
    assert sum(losses[-50:]) / 50 < 0.8 * sum(losses[:50]) / 50  # stage-1 loss falls
    assert result["evaluation"]["grounding_gap"] > 0.1
    asked = result["answers"]["asked"]  # a held-out picture (two turns) and an audio clip, without and with cache
    assert [(a["cache"], a["input"].endswith(".wav"), a["turn"]) for a in asked] == [
        (False, False, 1),
        (False, False, 2),
        (False, True, 1),
        (True, False, 1),
        (True, False, 2),
        (True, True, 1),
    ]
    assert all(a["answer"] for a in asked)
    # the demo's small MME: 16 yes/no questions in each of two subtasks, every one asked and scored. How many answers
    # read as yes or no varies with the run's training data (0 and 21 of 32 unparseable measured): the tiny model
    # sees one yes/no turn per conversation, so the answers' format is not asserted.
    mme = result["mme"]
    assert [r["subtask"] for r in mme["rows"]] == ["existence", "color", "perception"] and mme["questions"] == 32
    assert mme["asked_now"] + mme["resumed"] == 32 and mme["errors"] == 0
    assert (tmp_path / "copy" / "synthetic" / "metadata.parquet").is_file()
    assert Path(result["report"]["html"]).is_file()


def _demo(workspace: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`ibllm demo --json` on `workspace`, as `make demo` runs it."""
    command = [sys.executable, "-m", "flows.cli", "demo", "--json", "--workspace", str(workspace)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)


def longest_silence(lines: list[str]) -> int:
    """The most seconds between two consecutive timestamped (HH:MM:SS) lines of a log."""
    stamps = []
    for line in lines:
        m = re.match(r"(\d\d):(\d\d):(\d\d) ", line)
        if m:
            stamps.append(int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]))
    return max(((b - a) % 86400 for a, b in itertools.pairwise(stamps)), default=0)
