"""Reading weight files safely (safetensors, or `torch.load(weights_only=True)`) and strict key/shape checks."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from model.errors import ModelInputError

SHOW = 8  # key names listed in a mismatch message, per kind


class CheckpointMismatch(ModelInputError):
    """A checkpoint whose keys or shapes do not fit the model; the message lists them."""


def read_state_dict(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a `.pth`/`.pt` file, loaded with `weights_only=True` (never unpickled).

    With `mmap`, a `.pth` in torch's zip format is mapped rather than read (a caller taking a few tensors of a
    large file reads only those); other files are read whole.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return load_file(path)
    return state_dict_of(load_weights_only(path, mmap=mmap and zipfile.is_zipfile(path)), path)


def state_dict_of(doc: Any, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded `.pth` document: itself, or its `model` entry (the reference's layout)."""
    if isinstance(doc, Mapping) and "model" in doc and isinstance(doc["model"], Mapping):
        doc = doc["model"]
    if not isinstance(doc, Mapping):
        raise CheckpointMismatch(f"{path}: expected a state dict, found {type(doc).__name__}")
    return dict(doc)


def load_weights_only(path: str, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; a file it refuses (a pickle with code in it, or not a
    checkpoint at all) raises CheckpointMismatch naming the file, never a hint to unpickle it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointMismatch(f"{path}: not a weights-only checkpoint ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    """The informative line of a torch.load error (the weights-only unpickler's verdict when there is one)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return f"the weights-only unpickler refused it: {detail}"
    return f"{type(e).__name__}: {lines[0] if lines else e}"


def _listing(label: str, keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return f"{len(keys)} {label}: {', '.join(keys[:SHOW])}{more}"


def check_state(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor], origin: str, what: str
) -> None:
    """Refuse `state` unless its keys and shapes are exactly `expected`; every problem is listed, with counts."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or shapes:
        parts = [
            _listing(lbl, ks)
            for lbl, ks in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("with other shapes (file vs model)", shapes),
            )
            if ks
        ]
        raise CheckpointMismatch(f"{origin} does not fit {what}: " + "; ".join(parts))


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Copy `state` into `model`, refusing any missing, unexpected or mis-shaped key (all listed, with counts)."""
    check_state({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, origin, "this ImageBind model")
    model.load_state_dict(state, strict=True)


def file_digest(path: str, length: int = 12) -> str:
    """A short sha256 of a file's bytes (part of an encoder id)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:length]


def staging_dir(parent: str) -> str:
    """A new private-named folder in `parent` to write a result into before `replace_dir` puts it in place; its mode
    follows the user's umask (tempfile.mkdtemp's is 0700, which the result would keep)."""
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path)
    return path


def replace_dir(tmp: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Put the finished folder `tmp` at `directory`, replacing what is there: readers see the old or the new one."""
    tmp, directory = os.fspath(tmp), os.fspath(directory)
    old = None
    if os.path.exists(directory):
        old = f"{directory.rstrip('/')}.old-{secrets.token_hex(4)}"
        os.rename(directory, old)
    os.rename(tmp, directory)
    if old:
        shutil.rmtree(old, ignore_errors=True)
