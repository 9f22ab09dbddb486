"""The demo's stage 0: a small LLaMA and its BPE tokenizer trained on the synthetic language, standing in for LLaMA."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import shutil
import time
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from transformers import LlamaForCausalLM

from model.llm.config import LLMConfig
from model.llm.model import IGNORE
from model.llm.prompts import collate
from model.llm.tokenizer import BPE_FILE, train_bpe_tokenizer
from model.weights import replace_dir
from pipelines.config import Config
from pipelines.console import Progress
from pipelines.demo import text as demo_text
from pipelines.errors import InputError
from stores.workspace import Workspace

log = logging.getLogger(__name__)
VERSION = 2
BASE_DIR = ("stage0", "base")  # checkpoints/stage0/base/{llama/, tokenizer.json, base.json}: what stage 1 looks for


class BaseLMResult(BaseModel):
    """Where the base model is and how its training went."""

    path: str
    trained: bool
    steps: int
    parameters: int
    vocab_size: int
    first_loss: float
    last_loss: float
    seconds: float

    def summary(self) -> str:
        what = "trained" if self.trained else "up to date"
        return (
            f"base LLaMA ({what}): {self.parameters / 1e6:.2f}M parameters, vocabulary {self.vocab_size}, "
            f"{self.steps} steps, loss {self.first_loss:.3f} -> {self.last_loss:.3f} -> {self.path}"
        )


def run(cfg: Config, force: bool = False) -> BaseLMResult:
    """Train the base (unless one made with the same settings exists) and write it atomically."""
    settings = cfg.train.stage0
    if settings is None:
        raise InputError("train.stage0 is not set: stage 0 is the demo's stand-in for LLaMA (see configs/demo.yaml)")
    ws = Workspace(cfg.workspace, cfg.storage_options)
    out = ws.checkpoints(*BASE_DIR)
    fingerprint = _fingerprint(cfg)
    done = _read_record(ws, out)
    if done and done.get("fingerprint") == fingerprint and not force:
        log.info("stage 0: the base LLaMA at %s is up to date", out)
        return BaseLMResult(path=out, trained=False, **done["result"])
    start = time.perf_counter()
    texts = demo_text.corpus(settings.texts, cfg.seed)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=settings.vocab_size)
    config = LLMConfig(
        vocab_size=tokenizer.n_words,
        dim=settings.dim,
        n_layers=settings.n_layers,
        n_heads=settings.n_heads,
        intermediate_size=settings.intermediate_size,
        max_seq_len=cfg.model.max_seq_len,
        query_layer=settings.n_layers,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
    )
    llama_config = config.llama_config()
    llama_config.attention_bias = llama_config.mlp_bias = False  # a plain LLaMA, as Meta's
    # transformers' fixed init std (0.02) suits 4096 wide; at this width it would leave every projection shrinking
    # its input ~20x, and the bind network would have to grow its output by as much to be heard. 1/sqrt(dim)
    # keeps each projection's gain near 1, as in a trained 7B.
    llama_config.initializer_range = settings.dim**-0.5
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config)
    encoded = [tokenizer.encode(t, bos=True, eos=True)[: config.max_seq_len] for t in texts]
    losses = _train(
        model, encoded, settings.steps, settings.batch_size, settings.lr, settings.weight_decay, cfg.seed, config.pad_id
    )
    result = {
        "steps": settings.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": tokenizer.n_words,
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-10:])),
        "seconds": round(time.perf_counter() - start, 2),
    }
    record = {
        "version": VERSION,
        "fingerprint": fingerprint,
        "result": result,
        "losses": losses,
        "config": config.to_dict(),
    }
    _write(ws, out, model, tokenizer, record)
    log.info("stage 0: base LLaMA trained in %.1f s, loss %.3f -> %.3f", result["seconds"], losses[0], losses[-1])
    return BaseLMResult(path=out, trained=True, **result)


def up_to_date(cfg: Config) -> bool:
    """True when the workspace holds a base made with the config's stage-0 settings (`run` would do nothing)."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    done = _read_record(ws, ws.checkpoints(*BASE_DIR))
    return cfg.train.stage0 is not None and done is not None and done.get("fingerprint") == _fingerprint(cfg)


def _train(
    model: LlamaForCausalLM,
    encoded: list[list[int]],
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    pad_id: int,
) -> list[float]:
    """Next-token loss on every token, AdamW, 5% warm-up then cosine; returns the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    losses = []
    model.train()
    progress = Progress(log, "stage 0")
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        picks = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        ids, _ = collate([(encoded[i], encoded[i]) for i in picks], pad_id)
        labels = ids.masked_fill(ids == pad_id, IGNORE)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(float(loss.detach()), 5))
        progress.update(step + 1, steps, f"steps, loss {losses[-1]:.4f}")
    return losses


def _fingerprint(cfg: Config) -> str:
    doc = {
        "version": VERSION,
        "seed": cfg.seed,
        "stage0": cfg.train.stage0.model_dump(),
        "max_seq_len": cfg.model.max_seq_len,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _read_record(ws: Workspace, out: str) -> dict | None:
    path = posixpath.join(out, "base.json")
    if not (ws.exists(path) and ws.exists(posixpath.join(out, BPE_FILE))):
        return None
    return json.loads(ws.read_bytes(path))


def _write(ws: Workspace, out: str, model: LlamaForCausalLM, tokenizer: Any, record: dict) -> None:
    """The base (llama/, the tokenizer) and, last, its record: renamed into place on a local workspace; on object
    storage the files are uploaded first and `base.json` is what makes them count."""
    if ws.is_local:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(os.path.join(tmp, "llama"))
        tokenizer.save(tmp)
        with open(os.path.join(tmp, "base.json"), "w") as f:
            json.dump(record, f, indent=1)
        replace_dir(tmp, out)
        return
    ws.remove(posixpath.join(out, "base.json"))  # an older base stops counting before its files change
    with ws.scratch() as scratch:
        model.save_pretrained(os.path.join(scratch, "llama"))
        tokenizer.save(scratch)
        for name in sorted(os.listdir(scratch)):  # llama/ and the tokenizer's file
            local, target = os.path.join(scratch, name), posixpath.join(out, name)
            if not os.path.isdir(local):
                ws.upload(local, target)
                continue
            if ws.exists(target):
                ws.fs.rm(target, recursive=True)
            ws.upload_dir(local, target)
    ws.write_bytes(posixpath.join(out, "base.json"), json.dumps(record, indent=1).encode())
