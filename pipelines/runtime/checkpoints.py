"""Which checkpoint answers, and loading it one way: our checkpoint on its base LLaMA, with what its run recorded."""

from __future__ import annotations

import logging
import os
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
from pipelines.paths import absolute, is_url
from stores import registry
from stores.runs import Runs, run_of
from stores.workspace import OutsideWorkspace, Workspace

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


def choose(ws: Workspace, given: str | None = None) -> str:
    """The checkpoint to answer with: `given` (`infer.checkpoint`), else the registry's promoted stage-2 checkpoint
    (the model in service), else the newest complete stage-2 run, else stage-1's. Logs which, and why."""
    path, why = _choice(ws, given)
    log.info("checkpoint %s: %s", path, why)
    return path


def _choice(ws: Workspace, given: str | None) -> tuple[str, str]:
    if given:
        found = resolve(ws, given)
        return found, "given" if found == given else f"given as {given}"
    try:
        in_service = registry.promoted(ws)
    except OutsideWorkspace as e:  # a copied workspace whose promoted model was not copied with it
        log.warning("the promoted model is not in this workspace (%s): using the newest complete run", e)
        in_service = None
    if in_service is not None:
        if "://" in in_service.stage2_checkpoint or os.path.isdir(in_service.stage2_checkpoint):
            return in_service.stage2_checkpoint, f"the promoted model (stage-2 run {in_service.stage2_run_id})"
        log.warning("the promoted checkpoint %s is gone: using the newest complete run", in_service.stage2_checkpoint)
    for stage in (2, 1):
        found = Runs.of_stage(ws, stage).newest_complete()
        if found:
            return found, f"the newest complete stage-{stage} run (nothing promoted)"
    raise InputError(f"no trained checkpoint in {ws.url()}: run `ibllm train --stage 1` first (or give --checkpoint)")


def resolve(ws: Workspace, given: str) -> str:
    """A checkpoint path a user typed: as given (an URL, or found from the current directory), else relative to the
    workspace. A training run's folder stands for its newest checkpoint, a stage's folder (`checkpoints/stage2`) for
    its newest complete run's. Raises InputError saying where it looked."""
    if is_url(given):
        return given
    tried = [absolute(given)]
    if ws.is_local and not os.path.isabs(os.path.expanduser(given)):
        tried.append(ws.path(given))
    for path in tried:
        if os.path.isdir(path):
            folder = Workspace(path)
            return _run_checkpoint(path) or Runs(folder, folder.base).newest_complete() or path
    raise InputError(f"checkpoint not found: looked for {' and '.join(tried)}")


def _run_checkpoint(folder: str) -> str | None:
    """The checkpoint a run folder (`checkpoints/stage<N>/<run_id>/`) records as its newest, else None."""
    parent, run_id = os.path.split(folder.rstrip("/"))
    return Runs(Workspace(parent), parent).checkpoint_of(run_id)


def model_folder(local: str) -> str:
    """The folder of a checkpoint's files: the folder itself, or a run's step folder's `model/`."""
    nested = os.path.join(local, "model")
    return nested if not os.path.isfile(os.path.join(local, "config.json")) and os.path.isdir(nested) else local


def inspect(cfg: Config, ws: Workspace, checkpoint: str) -> Trained:
    """Read a checkpoint's configuration and metadata, and the record of the run that wrote it (InputError naming
    the file when it is not one of ours)."""
    folder = model_folder(assets.local_copy(ws, checkpoint))
    try:
        config, doc = read_checkpoint_config(folder)  # the tensors are read once, by `load`
    except ValueError as e:  # CheckpointMismatch and the like: the message names the file
        raise InputError(str(e)) from None
    metadata = doc.get("metadata") or {}
    made_by = ws.placed(metadata, metadata.get("relative"))  # its base and tokenizer, if in the workspace: here
    run = run_of(ws, made_by)
    recorded = (run.job if run else {}) | {k: v for k, v in made_by.items() if v is not None}
    return Trained(folder=folder, config=config, made_by=made_by, recorded=recorded)


def load(
    cfg: Config, ws: Workspace, trained: Trained, dtype: torch.dtype | None = None
) -> tuple[ImageBindLLM, TextTokenizer]:
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
