"""Inference (`ibllm generate`): answer prompts about any mix of image, audio, video and text, one or a JSONL batch."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
from pydantic import BaseModel, SerializeAsAny

from model.llm.prompts import CAPTION_INSTRUCTION
from pipelines import assets
from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.runtime import loader
from pipelines.runtime.answerer import Answerer
from pipelines.runtime.inputs import TEXT_NEEDS_VOCAB, Request, check_request, file_requests

# What an option adds to an answer from its text, its request's image paths and its line (None for one request).
Annotate = Callable[[str, list[str], int | None], BaseModel]

log = logging.getLogger(__name__)


class Answer(BaseModel):
    """One request's answer (or the error that stopped it), with what it was asked."""

    line: int | None = None
    inputs: dict[str, list[str]] = {}
    weights: dict[str, float] = {}
    prompt: str | None = None
    answer: str | None = None
    finish_reason: str | None = None  # stop (the model ended it) or length (cut by infer.max_new_tokens)
    error: str | None = None
    seconds: float = 0.0
    grounding: SerializeAsAny[BaseModel] | None = None  # with --ground: the answer's phrases found in its image


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
            return (
                f"{len(self.answers)} request(s), {self.errors} error(s) -> {self.output} "
                f"(checkpoint {self.checkpoint})"
            )
        if len(self.answers) == 1 and self.answers[0].line is None:
            one = self.answers[0]
            found = getattr(one.grounding, "summary", None)
            return (one.answer or "") + (f"\n{found()}" if found else "")
        return "\n".join(a.model_dump_json(exclude_none=True) for a in self.answers)


def run(
    cfg: Config,
    request: Request | None = None,
    requests_file: str | None = None,
    output: str | None = None,
    annotate: Annotate | None = None,
) -> GenerateResult:
    """Answer one request (its errors raise InputError) or every line of a JSONL file of requests, whose fields
    override `request`'s (a bad line gets an error entry naming it; the others still run), with the model of
    `pipelines.runtime` (`infer.*`: checkpoint, device, dtype, cache, batch, sampling). The model, tokenizer and
    encoder are loaded once; up to `infer.batch` requests are decoded together, and with `output` the answers are
    written there as JSON lines as each chunk of them is done. `annotate` adds to each answer what it finds from the
    answer and its images (`generate --ground`: the answer's phrases found by a detector)."""
    start = time.perf_counter()
    batch = cfg.infer.batch
    defaults = request or Request()
    items: list[tuple[int | None, Request | InputError]]
    if requests_file is None:
        check_request(defaults)
        if defaults.text and assets.clip_vocab_file(cfg, loader.workspace(cfg)) is None:
            raise InputError(TEXT_NEEDS_VOCAB)
        items = [(None, defaults)]
    else:
        items = file_requests(defaults, requests_file)
    need_encoder = any(isinstance(r, Request) and r.inputs() for _, r in items)
    loaded = loader.load(cfg, need_encoder, slots=min(batch, len(items)))
    answerer = loaded.answerer
    answers = []
    with _lines(output, cfg.storage_options) as write:
        for at in range(0, len(items), 4 * batch):  # a bounded queue; each chunk's answers are written when done
            for entry in _answer_chunk(answerer, items[at : at + 4 * batch]):
                if annotate and entry.error is None:
                    _annotate(annotate, entry)
                answers.append(entry)
                write(entry.model_dump_json(exclude_none=True))
    cut = sum(a.finish_reason == "length" for a in answers)
    if cut:
        what = "the answer was" if len(answers) == 1 else f"{cut} of {len(answers)} answers were"
        log.warning(
            "%s cut at the token budget (finish_reason length): max_new_tokens (infer.max_new_tokens %d, "
            "--max-new-tokens, or the request's own) or the model's max_seq_len",
            what,
            cfg.infer.max_new_tokens,
        )
    empty = sum(a.error is None and not a.answer for a in answers)
    if empty:
        what = "the answer is" if len(answers) == 1 else f"{empty} of {len(answers)} answers are"
        log.warning("%s empty: the model ended it at its first token (finish_reason stop)", what)
    return GenerateResult(
        checkpoint=loaded.checkpoint,
        trained_encoder_id=loaded.trained.encoder_id,
        encoder_id=answerer.encoder.encoder_id if answerer.encoder else None,
        cache=cfg.index.name if answerer.cache else None,
        answers=answers,
        errors=sum(a.error is not None for a in answers),
        output=output,
        seconds=round(time.perf_counter() - start, 3),
    )


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
        entry = Answer(
            line=number,
            inputs=given,
            weights={m: req.weights.get(m, 1.0) for m in given},
            prompt=req.prompt or (CAPTION_INSTRUCTION if given else None),
            seconds=seconds,
        )
        if isinstance(result, InputError):
            if number is None:
                raise result
            entry.error = f"line {number}: {result}"
        else:
            entry.answer, entry.finish_reason = result.text, result.finish
        out.append(entry)
    return out


def _annotate(annotate: Annotate, entry: Answer) -> None:
    """The answer's annotation; in batch mode an InputError of it becomes the line's error, else it is raised."""
    try:
        entry.grounding = annotate(entry.answer or "", entry.inputs.get("image", []), entry.line)
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
