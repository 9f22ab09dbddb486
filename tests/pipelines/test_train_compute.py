"""How training computes: the chunked summed loss, a bfloat16 frozen base, activation checkpointing, fused kernels,
micro-batches; each gives today's losses and gradients (exactly, to float rounding, or to bfloat16 rounding)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from model.llm.checkpoint import read_checkpoint
from model.llm.config import LLMConfig
from model.llm.model import IGNORE, ImageBindLLM, summed_answer_loss
from model.llm.phases import phase_parameters, set_phase
from pipelines.config import StageConfig
from pipelines.train import stage as train
from pipelines.train.compute import base_dtype, cast_frozen_base
from pipelines.train.loss import _fused_loss_problem, fused_cross_entropy
from tests.pipelines.train_fixture import train_config


def masked_sum_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: the summed next-token cross-entropy over answer tokens, from the logits of the whole batch."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


TINY = LLMConfig.preset("tiny")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of `b`."""
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp(min=1e-12))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, features): 4 rows of 13, answers of several lengths, one row with no label at all."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY.vocab_size, (4, 13), generator=g)
    labels = ids.clone()
    for row, start in enumerate((5, 9, 13, 2)):
        labels[row, :start] = IGNORE  # row 2: nothing labelled
    labels[3, 10:] = IGNORE  # right padding after the answer
    return ids, labels, torch.randn(4, TINY.feature_dim, generator=g)


def _model(seed: int = 0) -> ImageBindLLM:
    torch.manual_seed(seed)
    model = ImageBindLLM(TINY)
    with torch.no_grad():  # the visual path and LoRA active, so that every trainable tensor gets a gradient
        for gate in model.gates:
            gate.normal_()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def test_the_chunked_loss_equals_the_full_cross_entropy_with_its_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 50)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :2] = IGNORE
    labels[1] = IGNORE  # a row with nothing labelled
    labels[2, 5:] = IGNORE
    # 5 + 4 labelled targets, chunks of 4 rows: a chunk boundary falls inside the first sequence, another between
    want = masked_sum_loss(head(hidden), labels)
    want_grads = torch.autograd.grad(want, [hidden, head.weight, head.bias])
    for chunk in (1, 4, 2048):
        got = summed_answer_loss(hidden, labels, head, chunk=chunk)
        grads = torch.autograd.grad(got, [hidden, head.weight, head.bias])
        assert _rel(got, want) < 1e-5
        assert all(_rel(a, b) < 1e-5 for a, b in zip(grads, want_grads, strict=True))
    nothing = summed_answer_loss(hidden, torch.full((3, 7), IGNORE), head)
    assert nothing.item() == 0.0 and nothing.requires_grad
    assert masked_sum_loss(head(hidden), torch.full((3, 7), IGNORE)).item() == 0.0


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_the_models_summed_loss_matches_its_logits_and_so_do_the_gradients(phase: str) -> None:
    model = _model()
    trainable = set_phase(model, phase)
    ids, labels, feats = _batch()
    want = masked_sum_loss(model(ids, feats).logits, labels)
    want_grads = torch.autograd.grad(want, list(trainable.values()))
    model.loss_chunk = 5  # boundaries inside sequences
    out = model(ids, feats, labels=labels, sum_loss=True)
    assert out.logits is None
    grads = torch.autograd.grad(out.loss, list(trainable.values()))
    assert _rel(out.loss, want) < 1e-5
    assert all(b.abs().max() > 0 for b in want_grads)
    assert max(_rel(a, b) for a, b in zip(grads, want_grads, strict=True)) < 1e-5


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(phase: str) -> None:
    model = _model()
    trainable = set_phase(model, phase)
    ids, labels, feats = _batch()
    calls = []
    model.layers[-1].self_attn.o_proj.register_forward_hook(lambda *_: calls.append(1))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        calls.clear()
        loss = model(ids, feats, labels=labels, sum_loss=True).loss
        return loss, list(torch.autograd.grad(loss, list(trainable.values())))

    want, want_grads = run()
    assert len(calls) == 1
    model.checkpoint_layers(True)
    got, grads = run()
    assert len(calls) == 2  # the layer ran again in backward, with the visual feature injected again
    assert _rel(got, want) < 1e-5
    assert max(_rel(a, b) for a, b in zip(grads, want_grads, strict=True)) < 1e-5
    with torch.no_grad():  # no gradients: nothing to recompute
        calls.clear()
        model(ids, feats, labels=labels, sum_loss=True)
        assert len(calls) == 1
    model.checkpoint_layers(False)
    assert "forward" not in model.layers[0].__dict__


def test_a_bfloat16_base_keeps_what_trains_and_what_checkpoints_hold_in_float32() -> None:
    model = _model()
    trainable = set_phase(model, "finetune")
    held = phase_parameters(model)
    assert cast_frozen_base(model, torch.bfloat16) > 0
    assert all(p.dtype == torch.float32 for p in held.values())  # LoRA, norms, tuned biases, bind, prefix, gates
    q = model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.base_layer.bias.dtype == torch.float32
    assert model.base.lm_head.weight.dtype == torch.bfloat16
    assert model.base.model.embed_tokens.weight.dtype == torch.float32  # the residual stream stays float32
    assert model.base.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers untouched
    ids, labels, feats = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 weight beside an fp32 bias in one Linear
        loss = model(ids, feats, labels=labels, sum_loss=True).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_a_bfloat16_base_under_autocast_computes_what_a_float32_base_under_autocast_computes(phase: str) -> None:
    """Autocast casts every matmul's weight to bfloat16: storing the frozen ones so changes nothing, bit for bit
    (the GPU path before and after), while the loss and gradients keep their float32 residual stream."""
    results = []
    for cast in (False, True):
        model = _model()  # the same seed: the same weights
        trainable = set_phase(model, phase)
        if cast:
            cast_frozen_base(model, torch.bfloat16)
        ids, labels, feats = _batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, feats, labels=labels, sum_loss=True).loss
        results.append((loss, torch.autograd.grad(loss, list(trainable.values()))))
    (want, want_grads), (got, grads) = results
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))


def test_settings_resolve_per_device_and_fused_kernels_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    assert base_dtype("auto", CPU) == torch.float32 and base_dtype("auto", CUDA) == torch.bfloat16
    assert base_dtype("bfloat16", CPU) == torch.bfloat16 and base_dtype("float32", CUDA) == torch.float32
    assert fused_cross_entropy("auto", CPU) is None and fused_cross_entropy("off", CUDA) is None
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed: the import fails
    assert fused_cross_entropy("auto", CUDA) is None


def test_a_fused_loss_is_used_only_when_it_gives_the_summed_cross_entropy() -> None:
    def fused(reduction: str):
        def loss(weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, bias: None) -> torch.Tensor:
            return F.cross_entropy((rows @ weight.T).float(), targets, ignore_index=IGNORE, reduction=reduction)

        return loss

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("no kernel for this device")

    assert _fused_loss_problem(fused("sum"), CPU) is None
    assert "does not give the summed loss" in (_fused_loss_problem(fused("mean"), CPU) or "")
    assert "RuntimeError: no kernel" in (_fused_loss_problem(broken, CPU) or "")


def test_micro_batch_decides_the_accumulation() -> None:
    base = {
        "epochs": 1,
        "warmup_epochs": 0,
        "global_batch_size": 32,
        "blr": 1e-3,
        "weight_decay": 0.0,
        "max_words": 64,
        "workers": 2,
    }
    assert StageConfig(**base, micro_batch=4).micro_batch == 4
    with pytest.raises(ValidationError, match="not divisible by workers x micro_batch"):
        StageConfig(**base, micro_batch=5)
    with pytest.raises(ValidationError, match="accum_iter or micro_batch"):
        StageConfig(**base, micro_batch=4, accum_iter=2)


def test_training_with_a_bfloat16_base_checkpointing_and_micro_batches(tmp_path: Path) -> None:
    """20 steps of the tiny stage-1 run: a bfloat16 base (with CPU autocast, which a float32 base does not get on a
    CPU) stays within bfloat16 rounding of the float32 base; activation checkpointing with micro-batches of 4 (2 a
    step) gives the float32 losses to 1e-5.

    Tolerance: bfloat16 keeps 8 significant bits (relative rounding 2^-9, 0.2%, per stored weight and per matmul
    output); the loss (~6 nats) passes through a few such roundings, so per step |diff| <= 0.02 (0.3% of the loss)
    with margin: measured 5e-4. The runs must differ at all (the bfloat16 path ran)."""

    def run(name: str, **settings: object) -> tuple[list[float], dict[str, torch.Tensor]]:
        cfg = train_config(tmp_path / name, **({"micro_batch": 4} if settings.pop("micro", False) else {}))
        for key, value in settings.items():
            setattr(cfg.train, key, value)
        result = train.run(cfg, 1, local=True, max_steps=20)
        return result.losses, read_checkpoint(result.checkpoint)[1]

    fp32, fp32_tensors = run("fp32")
    bf16, bf16_tensors = run("bf16", base_dtype="bfloat16")
    recomputed, _ = run("ckpt", activation_checkpointing=True, micro=True)
    assert len(fp32) == len(bf16) == len(recomputed) == 20
    diffs = [abs(a - b) for a, b in zip(bf16, fp32, strict=True)]
    assert 0 < max(diffs) <= 0.02
    assert max(abs(a - b) for a, b in zip(recomputed, fp32, strict=True)) < 1e-5
    assert bf16_tensors.keys() == fp32_tensors.keys()
    assert all(t.dtype == torch.float32 for t in bf16_tensors.values())


def test_step_rate_times_real_steps_of_the_loop_at_the_tiny_shape() -> None:
    from bench.train_gpu import step_rate

    plain = step_rate(stage=1, shape="tiny", micro_batch=4, seq=24, steps=3, device="cpu")
    assert plain["base_dtype"] == "float32" and not plain["fused"] and len(plain["losses"]) == 3
    assert plain["ms_per_step"] > 0 and plain["samples_per_s"] == pytest.approx(4e3 / plain["ms_per_step"])
    lean = step_rate(
        stage=2, shape="tiny", micro_batch=2, seq=32, base_dtype="bfloat16", checkpointing=True, steps=3, device="cpu"
    )
    assert lean["base_dtype"] == "bfloat16" and lean["checkpointing"] and len(lean["losses"]) == 3
    assert all(4.0 < loss < 9.0 for loss in plain["losses"] + lean["losses"])  # ~ln(512) at random weights
