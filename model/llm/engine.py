"""The generation engine: requests of any length and visual input decoded together, joining and leaving as they go."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from model.llm.decoder import Decoder
from model.llm.generate import Sampling
from model.llm.model import ImageBindLLM
from model.llm.tokenizer import TextTokenizer

log = logging.getLogger(__name__)
TokenCallback = Callable[[int, int], None]  # (request id, token) as each token is decided


@dataclass
class Job:
    """One request inside the engine: its prompt, visual terms, sampling, and what it has produced so far."""

    id: int
    prompt: list[int]
    visual: torch.Tensor | None  # (Lq, dim) per-layer terms, or None for text only
    sampling: Sampling
    eos: int
    budget: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    done: bool = False


@dataclass(frozen=True)
class Event:
    """A token decided for a request (None when it stopped on EOS), and whether the request is finished."""

    id: int
    token: int | None
    done: bool


class Engine:
    """Generation over a serving copy of the model (`Decoder`): exact, batched, continuous.

    Requests wait in a queue and take a free slot of the static KV cache when one is free: their prompts run
    through one batched prefill, then every active slot advances one token per decode step, each at its own
    position and with its own visual terms; a request leaves its slot at EOS or at its token budget and the next
    one takes it. Greedy outputs equal `generate.generate_ids` on the same model (up to float rounding of the
    merged LoRA and fused projections). On CUDA the decode step is captured once as a CUDA graph and replayed.

    Args:
        model: the ImageBind-LLM to serve (its weights are copied; it can be released afterwards).
        slots: requests decoded together.
        device, dtype: where and in what the serving copy runs (default: the model's; bf16 is the GPU choice).
        cuda_graphs: capture the decode step (default: on CUDA only).
        compile: `torch.compile` the decode step first (default off).
    """

    def __init__(
        self,
        model: ImageBindLLM,
        slots: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool | None = None,
        compile: bool = False,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        cfg = model.config
        self.max_seq_len, self.eos_id, self.pad_id = cfg.max_seq_len, cfg.eos_id, cfg.pad_id
        self.decoder = Decoder(model, slots, cfg.max_seq_len, dtype, device)
        self.device = self.decoder.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.compiled = compile
        self._decode = self.decoder.decode
        if compile:  # with CUDA graphs the capture below replays the compiled kernels; no second graph layer
            mode = "max-autotune-no-cudagraphs" if self.cuda_graphs else None
            self._decode = torch.compile(self.decoder.decode, fullgraph=True, mode=mode)
        self._graph: torch.cuda.CUDAGraph | None = None
        if self.cuda_graphs:  # now, while no request holds a slot: the warm-up writes position 0 of every slot
            self._capture()
        self._queue: deque[Job] = deque()
        self._active: dict[int, Job] = {}  # slot -> job
        self._next_id = 0
        self._positions = [0] * slots
        self._last = [self.pad_id] * slots

    # ------------------------------------------------------------------ requests

    @property
    def slots(self) -> int:
        return self.decoder.slots

    def pending(self) -> bool:
        """Whether any request is waiting or decoding."""
        return bool(self._queue or self._active)

    def submit(
        self,
        prompt: Sequence[int],
        visual: torch.Tensor | None,
        sampling: Sampling,
        seed: int | None = None,
        eos_id: int | None = None,
    ) -> int:
        """Queue a request; returns its id.

        Args:
            prompt: token ids starting with BOS.
            visual: (dim,) or (1, dim) or (1, 1, dim) bound visual query (`model.visual_query`), or None.
            seed: seeds this request's own sampler, so its output does not depend on the others'.
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("every prompt needs at least one token (BOS)")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {sampling.max_new_tokens}")
        limit = min(self.max_seq_len, sampling.max_seq_len)
        budget = min(sampling.max_new_tokens, limit - len(prompt))
        if budget <= 0:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room under max_seq_len {limit}")
        terms = None if visual is None else self.decoder.visual_terms(visual.reshape(1, -1))[:, 0]
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        job = Job(self._next_id, prompt, terms, sampling, self.eos_id if eos_id is None else eos_id, budget, generator)
        self._next_id += 1
        self._queue.append(job)
        return job.id

    def cancel(self, request_id: int) -> bool:
        """Drop a request, waiting or decoding (its slot is freed for the next); whether it was there."""
        for job in self._queue:
            if job.id == request_id:
                self._queue.remove(job)
                return True
        for job in list(self._active.values()):
            if job.id == request_id:
                self._finish(job, None)
                return True
        return False

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._queue)

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return len(self._active)

    def generate(self, requests: Sequence[dict], on_token: TokenCallback | None = None) -> list[list[int]]:
        """Run `submit(**request)` for each and step until all are done: new token ids per request, in order."""
        ids = [self.submit(**r) for r in requests]
        out = self.drain(on_token)
        return [out[i] for i in ids]

    def drain(self, on_token: TokenCallback | None = None, ends: dict[int, str] | None = None) -> dict[int, list[int]]:
        """Step until no request is left: request id -> its new token ids (of those that finished meanwhile).
        `ends` gets each finished request's reason: `stop` (EOS) or `length` (its token budget)."""
        out: dict[int, list[int]] = {}
        while self.pending():
            for event in self.step():
                tokens = out.setdefault(event.id, [])
                if event.token is not None:
                    tokens.append(event.token)
                    if on_token is not None:
                        on_token(event.id, event.token)
                if event.done and ends is not None:
                    ends[event.id] = "stop" if event.token is None else "length"
        return out

    # ------------------------------------------------------------------ steps

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit waiting requests into free slots (their prompts prefilled), then advance every active one a token."""
        events = self._admit()
        if self._active:
            events += self._advance()
        return events

    def _admit(self) -> list[Event]:
        free = [s for s in range(self.slots) if s not in self._active]
        jobs = [self._queue.popleft() for _ in range(min(len(free), len(self._queue)))]
        if not jobs:
            return []
        longest = max(len(j.prompt) for j in jobs)
        tokens = torch.full((len(jobs), longest), self.pad_id, dtype=torch.long)
        for row, (job, slot) in enumerate(zip(jobs, free, strict=False)):
            job.slot = slot
            tokens[row, : len(job.prompt)] = torch.tensor(job.prompt)
            self.decoder.set_visual(slot, job.visual)
        lengths = torch.tensor([len(j.prompt) for j in jobs])
        slots = torch.tensor([j.slot for j in jobs])
        logits = self.decoder.prefill(tokens.to(self.device), lengths.to(self.device), slots.to(self.device))
        events = []
        for job, row in zip(jobs, self._choose(logits, jobs), strict=True):
            self._positions[job.slot] = len(job.prompt)
            self._active[job.slot] = job
            events.append(self._take(job, row))
        return events

    def _advance(self) -> list[Event]:
        tokens = torch.tensor(self._last, dtype=torch.long)
        positions = torch.tensor(self._positions, dtype=torch.long)
        logits = self._decode_step(tokens.to(self.device), positions.to(self.device))
        jobs = list(self._active.values())
        rows = self._choose(logits[[j.slot for j in jobs]], jobs)
        events = []
        for job, row in zip(jobs, rows, strict=True):
            self._positions[job.slot] += 1
            events.append(self._take(job, row))
        return events

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:  # eager reads only the filled positions; compiled code keeps one static shape
            span = None if self.compiled else max(self._positions[s] for s in self._active) + 1
            return self._decode(tokens, positions, span)
        self._static_tokens.copy_(tokens)
        self._static_positions.copy_(positions)
        self._graph.replay()
        return self._static_logits

    def _capture(self) -> None:
        """Record the full-length decode step once as a CUDA graph (warmed up on a side stream first)."""
        self._static_tokens = torch.full((self.slots,), self.pad_id, dtype=torch.long, device=self.device)
        self._static_positions = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode(self._static_tokens, self._static_positions)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_logits = self._decode(self._static_tokens, self._static_positions)
        self._graph = graph
        log.info("decode step captured as a CUDA graph (%d slots, %d positions)", self.slots, self.decoder.max_len)

    def _choose(self, logits: torch.Tensor, jobs: Sequence[Job]) -> list[int]:
        """The next token of each job's row: argmax when greedy, else temperature + top-p with its own generator."""
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for row, job in enumerate(jobs):
            s = job.sampling
            out.append(
                greedy[row] if s.temperature <= 0 else sample_top_p(logits[row], s.temperature, s.top_p, job.generator)
            )
        return out

    def _take(self, job: Job, token: int) -> Event:
        if token == job.eos:
            return self._finish(job, None)
        job.tokens.append(token)
        self._last[job.slot] = token
        if len(job.tokens) >= job.budget:
            return self._finish(job, token)
        return Event(job.id, token, False)

    def _finish(self, job: Job, token: int | None) -> Event:
        job.done = True
        del self._active[job.slot]
        self._positions[job.slot], self._last[job.slot] = 0, self.pad_id
        return Event(job.id, token, True)


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from (vocab,) logits: divided by the temperature, cut to the smallest set whose probability
    reaches `top_p` (transformers' rule: drop tokens whose ascending cumulative probability is <= 1 - top_p, keep
    at least one), then drawn."""
    scores = logits.float() / temperature
    if top_p < 1.0:
        ordered, index = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[-1] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, index, drop), float("-inf"))
    return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).item())


def engine_texts(
    engine: Engine,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    visual: torch.Tensor | None,
    sampling: Sampling,
    seed: int | None = None,
) -> list[str]:
    """`generate.generate_text` through the engine: answers to formatted prompts, (B, 1, dim) visual queries or
    None, stripped as the reference."""
    requests = [
        {
            "prompt": tokenizer.encode(p, bos=True, eos=False),
            "visual": None if visual is None else visual[i],
            "sampling": sampling,
            "seed": None if seed is None else seed + i,
            "eos_id": tokenizer.eos_id,
        }
        for i, p in enumerate(prompts)
    ]
    return [tokenizer.decode(ids).strip() for ids in engine.generate(requests)]
