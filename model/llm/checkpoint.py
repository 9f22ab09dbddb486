"""Our ImageBind-LLM checkpoint: config.json + adapter.safetensors + a peft LoRA directory; base LLaMA loading."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from model.llm.config import LLMConfig, config_from_llama
from model.llm.model import ImageBindLLM, lora_config
from model.llm.phases import phase_parameters
from model.weights import CheckpointMismatch, check_state, replace_dir, staging_dir

FORMAT = "ibllm-imagebind-llm"
VERSION = 1
CONFIG_FILE = "config.json"
ADAPTER_FILE = "adapter.safetensors"
LORA_DIR = "lora"
LORA_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # how peft names saved LoRA tensors


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_file_name(clean: str) -> str:
    """`llama.model.layers.0...lora_A.weight` -> peft's saved name `base_model.model.model.layers.0...`."""
    return _PEFT_PREFIX + clean.removeprefix("llama.")


def checkpoint_tensors(model: ImageBindLLM) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds (both phases' parameters), by clean name, on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in phase_parameters(model).items()}


def save_checkpoint(model: ImageBindLLM, directory: str, metadata: Mapping[str, Any] | None = None) -> str:
    """Write the model's checkpoint into `directory` atomically (see `write_checkpoint`)."""
    return write_checkpoint(directory, model.config, checkpoint_tensors(model), metadata)


def write_checkpoint(
    directory: str, config: LLMConfig, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> str:
    """config.json, adapter.safetensors (bind, prefix, gates, norms, biases) and lora/ (peft layout), atomically."""
    plain = {n: t.contiguous() for n, t in tensors.items() if not is_lora(n)}
    lora = {lora_file_name(n): t.contiguous() for n, t in tensors.items() if is_lora(n)}
    tmp = staging_dir(os.path.dirname(os.path.abspath(directory)))
    try:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "config": config.to_dict(),
            "lora": bool(lora),
            "metadata": dict(metadata or {}),
        }
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
        save_file(plain, os.path.join(tmp, ADAPTER_FILE), metadata={"format": FORMAT})
        if lora:
            os.makedirs(os.path.join(tmp, LORA_DIR))
            lora_config(config).save_pretrained(os.path.join(tmp, LORA_DIR))
            save_file(lora, os.path.join(tmp, LORA_DIR, LORA_FILE), metadata={"format": "pt"})
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_checkpoint(directory: str) -> tuple[LLMConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, tensors by clean name, the config document) of a checkpoint directory; refuses anything else."""
    config, doc = read_checkpoint_config(directory)
    tensors = _read_safetensors(os.path.join(directory, ADAPTER_FILE))
    if doc.get("lora"):
        lora_dir = os.path.join(directory, LORA_DIR)
        _check_lora_config(lora_dir, config)
        for name, t in _read_safetensors(os.path.join(lora_dir, LORA_FILE)).items():
            if not name.startswith(_PEFT_PREFIX):
                raise CheckpointMismatch(f"{lora_dir}/{LORA_FILE}: unexpected tensor {name!r}")
            tensors["llama." + name.removeprefix(_PEFT_PREFIX)] = t
    return config, tensors, doc


def read_checkpoint_config(directory: str) -> tuple[LLMConfig, dict[str, Any]]:
    """(config, the config document with its metadata) of a checkpoint directory, without reading its tensors."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointMismatch(f"{directory}: not an ImageBind-LLM checkpoint (no {CONFIG_FILE})")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointMismatch(f"{path}: unreadable ({e})") from None
    if doc.get("format") != FORMAT:
        raise CheckpointMismatch(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return LLMConfig.from_dict(doc["config"], origin=path), doc


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointMismatch(f"{path}: missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointMismatch(f"{path}: not a readable safetensors file ({e})") from None


def _check_lora_config(lora_dir: str, config: LLMConfig) -> None:
    path = os.path.join(lora_dir, "adapter_config.json")
    try:
        with open(path) as f:
            lora = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointMismatch(f"{path}: unreadable ({e})") from None
    if (lora.get("r"), float(lora.get("lora_alpha", 0))) != (config.lora_rank, float(config.lora_alpha)):
        raise CheckpointMismatch(
            f"{path}: LoRA r={lora.get('r')} alpha={lora.get('lora_alpha')} but the checkpoint config says "
            f"r={config.lora_rank} alpha={config.lora_alpha}"
        )


def load_tensors(model: ImageBindLLM, tensors: Mapping[str, torch.Tensor], origin: str) -> None:
    """Copy checkpoint tensors (clean names) into the model: all or nothing, every key and shape checked first."""
    params = phase_parameters(model)
    check_state({n: tuple(p.shape) for n, p in params.items()}, tensors, origin, "this ImageBind-LLM")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))


def load_llama(path: str, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """A transformers-format LLaMA directory (e.g. from `ibllm convert llama`), with the q/o/k/v/MLP biases that
    ImageBind-LLM tunes added at zero; any key other than those biases missing or unexpected is an error."""
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise CheckpointMismatch(f"{path}: not a transformers LLaMA directory (no {CONFIG_FILE})")
    base = LlamaConfig.from_pretrained(path)
    config = config_from_llama(base)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the biases we add are reported as "newly initialized": we zero them below
    try:
        model, info = LlamaForCausalLM.from_pretrained(
            path, config=config.llama_config(), dtype=dtype or torch.float32, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(".bias")]
    bad = {
        "missing": missing,
        "unexpected": list(info.get("unexpected_keys", [])),
        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
    }
    if any(bad.values()):
        detail = "; ".join(f"{len(v)} {k}: {', '.join(map(str, v[:6]))}" for k, v in bad.items() if v)
        raise CheckpointMismatch(f"{path}: weights do not fit its config.json: {detail}")
    with torch.no_grad():
        for name in info.get("missing_keys", []):
            model.get_parameter(name).zero_()
    return model


def from_pretrained(
    directory: str,
    llama: str | PreTrainedModel | None = None,
    dtype: torch.dtype | None = None,
) -> ImageBindLLM:
    """Load one of our checkpoints on top of a base LLaMA (a transformers directory or a model already built).

    Without `llama`, the base is built with random weights (tests and shape checks only).
    """
    config, tensors, doc = read_checkpoint(directory)
    base = load_llama(llama, dtype) if isinstance(llama, str) else llama
    if base is not None:
        theirs = config_from_llama(base.config)
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "intermediate_size"):
            if getattr(theirs, field) != getattr(config, field):
                converted = (doc.get("metadata") or {}).get("converted_from")
                hint = (
                    f" (converted from {converted}: convert it again with --vocab-size {theirs.vocab_size})"
                    if field == "vocab_size" and converted
                    else ""
                )
                raise CheckpointMismatch(
                    f"{directory}: the checkpoint is for {field}={getattr(config, field)}, the base LLaMA "
                    f"{llama if isinstance(llama, str) else 'given'} has {field}={getattr(theirs, field)}{hint}"
                )
    has_lora = any(is_lora(n) for n in tensors)
    model = ImageBindLLM(config, base, lora=has_lora)
    if dtype is not None and base is None:
        model.llama.to(dtype)
    load_tensors(model, tensors, directory)
    return model
