"""Inference (`ibllm generate`): answer prompts about any mix of image, audio, video and text, one or a JSONL batch."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import torch
from pydantic import BaseModel

from model.imagebind.encoder import DType, ImageBind, resolve_device, resolve_dtype
from model.llm.engine import Engine
from model.llm.model import CacheLookup
from model.llm.prompts import CAPTION_INSTRUCTION
from pipelines import assets, checkpoints
from pipelines.apps.ground import Grounder, Grounding, GroundOptions
from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.infer.answerer import Answerer
from pipelines.infer.inputs import TEXT_NEEDS_VOCAB, PointOptions, Request, check_request, file_requests
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
    grounding: Grounding | None = None  # with --ground: the answer's phrases found in its image


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
            one = self.answers[0]
            return (one.answer or "") + (f"\n{one.grounding.summary()}" if one.grounding else "")
        return "\n".join(a.model_dump_json(exclude_none=True) for a in self.answers)


def workspace_of(cfg: Config) -> Workspace:
    """The configured workspace."""
    return Workspace(cfg.workspace, cfg.storage_options)


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


def load_answerer(cfg: Config, checkpoint: str, need_encoder: bool, use_cache: bool, device: str, dtype: DType,
                  slots: int = 16) -> tuple[Answerer, checkpoints.Trained]:  # fmt: skip
    """The model of `checkpoint` ready to answer, and what the checkpoint is (its config, the run that made it, the
    encoder it was trained on). The encoder (and cache) is loaded now when `need_encoder`, else on first need."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    trained = checkpoints.inspect(cfg, ws, checkpoint)
    dev = resolve_device(device)

    def load_encoder() -> tuple[ImageBind, CacheLookup | None]:
        return _encoder_and_cache(cfg, ws, checkpoint, trained.encoder_id, trained.config.feature_dim, device,
                                  dtype, use_cache)  # fmt: skip

    encoder, cache = load_encoder() if need_encoder else (None, None)
    model, tokenizer = checkpoints.load(cfg, ws, trained, resolve_dtype(dtype, dev))
    model = model.to(dev).eval()
    engine = Engine(model, slots=slots, device=dev)
    model.keep_visual_path_only()  # the engine holds the language model now
    answerer = Answerer(model, tokenizer, engine, encoder, cache, cfg.index.cache_t, cfg.index.cache_weight,
                        cfg.model.max_image_pixels, PointOptions(cfg.model.point_normalize, cfg.model.point_resample),
                        load_encoder)  # fmt: skip
    return answerer, trained


def _encoder_and_cache(cfg: Config, ws: Workspace, checkpoint: str, trained: str | None, feature_dim: int,
                       device: str, dtype: DType, use_cache: bool) -> tuple[ImageBind, CacheLookup | None]:  # fmt: skip
    """The configured ImageBind, refused when the checkpoint was trained on another, and the cache lookup."""
    encoder = configured_encoder(cfg, ws, device, dtype)
    if trained and trained != encoder.encoder_id:
        raise InputError(f"checkpoint {checkpoint} was trained on encoder {trained}, but the configured encoder "
                         f"is {encoder.encoder_id} (model.imagebind, model.imagebind_checkpoint, seed): use the "
                         "encoder it was trained on, or a checkpoint trained on this one")  # fmt: skip
    if not trained:
        log.warning("%s records no encoder id: assuming it was trained on %s", checkpoint, encoder.encoder_id)
    if encoder.dim != feature_dim:
        raise InputError(f"the encoder gives {encoder.dim}-d embeddings, checkpoint {checkpoint} takes {feature_dim}")
    return encoder, open_cache(cfg, ws, encoder) if use_cache else None


def configured_encoder(cfg: Config, ws: Workspace, device: str, dtype: DType) -> ImageBind:
    """The configured ImageBind (its point branch when configured) with the CLIP vocabulary of the config or demo."""
    m = cfg.model
    vocab = assets.clip_vocab_file(cfg, ws)
    return ImageBind.load(m.imagebind, checkpoint=m.imagebind_checkpoint, vocab=vocab, device=device, dtype=dtype,
                          seed=cfg.seed, point_checkpoint=m.point_checkpoint)  # fmt: skip


def open_cache(cfg: Config, ws: Workspace, encoder: ImageBind) -> CacheLookup:
    """The visual cache of the encoder's features (`index.name`) as a lookup; InputError when missing or built for
    another encoder."""
    try:
        index = CacheIndex.open(ws, cfg.index.name, encoder.encoder_id, encoder.dim, cfg.index.use_gpu)
    except (FileNotFoundError, IndexMismatch) as e:
        raise InputError(str(e)) from None
    return cache_lookup(index, cfg.index.cache_k)


def run(
    cfg: Config,
    request: Request | None = None,
    requests_file: str | None = None,
    checkpoint: str | None = None,
    cache: bool = False,
    output: str | None = None,
    device: str = "auto",
    dtype: DType = "auto",
    batch: int = 16,
    ground: GroundOptions | None = None,
) -> GenerateResult:
    """Answer one request (its errors raise InputError) or every line of a JSONL file of requests, whose fields
    override `request`'s (a bad line gets an error entry naming it; the others still run). The model, tokenizer
    and encoder are loaded once; up to `batch` requests are decoded together, and with `output` the answers are
    written there as JSON lines as each chunk of them is done. With `ground`, each answer's phrases are found in its
    image by the configured detector (pipelines.apps.ground)."""
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
        items = file_requests(defaults, requests_file)
    grounder = Grounder(cfg, ground, device) if ground else None  # its settings checked before any model loads
    chosen = choose_checkpoint(ws, checkpoint)
    need_encoder = any(isinstance(r, Request) and r.inputs() for _, r in items)
    answerer, made = load_answerer(cfg, chosen, need_encoder, cache, device, dtype, slots=min(batch, len(items)))
    answers = []
    with _lines(output, cfg.storage_options) as write:
        for at in range(0, len(items), 4 * batch):  # a bounded queue; each chunk's answers are written when done
            for entry in _answer_chunk(answerer, items[at : at + 4 * batch]):
                if grounder and entry.error is None:
                    _ground(grounder, entry)
                answers.append(entry)
                write(entry.model_dump_json(exclude_none=True))
    return GenerateResult(
        checkpoint=chosen, trained_encoder_id=made.encoder_id,
        encoder_id=answerer.encoder.encoder_id if answerer.encoder else None,
        cache=cfg.index.name if answerer.cache else None, answers=answers,
        errors=sum(a.error is not None for a in answers), output=output, seconds=round(time.perf_counter() - start, 3),
    )  # fmt: skip


def _answer_chunk(answerer: Answerer, items: list[tuple[int | None, Request | InputError]]) -> list[Answer]:
    """Answers of a chunk of requests decoded together; in batch mode (line numbers) an InputError becomes the
    line's error entry, for a single request it is raised."""
    start = time.perf_counter()
    requests = [r for _, r in items if isinstance(r, Request)]
    results = iter(answerer.answer_all(requests))
    seconds = round(time.perf_counter() - start, 3)
    out = []
    for number, req in items:
        if isinstance(req, InputError):
            out.append(Answer(line=number, error=str(req)))
            continue
        result = next(results)
        given = req.inputs()
        entry = Answer(line=number, inputs=given, weights={m: req.weights.get(m, 1.0) for m in given},
                       prompt=req.prompt or (CAPTION_INSTRUCTION if given else None), seconds=seconds)  # fmt: skip
        if isinstance(result, InputError):
            if number is None:
                raise result
            entry.error = f"line {number}: {result}"
        else:
            entry.answer = result
        out.append(entry)
    return out


def _ground(grounder: Grounder, entry: Answer) -> None:
    """The answer's grounding; in batch mode a grounding InputError becomes the line's error, else it is raised."""
    try:
        entry.grounding = grounder.ground(entry.answer, entry.inputs.get("image", []), entry.line)
    except InputError as e:
        if entry.line is None:
            raise
        entry.error = f"line {entry.line}: {e}"


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
