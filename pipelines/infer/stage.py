"""Inference (`ibllm generate`): answer prompts about any mix of image, audio, video and text, one or a JSONL batch."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from pydantic import BaseModel

from model.imagebind.encoder import DType, ImageBind, resolve_device, resolve_dtype
from model.llm.generate import Sampling, generate_text
from model.llm.model import CacheLookup, ImageBindLLM
from model.llm.prompts import CAPTION_INSTRUCTION, format_prompt
from model.llm.tokenizer import TextTokenizer
from pipelines import assets, checkpoints
from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.infer.inputs import TEXT_NEEDS_VOCAB, Request, check_request, embed_request, read_requests
from pipelines.paths import resolve_checkpoint
from stores import registry
from stores.index import CacheIndex, IndexMismatch
from stores.runs import Runs
from stores.workspace import OutsideWorkspace, Workspace

log = logging.getLogger(__name__)


class Answer(BaseModel):
    """One request's answer (or the error that stopped it), with what it was asked."""

    line: int | None = None
    inputs: dict[str, list[str]] = {}
    weights: dict[str, float] = {}
    prompt: str | None = None
    answer: str | None = None
    error: str | None = None
    seconds: float = 0.0


class GenerateResult(BaseModel):
    """What `ibllm generate` answered, with which checkpoint, encoder and cache."""

    checkpoint: str
    trained_encoder_id: str | None
    encoder_id: str | None
    cache: str | None
    answers: list[Answer]
    errors: int
    output: str | None
    seconds: float

    def summary(self) -> str:
        """The answer alone for one request; else one JSON line per request, or where they were written."""
        if self.output:
            return (f"{len(self.answers)} request(s), {self.errors} error(s) -> {self.output} "
                    f"(checkpoint {self.checkpoint})")  # fmt: skip
        if len(self.answers) == 1 and self.answers[0].line is None:
            return self.answers[0].answer or ""
        return "\n".join(a.model_dump_json(exclude_none=True) for a in self.answers)


def choose_checkpoint(ws: Workspace, given: str | None = None) -> str:
    """The checkpoint to answer with: `given`, else the registry's promoted stage-2 checkpoint (the model in
    service), else the newest complete stage-2 run, else stage-1's."""
    if given:
        return resolve_checkpoint(ws, given)
    try:
        in_service = registry.promoted(ws)
    except OutsideWorkspace as e:  # a copied workspace whose promoted model was not copied with it
        log.warning("the promoted model is not in this workspace (%s): using the newest complete run", e)
        in_service = None
    if in_service is not None:
        if "://" in in_service.stage2_checkpoint or os.path.isdir(in_service.stage2_checkpoint):
            return in_service.stage2_checkpoint
        log.warning("the promoted checkpoint %s is gone: using the newest complete run", in_service.stage2_checkpoint)
    for stage in (2, 1):
        found = Runs.of_stage(ws, stage).newest_complete()
        if found:
            return found
    raise InputError(f"no trained checkpoint in {ws.url()}: run `ibllm train --stage 1` first (or give --checkpoint)")


def cache_lookup(index: CacheIndex, k: int) -> CacheLookup:
    """The model's cache callable over an opened index: (B, D) mixed query -> sims (B, k), neighbours (B, k, D).

    As the reference, the query is searched as it is, not normalised: a mix of several modalities has a norm below 1,
    and the similarities that `model.llm.cache.cache_mix` takes the softmax of are its inner products with the cached
    (unit) features. With `index.values: float32` the neighbours are the stored features exactly.
    """
    k = min(k, index.count)

    def lookup(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = query.detach().float().cpu().numpy()
        sims, ids = index.search(q, k)
        return torch.from_numpy(sims), torch.from_numpy(index.gather(np.where(ids < 0, 0, ids)))

    return lookup


@dataclass
class Engine:
    """A loaded model, tokenizer, encoder (when some request needs it) and cache: answers requests one by one."""

    model: ImageBindLLM
    tokenizer: TextTokenizer
    encoder: ImageBind | None
    cache: CacheLookup | None
    cache_t: float
    cache_w: float
    max_image_pixels: int | None = None

    @torch.no_grad()
    def answer(self, req: Request) -> str:
        """The answer to one (merged) request."""
        visual = None
        if req.inputs():
            if self.encoder is None:
                raise InputError("inputs given but no ImageBind encoder was loaded")
            embeddings = embed_request(self.encoder, req, self.max_image_pixels)
            weights = {m: req.weights.get(m, 1.0) for m in embeddings}
            if sum(weights.values()) <= 0:
                raise InputError(f"the weights of the inputs ({weights}) sum to 0: give one a positive weight")
            device = next(self.model.parameters()).device
            visual = self.model.visual_query({m: e.to(device) for m, e in embeddings.items()}, weights,
                                             cache=self.cache, cache_t=self.cache_t, cache_w=self.cache_w)  # fmt: skip
        base = Sampling()
        sampling = Sampling(
            temperature=base.temperature if req.temperature is None else req.temperature,
            top_p=base.top_p if req.top_p is None else req.top_p,
            max_new_tokens=base.max_new_tokens if req.max_new_tokens is None else req.max_new_tokens,
            max_seq_len=self.model.config.max_seq_len,
        )
        prompt = format_prompt(req.prompt or CAPTION_INSTRUCTION)
        try:
            return generate_text(self.model, self.tokenizer, [prompt], visual, sampling, req.seed)[0]
        except ValueError as e:  # a prompt too long for max_seq_len
            raise InputError(f"prompt: {e}") from None


def merge(defaults: Request, line: Request) -> Request:
    """A request line over the command line's values (weights merged, the line's winning)."""
    update = {k: getattr(line, k) for k in line.model_fields_set}
    update["weights"] = {**defaults.weights, **line.weights}
    return defaults.model_copy(update=update)


def load_engine(cfg: Config, checkpoint: str, need_encoder: bool, use_cache: bool, device: str, dtype: DType
                ) -> tuple[Engine, str | None]:  # fmt: skip
    """The engine for `checkpoint` and the encoder id it was trained on (None when nothing records it)."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    trained = checkpoints.inspect(cfg, ws, checkpoint)
    dev = resolve_device(device)
    encoder, cache = None, None
    if need_encoder:
        encoder, cache = _encoder_and_cache(cfg, ws, checkpoint, trained.encoder_id, trained.config.feature_dim,
                                            device, dtype, use_cache)  # fmt: skip
    model, tokenizer = checkpoints.load(cfg, ws, trained, resolve_dtype(dtype, dev))
    engine = Engine(model.to(dev).eval(), tokenizer, encoder, cache, cfg.index.cache_t, cfg.index.cache_weight,
                    cfg.model.max_image_pixels)  # fmt: skip
    return engine, trained.encoder_id


def _encoder_and_cache(cfg: Config, ws: Workspace, checkpoint: str, trained: str | None, feature_dim: int,
                       device: str, dtype: DType, use_cache: bool) -> tuple[ImageBind, CacheLookup | None]:  # fmt: skip
    """The configured ImageBind, refused when the checkpoint was trained on another, and the cache lookup."""
    m = cfg.model
    vocab = assets.clip_vocab_file(cfg, ws)
    encoder = ImageBind.load(m.imagebind, checkpoint=m.imagebind_checkpoint, vocab=vocab, device=device, dtype=dtype,
                             seed=cfg.seed)  # fmt: skip
    if trained and trained != encoder.encoder_id:
        raise InputError(f"checkpoint {checkpoint} was trained on encoder {trained}, but the configured encoder "
                         f"is {encoder.encoder_id} (model.imagebind, model.imagebind_checkpoint, seed): use the "
                         "encoder it was trained on, or a checkpoint trained on this one")  # fmt: skip
    if not trained:
        log.warning("%s records no encoder id: assuming it was trained on %s", checkpoint, encoder.encoder_id)
    if encoder.dim != feature_dim:
        raise InputError(f"the encoder gives {encoder.dim}-d embeddings, checkpoint {checkpoint} takes {feature_dim}")
    if not use_cache:
        return encoder, None
    try:
        index = CacheIndex.open(ws, cfg.index.name, encoder.encoder_id, encoder.dim, cfg.index.use_gpu)
    except (FileNotFoundError, IndexMismatch) as e:
        raise InputError(str(e)) from None
    return encoder, cache_lookup(index, cfg.index.cache_k)


def run(
    cfg: Config,
    request: Request | None = None,
    requests_file: str | None = None,
    checkpoint: str | None = None,
    cache: bool = False,
    output: str | None = None,
    device: str = "auto",
    dtype: DType = "auto",
) -> GenerateResult:
    """Answer one request (its errors raise InputError) or every line of a JSONL file of requests, whose fields
    override `request`'s (a bad line gets an error entry naming it; the others still run). The model, tokenizer
    and encoder are loaded once; with `output` each answer is written there as one JSON line when it is ready."""
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    defaults = request or Request()
    items: list[tuple[int | None, Request | InputError]]
    if requests_file is None:
        check_request(defaults)
        if defaults.text and assets.clip_vocab_file(cfg, ws) is None:
            raise InputError(TEXT_NEEDS_VOCAB)
        items = [(None, defaults)]
    else:
        if defaults.inputs():
            raise InputError("--requests reads the inputs from the file: drop --image, --audio, --video and --text")
        items = [(n, r if isinstance(r, InputError) else merge(defaults, r)) for n, r in read_requests(requests_file)]
    chosen = choose_checkpoint(ws, checkpoint)
    need_encoder = any(isinstance(r, Request) and r.inputs() for _, r in items)
    engine, trained = load_engine(cfg, chosen, need_encoder, cache, device, dtype)
    answers = []
    with _lines(output, cfg.storage_options) as write:
        for number, req in items:
            answers.append(_answer(engine, number, req))
            write(answers[-1].model_dump_json(exclude_none=True))
    return GenerateResult(
        checkpoint=chosen, trained_encoder_id=trained,
        encoder_id=engine.encoder.encoder_id if engine.encoder else None,
        cache=cfg.index.name if engine.cache else None, answers=answers,
        errors=sum(a.error is not None for a in answers), output=output, seconds=round(time.perf_counter() - start, 3),
    )  # fmt: skip


def _answer(engine: Engine, number: int | None, req: Request | InputError) -> Answer:
    """One request's Answer; in batch mode (a line number) its InputError becomes the entry's error."""
    if isinstance(req, InputError):
        return Answer(line=number, error=str(req))
    start = time.perf_counter()
    entry = Answer(line=number, inputs=req.inputs(), weights={m: req.weights.get(m, 1.0) for m in req.inputs()},
                   prompt=req.prompt or (CAPTION_INSTRUCTION if req.inputs() else None))  # fmt: skip
    try:
        check_request(req)
        entry.answer = engine.answer(req)
    except InputError as e:
        if number is None:
            raise
        entry.error = f"line {number}: {e}"
    entry.seconds = round(time.perf_counter() - start, 3)
    return entry


@contextlib.contextmanager
def _lines(output: str | None, storage_options: dict[str, Any]) -> Iterator[Callable[[str], None]]:
    """A writer of JSON lines into `output` (flushed line by line), or one that drops them (no output file)."""
    if output is None:
        yield lambda line: None
        return
    with fsspec.open(output, "w", encoding="utf-8", **storage_options) as f:

        def write(line: str) -> None:
            f.write(line + "\n")
            f.flush()

        yield write
