"""FSDP (PyTorch FSDP2) on 2 CPU workers with gloo, without Ray: the 1-worker losses, checkpoints and exact resume.

Two processes are spawned once (torch.multiprocessing, a FileStore rendezvous) and run every 2-worker scenario;
the 1-worker references run in this process. Stage-1 batches serve both phases: `pretrain` trains only root
parameters (bind network, prefix, gates) beside the frozen base; `finetune` trains LoRA, biases and norms inside
the sharded decoder layers. Gradient accumulation (2 micro-batches per worker) and clipping are on.
"""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.llm.checkpoint import from_pretrained, read_checkpoint
from pipelines.train.job import Job
from pipelines.train.loop import train
from pipelines.train.parallel import shard_model
from pipelines.train.setup import build_batches, build_model, resolve_job
from pipelines.train.state import MODEL_DIR, STATE_FILE
from stores.workspace import Workspace
from tests.pipelines.train_fixture import train_config

STEPS = 12  # 96 examples (holdout 0.01 keeps none of these out), global batch 8, one epoch; checkpoints at 4, 8, 12
TOL = 1e-5


class _Session:
    """A Session over an initialised default process group (world > 1 shards with FSDP), or one process."""

    def __init__(self, rank: int, world: int, out: Path, resume: str | None = None) -> None:
        self.rank, self.world, self.out, self._resume = rank, world, out, resume
        self.device = torch.device("cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return shard_model(model, self.device, self.world) if self.world > 1 else model  # type: ignore[arg-type]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int, history: list | None = None
    ) -> None:
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, self.out / f"step-{step:08d}")

    def resume_dir(self) -> str | None:
        return self._resume

    def progress(self, line: str) -> None:
        pass


def _run(job: Job, phase: str, rank: int, world: int, out: Path, resume: str | None = None) -> list[float]:
    """What worker_main does, with `_Session`: the losses of every step (those before a resume included)."""
    torch.manual_seed(job.seed)
    model = build_model(job)
    batches = build_batches(job, Workspace(job.workspace, job.storage_options), rank, world)
    every = job.settings.checkpoint_every_steps
    state = train(_Session(rank, world, out, resume), model, phase, batches, job.hyper, every)
    return [h["loss"] for h in state.history]


# name, phase, resume from (relative to the run folder)
TWO_WORKER_RUNS = [
    ("fsdp-pretrain", "pretrain", None),
    ("fsdp-finetune", "finetune", None),
    ("fsdp-finetune-resumed", "finetune", "fsdp-finetune/step-00000004"),
    ("fsdp-from-one", "finetune", "one-finetune/step-00000008"),
]


def _worker(rank: int, job: Job, root: str) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        losses = {}
        for name, phase, resume in TWO_WORKER_RUNS:
            losses[name] = _run(job, phase, rank, 2, Path(root) / name, resume and f"{root}/{resume}")
        if rank == 0:
            (Path(root) / "losses.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[float]]]:
    tmp = tmp_path_factory.mktemp("fsdp")
    cfg = train_config(tmp / "cfg", epochs=1, accum_iter=2, clip_grad=0.5, checkpoint_every_steps=4, parallel="fsdp")
    job = resolve_job(cfg, Workspace(cfg.workspace), 1, "fsdp")
    assert job.total_steps == STEPS and job.settings.parallel == "fsdp"
    root = tmp / "runs"
    root.mkdir()
    losses = {f"one-{phase}": _run(job, phase, 0, 1, root / f"one-{phase}") for phase in ("pretrain", "finetune")}
    mp.start_processes(_worker, args=(job, str(root)), nprocs=2, join=True, start_method="spawn")
    losses |= json.loads((root / "losses.json").read_text())
    losses["one-from-fsdp"] = _run(
        job, "finetune", 0, 1, root / "one-from-fsdp", str(root / "fsdp-finetune" / "step-00000008")
    )
    return root, losses


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    return read_checkpoint(str(run / f"step-{step:08d}" / MODEL_DIR))[1]


def _optimizer(run: Path, step: int) -> dict[str, Any]:
    return torch.load(run / f"step-{step:08d}" / STATE_FILE, weights_only=True)["optimizer"]


@pytest.mark.slow
def test_two_fsdp_workers_give_the_one_worker_loss_curve(runs: tuple[Path, dict[str, list[float]]]) -> None:
    _, losses = runs
    for phase in ("pretrain", "finetune"):
        one, two = losses[f"one-{phase}"], losses[f"fsdp-{phase}"]
        assert len(one) == STEPS and len(set(one)) > 1  # a real curve (a random base barely lowers it in 12 steps)
        assert _max_diff(one, two) < TOL, (phase, one, two)


@pytest.mark.slow
def test_fsdp_checkpoints_equal_the_one_worker_checkpoints(runs: tuple[Path, dict[str, list[float]]]) -> None:
    root, _ = runs
    for phase in ("pretrain", "finetune"):
        for step in (4, 8, STEPS):
            one, two = _tensors(root / f"one-{phase}", step), _tensors(root / f"fsdp-{phase}", step)
            assert one.keys() == two.keys()
            assert all(one[k].shape == two[k].shape and one[k].dtype == two[k].dtype for k in one)
            assert max(float((one[k] - two[k]).abs().max()) for k in one) < TOL, (phase, step)
            a, b = _optimizer(root / f"one-{phase}", step), _optimizer(root / f"fsdp-{phase}", step)
            assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
            for i in a["state"]:
                assert a["state"][i].keys() == b["state"][i].keys()
                for k, v in a["state"][i].items():
                    assert v.shape == b["state"][i][k].shape
                    torch.testing.assert_close(v, b["state"][i][k], atol=TOL, rtol=1e-4)
    # an fsdp checkpoint is an ordinary model checkpoint
    model = from_pretrained(str(root / "fsdp-finetune" / f"step-{STEPS:08d}" / MODEL_DIR))
    assert float(model.llama.base_model.model.model.norm.weight.sub(1).abs().max()) > 0


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_checkpoints_move_between_one_worker_and_fsdp(
    runs: tuple[Path, dict[str, list[float]]],
) -> None:
    root, losses = runs
    straight, resumed = losses["fsdp-finetune"], losses["fsdp-finetune-resumed"]
    assert len(resumed) == STEPS and _max_diff(straight, resumed) < 1e-6
    a, b = _tensors(root / "fsdp-finetune", STEPS), _tensors(root / "fsdp-finetune-resumed", STEPS)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert not (root / "fsdp-finetune-resumed" / "step-00000004").exists()  # it started after step 4
    one = _tensors(root / "one-finetune", STEPS)
    for run in ("fsdp-from-one", "one-from-fsdp"):  # 1-worker checkpoint resumed by fsdp, and the reverse
        assert _max_diff(losses["one-finetune"], losses[run]) < TOL, run
        other = _tensors(root / run, STEPS)
        assert max(float((one[k] - other[k]).abs().max()) for k in one) < TOL, run
