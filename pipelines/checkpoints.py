"""Checkpoints loaded one way: our checkpoint on its base LLaMA (`from_pretrained`), with what its run recorded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from model.llm.checkpoint import from_pretrained, read_checkpoint_config
from model.llm.config import LLMConfig
from model.llm.model import ImageBindLLM
from model.llm.tokenizer import TextTokenizer, load_tokenizer
from pipelines import assets
from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.train.setup import model_folder
from stores.runs import run_of
from stores.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """What a checkpoint is and where it comes from, before its weights are loaded.

    Attributes:
        folder: the local folder of its files.
        config: its model configuration.
        made_by: its own metadata: the stage and run id of the run that wrote it (empty for foreign checkpoints).
        recorded: what that run trained from (tokenizer, base_llama, encoder_id, seed), the metadata first.
    """

    folder: str
    config: LLMConfig
    made_by: dict[str, Any]
    recorded: dict[str, Any]

    @property
    def encoder_id(self) -> str | None:
        """The ImageBind it was trained on, when recorded."""
        return self.recorded.get("encoder_id")


def inspect(cfg: Config, ws: Workspace, checkpoint: str) -> Trained:
    """Read a checkpoint's configuration and metadata, and the record of the run that wrote it (InputError naming
    the file when it is not one of ours)."""
    folder = model_folder(assets.local_copy(ws, checkpoint))
    try:
        config, doc = read_checkpoint_config(folder)  # the tensors are read once, by `load`
    except ValueError as e:  # CheckpointMismatch and the like: the message names the file
        raise InputError(str(e)) from None
    made_by = doc.get("metadata") or {}
    run = run_of(ws, made_by)
    recorded = (run.job if run else {}) | {k: v for k, v in made_by.items() if v is not None}
    return Trained(folder=folder, config=config, made_by=made_by, recorded=recorded)


def load(cfg: Config, ws: Workspace, trained: Trained, dtype: torch.dtype | None = None
         ) -> tuple[ImageBindLLM, TextTokenizer]:  # fmt: skip
    """The model on its base LLaMA (the configured one, else the demo's, else the run's) and its tokenizer."""
    base = assets.base_llama(cfg, ws, trained.recorded.get("base_llama"))
    base = assets.local_copy(ws, base) if base else None
    if base is None:  # training built the same seeded random base: rebuild it so the checkpoint fits
        log.warning("no base LLaMA (model.llama_path): the seeded random tiny LLaMA of the run, for tests only")
        torch.manual_seed(int(trained.recorded.get("seed", cfg.seed)))
    try:
        tokenizer = load_tokenizer(assets.local_copy(ws, assets.tokenizer(cfg, ws, trained.recorded.get("tokenizer"))))
        model = from_pretrained(trained.folder, llama=base, dtype=dtype)
    except ValueError as e:  # TokenizerError, CheckpointMismatch: the message names the file
        raise InputError(str(e)) from None
    return model, tokenizer
