"""What each training phase tunes, which is also what a checkpoint holds: one function decides both."""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn

Phase = Literal["pretrain", "finetune"]
PHASES: tuple[Phase, ...] = ("pretrain", "finetune")
STAGE_PHASE: dict[int, Phase] = {1: "pretrain", 2: "finetune"}

TUNED_BIASES = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # k/v biases stay zero, never tuned
_PEFT_WRAP = re.compile(r"^llama\.base_model\.model\.")
_PEFT_PARTS = re.compile(r"\.base_layer(?=\.)|(?<=\.lora_[AB])\.default(?=\.)")


def clean_name(name: str) -> str:
    """A parameter's name without peft's wrapping: `llama.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return _PEFT_PARTS.sub("", _PEFT_WRAP.sub("llama.", name))


def in_phase(name: str, phase: Phase) -> bool:
    """Whether the parameter called `name` (clean) is tuned in `phase`.

    pretrain (stage 1): bind network, prefix queries, gates. finetune (stage 2): every RMSNorm weight of LLaMA,
    the q/o/gate/up/down biases and all LoRA matrices.
    """
    if phase == "pretrain":
        return name.startswith(("bind.", "prefix_query.", "gates."))
    if phase == "finetune":
        if not name.startswith("llama."):
            return False
        if ".lora_A." in name or ".lora_B." in name:
            return True
        if name.endswith("layernorm.weight") or name == "llama.model.norm.weight":
            return True
        return name.endswith(".bias") and name.rsplit(".", 2)[-2] in TUNED_BIASES
    raise ValueError(f"unknown phase {phase!r}; phases: {list(PHASES)}")


def phase_parameters(model: nn.Module, *phases: Phase) -> dict[str, nn.Parameter]:
    """Clean name -> parameter for the union of `phases` (all of them when none is given: the checkpoint's set)."""
    wanted = phases or PHASES
    return {
        clean: p
        for name, p in model.named_parameters()
        if any(in_phase(clean := clean_name(name), ph) for ph in wanted)
    }


def set_phase(model: nn.Module, phase: Phase) -> dict[str, nn.Parameter]:
    """Freeze everything, then make the phase's parameters trainable and fp32 (as the reference); returns them."""
    trainable = phase_parameters(model, phase)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(True)
    return trainable


def decays(name: str, param: nn.Parameter) -> bool:
    """The reference decays all but 1-D tensors and biases; its gates are (1, H, 1, 1), so ours (H,) decay too."""
    return name.startswith("gates.") or not (param.ndim <= 1 or name.endswith(".bias"))


def decay_groups(params: dict[str, nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: `weight_decay` where `decays`, none elsewhere."""
    decay = [p for n, p in params.items() if decays(n, p)]
    no_decay = [p for n, p in params.items() if not decays(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
