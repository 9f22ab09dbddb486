"""Training: schedule, batches independent of the worker count, frozen sets untouched, exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.llm.checkpoint import read_checkpoint
from model.llm.phases import phase_parameters
from model.llm.tokenizer import load_tokenizer
from pipelines.config import with_settings
from pipelines.errors import InputError
from pipelines.train import stage as train
from pipelines.train.data import CAPTION_PROMPT, Example, ExampleList, Plan, count_split, step_batches
from pipelines.train.schedule import Hyper, lr_at
from pipelines.train.setup import build_model, resolve_job
from stores.metrics import MetricLog
from stores.workspace import Workspace
from tests.pipelines.train_fixture import train_config

ROOT = Path(__file__).resolve().parents[2]


def test_lr_warms_up_linearly_then_follows_a_half_cosine() -> None:
    h = Hyper(lr=1.0, min_lr=0.1, weight_decay=0.0, warmup_steps=4, total_steps=14)
    assert [lr_at(s, h) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, h) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(14, h) == pytest.approx(0.1)


# run.json's job, as every earlier run recorded it: reuse (`Runs.same_inputs`) compares these fields
RECORD_FIELDS = [
    "stage",
    "run_id",
    "workspace",
    "storage_options",
    "seed",
    "llm",
    "tokenizer",
    "base_llama",
    "init_checkpoint",
    "encoder_id",
    "feature_files",
    "instruction_files",
    "global_batch",
    "accum",
    "max_words",
    "lr",
    "min_lr",
    "weight_decay",
    "warmup_steps",
    "total_steps",
    "steps_per_epoch",
    "examples",
    "clip_grad",
    "checkpoint_every",
    "use_gpu",
    "workers",
    "shuffle_buffer",
    "holdout",
    "conversation",
    "max_steps",
    "parallel",
    "micro_batch",
    "base_dtype",
    "fused_kernels",
    "activation_checkpointing",
    "notes",
]


def test_the_job_travels_whole_and_records_the_fields_of_earlier_runs(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, micro_batch=4, clip_grad=0.5)
    job = resolve_job(cfg, Workspace(cfg.workspace), 1, "r", max_steps=5)
    record = job.record()
    assert list(record) == RECORD_FIELDS
    sc = cfg.train.stage1
    assert (record["global_batch"], record["accum"], record["micro_batch"], record["lr"]) == (8, 1, 4, sc.lr)
    assert (record["warmup_steps"], record["total_steps"], record["clip_grad"]) == (3, 24, 0.5)
    assert (record["holdout"], record["max_steps"], record["notes"]) == (0.01, 5, {})
    assert pickle.loads(pickle.dumps(job)).record() == record  # as Ray hands it to the workers
    sc.blr = 0.5  # the job keeps its own copy of the settings
    assert job.record()["lr"] == record["lr"] and job.settings.micro_batches(2) == 1


def test_a_step_takes_the_same_examples_whatever_the_worker_count(tmp_path: Path) -> None:
    cfg = train_config(tmp_path)
    tok = load_tokenizer(cfg.model.tokenizer_path)
    examples = [
        Example(torch.full((4,), float(i)).numpy(), CAPTION_PROMPT, f"a red circle {i}", str(i)) for i in range(40)
    ]
    source = ExampleList(examples, seed=1)
    one = step_batches(source, tok, Plan(8, 1, 1, 96), 0, start_step=3)
    two = [step_batches(source, tok, Plan(8, 2, 2, 96), r, start_step=3) for r in range(2)]
    for _ in range(4):  # crosses the epoch boundary (5 steps per epoch)
        whole = next(one)[0].features[:, 0].tolist()
        parts = [m.features[:, 0].tolist() for it in two for m in next(it)]
        assert [x for p in parts for x in p] == whole
    with pytest.raises(InputError, match="not divisible by workers x accum_iter"):
        Plan(8, 3, 1, 96)


def test_stage1_tunes_only_bind_gates_prefix_and_stage2_only_norms_biases_lora(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, epochs=1)
    ws = Workspace(cfg.workspace)
    job = resolve_job(cfg, ws, 1, "probe")
    before = {n: p.detach().clone() for n, p in build_model(job).named_parameters()}
    one = train.run(cfg, 1, local=True)
    _, after1, _ = read_checkpoint(one.checkpoint)
    stage1_names = set(phase_parameters(build_model(job), "pretrain"))
    clean = {
        n: t
        for n, t in (
            (k.replace("base_model.model.", "").replace(".base_layer", "").replace(".default", ""), v)
            for k, v in before.items()
        )
    }
    assert all(torch.equal(after1[n], clean[n]) for n in after1 if n not in stage1_names)
    assert any(not torch.equal(after1[n], clean[n]) for n in stage1_names)
    assert one.steps == one.total_steps and one.losses[-1] < one.losses[0] + 0.5

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "red"}] * 16))
    cfg.train.stage2.data = [str(alpaca)]
    cfg.train.stage2.global_batch_size, cfg.train.stage2.epochs, cfg.train.stage2.max_words = 8, 1, 96
    two = train.run(cfg, 2, local=True)
    _, after2, _ = read_checkpoint(two.checkpoint)
    assert all(torch.equal(after2[n], after1[n]) for n in stage1_names)  # bind, gates, prefix frozen
    assert any(not torch.equal(after2[n], after1[n]) for n in after2 if n not in stage1_names)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pipelines.train import stage as train
    from pipelines.train import loop as train_loop
    from pipelines.config import with_settings, Config
    cfg = Config.model_validate_json(open(sys.argv[1]).read())
    kill_at = int(sys.argv[2])
    original = train_loop.train
    def killing(*args, **kwargs):
        def on_step(entry):
            if entry.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs, on_step=on_step)
    train.train = killing
    train.run(cfg, 1, resume=len(sys.argv) > 3, local=True)
    """
)


def test_resume_after_sigkill_gives_the_same_losses_and_weights(tmp_path: Path) -> None:
    cfg = train_config(tmp_path / "a", checkpoint_every_steps=5)
    straight = train.run(cfg, 1, local=True)
    assert straight.steps == 24

    cfg_b = train_config(tmp_path / "b", checkpoint_every_steps=5)
    (tmp_path / "cfg.json").write_text(cfg_b.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, str(tmp_path / "cfg.json"), "12"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train.run(cfg_b, 1, resume=True, local=True)
    assert resumed.resumed_from == 10  # the last checkpoint before the kill at step 12
    assert len(resumed.losses) == 24
    # the metric history: every step once, those logged after step 10 by the killed attempt forgotten
    history = MetricLog(Workspace(cfg_b.workspace), str(Path(resumed.checkpoint).parents[2])).read()
    assert history.column("step").to_pylist() == list(range(1, 25))
    assert history.column("attempt").to_pylist() == [1] * 10 + [2] * 14
    assert history.column("loss").to_pylist() == pytest.approx(resumed.losses, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(resumed.losses, straight.losses, strict=True)) < 1e-6
    _, a, _ = read_checkpoint(straight.checkpoint)
    _, b, _ = read_checkpoint(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """A pickle that would run code when unpickled (it must never be)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_pickle_in_place_of_the_training_state(tmp_path: Path) -> None:

    from model.errors import ModelInputError

    cfg = train_config(tmp_path, checkpoint_every_steps=5)
    first = train.run(cfg, 1, local=True, max_steps=5)
    state = Path(first.checkpoint).parent / "state.pt"
    marker = tmp_path / "pwned"
    state.write_bytes(pickle.dumps({"optimizer": _Payload(str(marker))}, protocol=2))
    with pytest.raises(ModelInputError, match=r"state\.pt: not a weights-only checkpoint"):
        train.run(cfg, 1, resume=True, local=True)
    assert not marker.exists()


def test_stage2_bad_inputs_name_the_file_and_record(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, epochs=0.5)
    train.run(cfg, 1, local=True)
    weird = tmp_path / "weird.json"
    weird.write_text(json.dumps([{"question": "q", "reply": "r"}] * 3))
    cfg.train.stage2.data = [str(weird)]
    with pytest.raises(InputError, match=r"weird\.json.*record 0"):
        train.run(cfg, 2, local=True)
    llava = tmp_path / "llava.json"
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    llava.write_text(
        json.dumps(
            [
                {"image": "coco/synthetic-0-0000.jpg", "conversations": conv},
                {"image": "coco/nope-1.jpg", "conversations": conv},
                {"image": "coco/nope-2.jpg", "conversations": conv},
            ]
        )
    )
    cfg.train.stage2.data = [str(llava)]
    with pytest.raises(InputError, match=r"llava\.json: record 1 \(image 'coco/nope-1\.jpg'\) has no feature; 2 "):
        train.run(cfg, 2, local=True)
    ws = Workspace(cfg.workspace)
    meta = next(iter(ws.glob(ws.features("*", "meta.json"))))
    doc = json.loads(ws.read_bytes(meta))
    del doc["placeholder"]
    ws.write_bytes(meta, json.dumps(doc).encode())
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a colour.", "output": "red"}] * 8))
    cfg.train.stage2.data = [str(alpaca)]
    with pytest.raises(InputError, match=r"alpaca\.json: text-only samples need the placeholder feature"):
        train.run(cfg, 2, local=True)


def test_stage2_without_a_stage1_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = train_config(tmp_path)
    cfg.train.stage2.data = [str(tmp_path / "x.json")]
    with pytest.raises(InputError, match="stage 2 starts from a stage-1 checkpoint"):
        train.run(cfg, 2, local=True)


@pytest.mark.slow
def test_ray_two_workers_and_resume_match_one_worker(tmp_path: Path) -> None:
    """Ray Train with gloo: 2 workers (stopped at step 8, then resumed) give the 1-worker loss curve and weights."""
    one = train.run(train_config(tmp_path / "one", workers=1, epochs=1), 1)
    cfg = train_config(tmp_path / "two", workers=2, epochs=1)
    first = train.run(cfg, 1, max_steps=8)
    assert first.steps == 8
    two = train.run(cfg, 1, resume=True)
    assert two.resumed_from == 8 and two.workers == 2
    assert max(abs(a - b) for a, b in zip(one.losses, two.losses, strict=True)) < 1e-5
    _, a, _ = read_checkpoint(one.checkpoint)
    _, b, _ = read_checkpoint(two.checkpoint)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # rank 0 of each Ray attempt kept the metric history: every step once, the samples of both workers counted
    history = MetricLog(Workspace(cfg.workspace), str(Path(two.checkpoint).parents[2])).read()
    assert history.column("step").to_pylist() == list(range(1, two.total_steps + 1))
    assert set(history.column("samples").to_pylist()) == {cfg.train.stage1.global_batch_size}


def test_evaluate_reports_held_out_loss_and_the_grounding_gap_into_the_catalog(tmp_path: Path) -> None:
    from pipelines.evaluate import stage as evaluate
    from stores.catalog import Catalog

    cfg = train_config(tmp_path, epochs=4)
    cfg.train.holdout = 0.2
    trained = train.run(cfg, 1, local=True)
    result = evaluate.run(cfg, 1, batch_size=5)
    heldout = count_split(
        Workspace(cfg.workspace),
        resolve_job(cfg, Workspace(cfg.workspace), 1, "x").feature_files,
        cfg.train.holdout,
        "heldout",
    )
    assert heldout % 5 != 0 and result.examples == heldout  # every held-out sample, the last partial batch too
    assert result.run_id == trained.run_id and result.stage == 1
    given = with_settings(cfg, {"infer.checkpoint": trained.checkpoint})
    as_stage2 = evaluate.run(given, 2, batch_size=5)  # the checkpoint says stage 1
    assert as_stage2.stage == 1 and as_stage2.run_id == trained.run_id
    assert not (Path(cfg.workspace) / "checkpoints" / "stage2").exists()
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.grounding_gap == pytest.approx(result.shuffled_loss - result.loss)
    rows = Catalog(Workspace(cfg.workspace)).rows("SELECT run_id, loss, grounding_gap FROM evaluations")
    assert rows == [{"run_id": trained.run_id, "loss": result.loss, "grounding_gap": result.grounding_gap}] * 2
    with pytest.raises(InputError, match="no complete stage-2 run"):
        evaluate.run(cfg, 2)


def test_a_max_steps_run_is_stopped_never_a_default_until_resumed(tmp_path: Path) -> None:
    """`--max-steps` stops a run early: it is `stopped`, nothing picks it by default, and --resume completes it."""
    from pipelines.runtime import checkpoints
    from stores.runs import RunRecord, Runs

    cfg = train_config(tmp_path, epochs=1)
    ws, runs = Workspace(cfg.workspace), Runs.of_stage(Workspace(cfg.workspace), 1)
    first = train.run(cfg, 1, local=True, max_steps=2)
    assert (first.status, first.steps) == ("stopped", 2) and first.total_steps > 2
    assert f"stopped at step 2 of {first.total_steps}" in first.summary() and "--resume" in first.summary()
    assert runs.record(first.run_id).status == "stopped" and runs.newest_complete() is None
    with pytest.raises(InputError, match="no trained checkpoint"):
        checkpoints.choose(ws)
    done = train.run(cfg, 1, resume=True, local=True)
    assert (done.run_id, done.status, done.resumed_from) == (first.run_id, "complete", 2)
    assert checkpoints.choose(ws) == runs.newest_complete() == done.checkpoint
    # a record written before `stopped` existed said `complete` after its --max-steps: it is not finished either
    old = RunRecord(status="complete", steps=2, job={"total_steps": first.total_steps}, checkpoint="x")
    assert not old.finished and RunRecord(status="complete", steps=9, job={"total_steps": 9}).finished
