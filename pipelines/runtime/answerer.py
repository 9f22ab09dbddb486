"""A loaded model answering requests: their visual queries, their conversation prompts, decoded together."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from model.imagebind.encoder import ImageBind
from model.llm.chat import ConversationTooLong, fit_conversation
from model.llm.engine import Engine
from model.llm.generate import Sampling
from model.llm.model import CacheLookup, ImageBindLLM
from model.llm.prompts import CAPTION_INSTRUCTION
from model.llm.tokenizer import TextTokenizer
from pipelines.errors import InputError
from pipelines.runtime.inputs import PointOptions, Request, check_request, weighted_embeddings

log = logging.getLogger(__name__)
StreamCallback = Callable[[int, str], None]  # (index of the request, its answer so far)


@dataclass(frozen=True)
class Reply:
    """An answer, and why it ended: `stop` (the model ended it) or `length` (cut by the token budget)."""

    text: str
    finish: str = "stop"


@dataclass
class Answerer:
    """The model's visual path, its tokenizer, the generation engine, and the encoder and cache when loaded.

    `load_encoder` loads the encoder and cache on first need (a chat that starts with text only); `defaults` is
    the sampling of a request that gives none.
    """

    model: ImageBindLLM
    tokenizer: TextTokenizer
    engine: Engine
    defaults: Sampling  # where a request gives none: the config's infer.* (runtime.loader.sampling_defaults)
    encoder: ImageBind | None
    cache: CacheLookup | None
    cache_t: float
    cache_w: float
    max_image_pixels: int | None = None
    points: PointOptions = field(default_factory=PointOptions)
    load_encoder: Callable[[], tuple[ImageBind, CacheLookup | None]] | None = None

    @property
    def max_seq_len(self) -> int:
        return self.model.config.max_seq_len

    @torch.no_grad()
    def visual(self, req: Request, use_cache: bool | None = None) -> torch.Tensor | None:
        """The request's bound visual query (1, 1, dim), or None without inputs; `use_cache` False leaves the
        loaded visual cache out, True requires it (None: use it when loaded)."""
        if not req.inputs():
            return None
        if self.encoder is None:
            if self.load_encoder is None:
                raise InputError("inputs given but no ImageBind encoder was loaded")
            self.encoder, self.cache = self.load_encoder()
        if use_cache and self.cache is None:
            raise InputError("cache: no visual cache is loaded here (start with the cache on: --cache)")
        cache = None if use_cache is False else self.cache
        embeddings, weights = weighted_embeddings(self.encoder, req, self.max_image_pixels, self.points)
        device = next(self.model.parameters()).device
        return self.model.visual_query(
            {m: e.to(device) for m, e in embeddings.items()},
            weights,
            cache=cache,
            cache_t=self.cache_t,
            cache_w=self.cache_w,
        )

    def sampling(self, req: Request) -> Sampling:
        """The request's sampling over the defaults (`infer.temperature`, `infer.top_p`, `infer.max_new_tokens`)."""
        base = self.defaults
        return Sampling(
            temperature=base.temperature if req.temperature is None else req.temperature,
            top_p=base.top_p if req.top_p is None else req.top_p,
            max_new_tokens=base.max_new_tokens if req.max_new_tokens is None else req.max_new_tokens,
            max_seq_len=self.max_seq_len,
        )

    def prompt_ids(self, req: Request, sampling: Sampling) -> list[int]:
        """The conversation so far and the question as tokens; the oldest turns are dropped to leave the answer
        room (up to half the sequence), and a question too long on its own is an InputError."""
        question = req.prompt or CAPTION_INSTRUCTION
        room = min(sampling.max_new_tokens, self.max_seq_len // 2) if req.history else 1
        try:
            ids, dropped = fit_conversation(self.tokenizer, req.history, question, self.max_seq_len - max(room, 1))
        except ConversationTooLong as e:
            raise InputError(f"prompt: {e} (max_seq_len {self.max_seq_len})") from None
        if dropped:
            log.warning(
                "the conversation is longer than max_seq_len %d: its %d oldest turn(s) are left out",
                self.max_seq_len,
                dropped,
            )
        return ids

    def submit(self, req: Request, use_cache: bool | None = None) -> tuple[int, int]:
        """Prepare a request (its inputs read, its prompt fitted) and queue it in the engine: (its id there, its
        prompt's length in tokens). InputError names what is wrong with it."""
        check_request(req)
        sampling = self.sampling(req)
        visual = self.visual(req, use_cache)
        ids = self.prompt_ids(req, sampling)
        try:
            job = self.engine.submit(
                ids, None if visual is None else visual[0, 0], sampling, req.seed, self.tokenizer.eos_id
            )
        except ValueError as e:  # the engine's prompt checks
            raise InputError(f"prompt: {e}") from None
        return job, len(ids)

    def answer_all(self, requests: Sequence[Request], stream: StreamCallback | None = None) -> list[Reply | InputError]:
        """Every request's answer (or the InputError that stopped it), decoded together by the engine."""
        out: list[Reply | InputError] = [InputError("not answered")] * len(requests)
        submitted: dict[int, int] = {}
        for i, req in enumerate(requests):
            try:
                submitted[self.submit(req)[0]] = i
            except InputError as e:
                out[i] = e
        so_far: dict[int, list[int]] = {}

        def on_token(job: int, token: int) -> None:
            so_far.setdefault(job, []).append(token)
            stream(submitted[job], self.tokenizer.decode(so_far[job]))

        ends: dict[int, str] = {}
        try:
            tokens = self.engine.drain(on_token if stream is not None else None, ends)
        except BaseException:  # interrupted (a chat's Ctrl-C): the engine is left with no request of these
            for job in submitted:
                self.engine.cancel(job)
            raise
        for job, i in submitted.items():
            out[i] = Reply(self.tokenizer.decode(tokens[job]).strip(), ends.get(job, "stop"))
        return out

    def answer(self, req: Request, stream: StreamCallback | None = None) -> Reply:
        """One request's answer; its error raised."""
        (result,) = self.answer_all([req], stream)
        if isinstance(result, InputError):
            raise result
        return result
