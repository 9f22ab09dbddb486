"""`ibllm convert`: Meta LLaMA -> transformers, the official adapter `7B.pth` -> our checkpoint, and back."""

from __future__ import annotations

import logging
import math
import os
import time

import torch
from pydantic import BaseModel
from safetensors import safe_open

from model.llm.checkpoint import read_checkpoint
from model.llm.convert_adapter import convert_official_adapter, export_official
from model.llm.convert_llama import convert_meta_llama
from pipelines.errors import InputError

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConvertError(InputError):
    """A source that is not what the conversion expects; the message names the file and the problem."""


class ConvertResult(BaseModel):
    """What a conversion wrote."""

    kind: str
    source: str
    output: str
    tensors: int
    parameters: int
    seconds: float
    warnings: list[str] = []

    def summary(self) -> str:
        done = (
            f"convert {self.kind}: {self.source} -> {self.output} "
            f"({self.tensors} tensors, {self.parameters:,} numbers, {self.seconds:.1f}s)"
        )
        return "\n".join([done, *(f"warning: {w}" for w in self.warnings)])


def _refuse_existing(output: str, overwrite: bool) -> None:
    """Nothing is replaced unless --overwrite says so."""
    exists = os.path.isfile(output) or (os.path.isdir(output) and any(os.scandir(output)))
    if exists and not overwrite:
        raise ConvertError(f"{output}: exists and is not empty; add --overwrite to replace it")


def _count_safetensors(directory: str) -> tuple[int, int]:
    """(tensors, numbers) in the safetensors files under `directory`, read from their headers."""
    tensors = numbers = 0
    for root, _, files in os.walk(directory):
        for name in sorted(f for f in files if f.endswith(".safetensors")):
            with safe_open(os.path.join(root, name), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors += 1
                    numbers += math.prod(f.get_slice(key).get_shape())
    return tensors, numbers


def llama(
    source: str, output: str, dtype: str | None = None, vocab_size: int | None = None, overwrite: bool = False
) -> ConvertResult:
    """Meta-format LLaMA (`params.json` + `consolidated.*.pth`) -> a transformers LLaMA directory."""
    start = time.perf_counter()
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    _refuse_existing(output, overwrite)
    try:
        convert_meta_llama(source, output, vocab_size=vocab_size, dtype=DTYPES.get(dtype or ""), overwrite=overwrite)
    except (ValueError, FileExistsError) as e:
        raise ConvertError(str(e)) from None
    tensors, numbers = _count_safetensors(output)
    warnings = []
    if not os.path.isfile(os.path.join(output, "tokenizer.model")):
        warnings.append(
            f"no tokenizer.model in {source} or its parent folder, so none in {output}: copy LLaMA's "
            "tokenizer.model there, or set model.tokenizer_path to it"
        )
        log.warning("%s", warnings[-1])
    return ConvertResult(
        kind="llama",
        source=source,
        output=output,
        tensors=tensors,
        parameters=numbers,
        seconds=time.perf_counter() - start,
        warnings=warnings,
    )


def adapter(source: str, output: str, vocab_size: int | None = None, overwrite: bool = False) -> ConvertResult:
    """The released ImageBind-LLM adapter (`7B.pth`) -> our checkpoint directory (`vocab_size`: LLaMA's; default
    what `convert export` recorded in the file, else 32000)."""
    start = time.perf_counter()
    _refuse_existing(output, overwrite)
    try:
        convert_official_adapter(source, output, vocab_size=vocab_size)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    _, tensors, _ = read_checkpoint(output)
    return ConvertResult(
        kind="adapter",
        source=source,
        output=output,
        tensors=len(tensors),
        parameters=sum(t.numel() for t in tensors.values()),
        seconds=time.perf_counter() - start,
    )


def export(source: str, output: str, overwrite: bool = False) -> ConvertResult:
    """Our checkpoint directory -> the official adapter layout (a `.pth` the reference code loads)."""
    start = time.perf_counter()
    _refuse_existing(output, overwrite)
    try:
        export_official(source, output)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    state = torch.load(output, map_location="cpu", weights_only=True, mmap=True)["model"]
    return ConvertResult(
        kind="export",
        source=source,
        output=output,
        tensors=len(state),
        parameters=sum(t.numel() for t in state.values()),
        seconds=time.perf_counter() - start,
    )
