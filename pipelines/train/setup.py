"""What a training run needs, resolved once by the driver (Job) and rebuilt by every worker (model, batches)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import torch
from transformers import LlamaConfig

from model.imagebind.encoder import encoder_id_for
from model.llm.checkpoint import load_llama, load_tensors, read_checkpoint
from model.llm.config import LLMConfig, config_from_llama
from model.llm.model import ImageBindLLM
from model.llm.tokenizer import load_tokenizer
from pipelines import assets
from pipelines.config import Config, StageConfig
from pipelines.errors import InputError
from pipelines.train.data import (
    CAPTION_PROMPT,
    ExampleList,
    ExampleSource,
    FeatureCaptions,
    Plan,
    count_split,
    prefetch,
    step_batches,
)
from pipelines.train.instructions import instruction_examples
from pipelines.train.job import Job
from stores.features import feature_files
from stores.runs import Runs
from stores.workspace import Workspace

log = logging.getLogger(__name__)


def resolve_job(
    cfg: Config, ws: Workspace, stage: int, run_id: str, max_steps: int | None = None, init: str | None = None
) -> Job:
    """Check every input of the stage (clear errors before anything runs) and size the run.

    Stage 2 starts from `init` (a stage-1 checkpoint folder), by default the newest complete stage-1 run's.
    """
    sc = getattr(cfg.train, f"stage{stage}")
    m = cfg.model
    encoder_id = encoder_id_for(m.imagebind, m.imagebind_checkpoint, cfg.seed)
    tokenizer_path = assets.tokenizer(cfg, ws)
    tokenizer = load_tokenizer(assets.local_copy(ws, tokenizer_path))
    base = assets.base_llama(cfg, ws)
    llm = _llm_config(cfg, ws, base, tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id)
    feature_parts: list[str] = []
    instruction_files: list[str] = []
    if stage == 1:
        feature_parts = stage1_features(cfg, ws, encoder_id)
        examples = count_split(ws, feature_parts, cfg.train.holdout, "train")
        prompt = len(tokenizer.encode(CAPTION_PROMPT, bos=True, eos=False))
        if prompt >= sc.max_words:
            raise InputError(
                f"the stage-1 prompt is {prompt} tokens with {tokenizer_path}: train.stage1.max_words "
                f"{sc.max_words} leaves no room for the caption"
            )
    else:
        instruction_files = assets.stage2_data(cfg, ws)
        if not instruction_files:
            raise InputError("train.stage2.data lists no instruction files (Alpaca, ShareGPT, LLaVA, cc_sbu_align)")
        chosen = "given" if init else "the newest complete stage-1 run"
        init = init or Runs.of_stage(ws, 1).newest_complete()
        if init is None:
            raise InputError("stage 2 starts from a stage-1 checkpoint: run `ibllm train --stage 1` first")
        log.info("stage 2 starts from %s (%s)", init, chosen)
        feature_parts = _all_feature_parts(ws, encoder_id)
        examples = len(
            instruction_examples(
                ws,
                encoder_id,
                instruction_files,
                feature_parts,
                sc.conversation,
                tokenizer,
                tokenizer_name(tokenizer_path, base),
            )
        )
    return Job(
        stage=stage,
        run_id=run_id,
        workspace=cfg.workspace,
        storage_options=dict(cfg.storage_options),
        seed=cfg.seed,
        train=cfg.train.model_copy(deep=True),
        llm=llm.to_dict(),
        tokenizer=tokenizer_path,
        base_llama=base,
        init_checkpoint=init,
        encoder_id=encoder_id,
        feature_files=feature_parts,
        instruction_files=instruction_files,
        examples=examples,
        steps_per_epoch=_plan(sc, sc.workers).steps_per_epoch(examples),
        max_steps=max_steps,
    )


def tokenizer_name(path: str, base: str | None) -> str:
    """The tokenizer as messages name it: its file and the base it belongs to."""
    return f"{path} (base {base or 'the random tiny LLaMA'})"


def _llm_config(cfg: Config, ws: Workspace, base: str | None, vocab: int, bos: int, eos: int) -> LLMConfig:
    m = cfg.model
    lora = {"lora_rank": m.lora_rank, "lora_alpha": m.lora_alpha, "max_seq_len": m.max_seq_len}
    if base:
        return config_from_llama(LlamaConfig.from_pretrained(assets.local_copy(ws, base)), **lora)
    if m.llama != "tiny":
        raise InputError(
            f"model.llama is {m.llama!r}: give model.llama_path (a transformers LLaMA folder, see "
            "`ibllm convert llama`)"
        )
    log.warning("no base LLaMA (model.llama_path): a randomly initialised tiny LLaMA, good for tests only")
    return LLMConfig.preset("tiny", vocab_size=vocab, bos_id=bos, eos_id=eos, **lora)


def stage1_features(cfg: Config, ws: Workspace, encoder_id: str) -> list[str]:
    """The feature parts stage 1 reads: those of `train.stage1.data`'s sources (default: every source)."""
    parts = []
    for source in cfg.train.stage1.data or _feature_sources(ws, encoder_id):
        files, _ = feature_files(ws, encoder_id, source)
        if not files:
            raise InputError(
                f"train.stage1.data: no features of source {source!r} for {encoder_id}; run `ibllm extract` first"
            )
        parts += [ws.as_url(f) for f in files]
    if not parts:
        raise InputError(f"stage 1 needs features: none under {ws.as_url(ws.features(encoder_id, ''))}")
    return parts


def _feature_sources(ws: Workspace, encoder_id: str) -> list[str]:
    return sorted({os.path.basename(os.path.dirname(p)) for p in ws.glob(ws.features(encoder_id, "*", "part-*"))})


def _all_feature_parts(ws: Workspace, encoder_id: str) -> list[str]:
    return [ws.as_url(f) for s in _feature_sources(ws, encoder_id) for f in feature_files(ws, encoder_id, s)[0]]


def build_model(job: Job) -> ImageBindLLM:
    """The model of the run, identical on every worker: base LLaMA + adapter (+ the stage-1 checkpoint in stage 2)."""
    config = LLMConfig.from_dict(job.llm)
    torch.manual_seed(job.seed)
    ws = Workspace(job.workspace, job.storage_options)
    llama = load_llama(assets.local_copy(ws, job.base_llama)) if job.base_llama else None
    model = ImageBindLLM(config, llama)
    if job.init_checkpoint:
        _, tensors, _ = read_checkpoint(assets.local_copy(ws, job.init_checkpoint))
        load_tensors(model, tensors, job.init_checkpoint)
    return model


def _plan(settings: StageConfig, world: int) -> Plan:
    """How a stage's global batch splits over `world` workers."""
    return Plan(settings.global_batch_size, world, settings.micro_batches(world), settings.max_words)


def build_batches(job: Job, ws: Workspace, rank: int, world: int) -> Callable[[int], Iterator]:
    """start step -> this worker's micro-batches of every step from there on (prefetched in a thread)."""
    tokenizer = load_tokenizer(assets.local_copy(ws, job.tokenizer))
    s = job.settings
    source: ExampleSource
    if job.stage == 1:
        source = FeatureCaptions(
            ws, job.feature_files, job.seed, s.shuffle_buffer, job.train.holdout, "train", job.examples
        )
    else:
        name = tokenizer_name(job.tokenizer, job.base_llama)
        examples = instruction_examples(
            ws, job.encoder_id, job.instruction_files, job.feature_files, s.conversation, tokenizer, name
        )
        source = ExampleList(examples, job.seed)
    plan, pad = _plan(s, world), LLMConfig.from_dict(job.llm).pad_id
    return lambda start: prefetch(step_batches(source, tokenizer, plan, rank, start, pad))
