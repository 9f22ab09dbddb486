"""Benchmark: training steps of the project's loop (`pipelines.train.loop.train`) on a random-weight model.

`step_rate(...)` builds an ImageBind-LLM of the 7B or the tiny shape in this process, with random weights, and runs
real steps of the training loop on synthetic micro-batches (random tokens and features; a share of each sequence's
last positions labelled, as answers are): forward, the summed loss, backward, AdamW. It returns ms a step, samples
and tokens a second, peak memory and the losses. The team's `bench/gpu.py` calls it; on a CPU use the tiny shape.

Usage: python -m bench.train_gpu [--stage 1] [--shape tiny] [--micro-batch 8] [--seq 80] [--base-dtype auto]
       [--fused auto] [--checkpointing] [--steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
from collections.abc import Iterator
from typing import Any

import torch

from model.llm.config import LLMConfig
from model.llm.model import IGNORE, ImageBindLLM
from model.llm.phases import STAGE_PHASE
from pipelines.train.compute import Compute
from pipelines.train.data import Micro
from pipelines.train.guard import Guard
from pipelines.train.loop import StepLog, train
from pipelines.train.metrics import Recorder
from pipelines.train.schedule import Hyper

SHAPES = {"7b": "7B", "tiny": "tiny"}
ANSWER_SHARE = {1: 0.25, 2: 0.5}  # labelled share of a sequence: a caption after its prompt; an instruction's answer
WARMUP = 2  # steps not timed (allocation, kernel selection)


class _Session:
    """One process, no reports, no checkpoints (the loop's Session)."""

    rank, world = 0, 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int, history: list | None = None
    ) -> None:
        pass

    def resume_dir(self) -> str | None:
        return None

    def progress(self, line: str) -> None:
        pass


def synthetic_steps(
    config: LLMConfig, micro_batch: int, seq: int, answer_share: float, seed: int = 0
) -> Iterator[list[Micro]]:
    """One micro-batch a step: random tokens, unit features, the last `answer_share` of every sequence labelled."""
    g = torch.Generator().manual_seed(seed)
    answer = max(1, round(seq * answer_share))
    while True:
        ids = torch.randint(3, config.vocab_size, (micro_batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq - answer] = IGNORE
        features = torch.nn.functional.normalize(torch.randn(micro_batch, config.feature_dim, generator=g), dim=-1)
        yield [Micro(ids, labels, features)]


def step_rate(
    stage: int = 1,
    shape: str = "tiny",
    micro_batch: int = 8,
    seq: int = 80,
    base_dtype: str = "auto",
    fused: str = "auto",
    checkpointing: bool = False,
    steps: int = 10,
    device: str | torch.device = "cpu",
    answer_share: float | None = None,
    recorder: Recorder | None = None,
    guard: Guard | None = None,
) -> dict[str, Any]:
    """Real training steps of `stage` (1: bind network, prefix, gates; 2: LoRA, norms, biases) at `shape`.

    Returns ms_per_step (median of the steps after the first two), samples_per_s, tokens_per_s (every position of
    the micro-batch), answer_tokens_per_s (the labelled ones), peak_memory_gb (CUDA: allocated, from the third step
    on; CPU: the process's peak RSS, from its start), losses (every step's), and the settings as resolved.
    """
    device = torch.device(device)
    config = LLMConfig.preset(SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = ImageBindLLM(config)
    with torch.no_grad():  # non-zero gates: the visual path's gradients are those of a model under training
        for gate in model.gates:
            gate.fill_(0.1)
    share = ANSWER_SHARE[stage] if answer_share is None else answer_share
    hyper = Hyper(lr=1e-5, min_lr=1e-5, weight_decay=0.0, warmup_steps=0, total_steps=steps)
    compute = Compute(base_dtype=base_dtype, fused_kernels=fused, activation_checkpointing=checkpointing)
    cuda = device.type == "cuda"

    def on_step(entry: StepLog) -> None:
        if cuda and entry.step == WARMUP:
            torch.cuda.reset_peak_memory_stats(device)

    if cuda:
        torch.cuda.synchronize(device)
    stream = synthetic_steps(config, micro_batch, seq, share)
    state = train(
        _Session(device),
        model,
        STAGE_PHASE[stage],
        lambda start: stream,
        hyper,
        checkpoint_every=steps,
        on_step=on_step,
        compute=compute,
        save=False,
        recorder=recorder,
        guard=guard,
    )
    seconds = [h["seconds"] for h in state.history]
    timed = seconds[WARMUP:] or seconds
    step_s = statistics.median(timed)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {
        "stage": stage,
        "shape": shape,
        "micro_batch": micro_batch,
        "seq": seq,
        "device": str(device),
        "base_dtype": str(model.base.lm_head.weight.dtype).removeprefix("torch."),
        "fused": model.fused_loss is not None,
        "checkpointing": checkpointing,
        "steps": steps,
        "ms_per_step": step_s * 1e3,
        "samples_per_s": micro_batch / step_s,
        "tokens_per_s": micro_batch * seq / step_s,
        "answer_tokens_per_s": state.history[-1]["tokens"] / step_s,
        "peak_memory_gb": peak,
        "losses": [h["loss"] for h in state.history],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=80)
    p.add_argument("--base-dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--fused", choices=("auto", "off"), default="auto")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    out = step_rate(a.stage, a.shape, a.micro_batch, a.seq, a.base_dtype, a.fused, a.checkpointing, a.steps, a.device)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
