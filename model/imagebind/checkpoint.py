"""Loading ImageBind weights (the official `imagebind_huge.pth` as it is, or safetensors) with a strict key check."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file
from torch import nn

SHOW = 8  # key names listed in a mismatch message, per kind


class CheckpointMismatch(ValueError):
    """A checkpoint whose keys or shapes do not fit the model; the message lists them."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a `.pth`/`.pt` file, loaded with `weights_only=True` (never unpickled)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, or not a checkpoint at all
        raise CheckpointMismatch(f"{path}: not a weights-only checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise CheckpointMismatch(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def _listing(label: str, keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return f"{len(keys)} {label}: {', '.join(keys[:SHOW])}{more}"


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Copy `state` into `model`, refusing any missing, unexpected or mis-shaped key (all listed, with counts)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [_listing(lbl, ks) for lbl, ks in (("missing", missing), ("unexpected", unexpected),
                                                   ("with other shapes (file vs model)", shapes)) if ks]  # fmt: skip
        raise CheckpointMismatch(f"{origin} does not fit this ImageBind model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def file_digest(path: str, length: int = 12) -> str:
    """A short sha256 of a file's bytes (part of an encoder id)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:length]
