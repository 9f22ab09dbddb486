"""Training data: (feature, prompt, answer) examples and whole conversations, in a seeded order per epoch, cut into
per-worker step batches."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from model.llm.chat import Turn, encode_conversations
from model.llm.prompts import CAPTION_INSTRUCTION, collate, encode_examples, format_prompt
from model.llm.tokenizer import TextTokenizer
from pipelines.errors import InputError
from stores.features import count_rows, read_pairs, read_uids
from stores.workspace import Workspace

CAPTION_PROMPT = format_prompt(CAPTION_INSTRUCTION)


@dataclass(frozen=True)
class Example:
    """One training sample: the ImageBind feature it is conditioned on, the prompt, the answer to learn.

    A whole conversation (stage 2's `conversation: whole`) carries all its (instruction, answer) turns in `turns`
    and is encoded by `chat.encode_conversation`, every answer scored; its `prompt` and `answer` are then its last
    turn's, for reading only. Single-turn samples leave `turns` empty.
    """

    feature: np.ndarray  # (D,) float32
    prompt: str
    answer: str
    key: str  # where it came from (uid, or file#record), for messages
    turns: tuple[Turn, ...] = ()


class ExampleSource(Protocol):
    """A finite set of examples with a deterministic order per (seed, epoch)."""

    size: int

    def iterate(self, epoch: int) -> Iterator[Example]: ...


def is_heldout(uid: str, fraction: float) -> bool:
    """Whether a feature row belongs to the evaluation split: a stable hash of its uid, the same on every run."""
    return fraction > 0 and int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) < fraction * 2**32


class FeatureCaptions:
    """Stage 1: (image feature, caption) pairs streamed from feature Parquet parts.

    Each epoch visits the parts in a seeded order and shuffles rows through a seeded buffer, so memory stays at
    `buffer` examples whatever the size of the set, and the order depends only on (seed, epoch). `split` picks
    the training rows ("train"), the held-out rows ("heldout", see `is_heldout`) or all of them.
    """

    def __init__(
        self,
        ws: Workspace,
        files: Sequence[str],
        seed: int,
        buffer: int = 10_000,
        holdout: float = 0.0,
        split: str = "all",
        size: int | None = None,
    ) -> None:
        if not files:
            raise InputError("stage 1 has no feature parts to read: run `ibllm extract` for train.stage1.data")
        self.ws, self.files, self.seed, self.buffer = ws, list(files), seed, max(1, buffer)
        self.holdout, self.split = holdout, split
        self.size = size if size is not None else count_split(ws, self.files, holdout, split)

    def _keep(self, uid: str) -> bool:
        return self.split == "all" or is_heldout(uid, self.holdout) == (self.split == "heldout")

    def iterate(self, epoch: int) -> Iterator[Example]:
        rng = np.random.default_rng([self.seed, epoch])
        pool: list[Example] = []
        for i in rng.permutation(len(self.files)):
            uids, captions, emb = read_pairs(self.ws, self.files[i])
            for uid, caption, feature in zip(uids, captions, emb, strict=True):
                if not self._keep(uid):
                    continue
                pool.append(Example(feature, CAPTION_PROMPT, str(caption), uid))
                if len(pool) >= self.buffer:
                    j = int(rng.integers(len(pool)))
                    pool[j], pool[-1] = pool[-1], pool[j]
                    yield pool.pop()
        for j in rng.permutation(len(pool)):
            yield pool[j]


def count_split(ws: Workspace, files: Sequence[str], holdout: float, split: str) -> int:
    """Rows of a split (footers only when nothing is held out)."""
    if split == "all" or holdout == 0:
        return sum(count_rows(ws, files)) if split != "heldout" else 0
    return sum(is_heldout(u, holdout) == (split == "heldout") for f in files for u in read_uids(ws, f))


class ExampleList:
    """Examples held in memory (stage 2 instruction data), permuted per epoch."""

    def __init__(self, examples: Sequence[Example], seed: int) -> None:
        if not examples:
            raise InputError("no training examples: the instruction files of train.stage2.data are empty")
        self.examples, self.seed, self.size = list(examples), seed, len(examples)

    def iterate(self, epoch: int) -> Iterator[Example]:
        for j in np.random.default_rng([self.seed, epoch]).permutation(self.size):
            yield self.examples[j]


@dataclass(frozen=True)
class Micro:
    """One micro-batch of one worker: right-padded ids and labels, and the features."""

    input_ids: torch.Tensor  # (b, L)
    labels: torch.Tensor  # (b, L), IGNORE on prompt and padding
    features: torch.Tensor  # (b, D)

    @property
    def tokens(self) -> int:
        """Answer tokens scored (the loss's denominator share)."""
        return int((self.labels[:, 1:] >= 0).sum())


@dataclass(frozen=True)
class Plan:
    """How a global batch splits: per step `global_batch` examples, `world` workers, `accum` micro-batches each."""

    global_batch: int
    world: int
    accum: int
    max_words: int

    def __post_init__(self) -> None:
        if self.global_batch % (self.world * self.accum):
            raise InputError(
                f"global_batch_size {self.global_batch} is not divisible by workers x accum_iter "
                f"({self.world} x {self.accum})"
            )

    @property
    def micro(self) -> int:
        return self.global_batch // (self.world * self.accum)

    def steps_per_epoch(self, size: int) -> int:
        steps = size // self.global_batch
        if steps == 0:
            raise InputError(f"{size} examples make no full batch of global_batch_size {self.global_batch}")
        return steps


def step_batches(
    source: ExampleSource, tokenizer: TextTokenizer, plan: Plan, rank: int, start_step: int, pad_id: int = 0
) -> Iterator[list[Micro]]:
    """From `start_step` on, forever: this worker's micro-batches of each step.

    Step t takes examples [t*G, (t+1)*G) of the epoch order (epochs follow each other; the last partial batch of an
    epoch is dropped); worker r gets the r-th share, cut into `accum` micro-batches. Which examples make a step does
    not depend on the number of workers, so 1 and N workers see the same global batches.
    """
    spe = plan.steps_per_epoch(source.size)
    share = plan.global_batch // plan.world
    step = start_step
    while True:
        epoch, offset = divmod(step, spe)
        examples = source.iterate(epoch)
        for _ in range(offset * plan.global_batch):
            next(examples)
        for _ in range(offset, spe):
            batch = [next(examples) for _ in range(plan.global_batch)]
            mine = batch[rank * share : (rank + 1) * share]
            yield [
                micro_batch(mine[i : i + plan.micro], tokenizer, plan.max_words, pad_id)
                for i in range(0, share, plan.micro)
            ]
            step += 1


def micro_batch(examples: Sequence[Example], tokenizer: TextTokenizer, max_words: int, pad_id: int) -> Micro:
    single = [i for i, e in enumerate(examples) if not e.turns]
    encoded = encode_examples(tokenizer, [(examples[i].prompt, examples[i].answer) for i in single], max_words)
    if len(single) < len(examples):  # whole conversations among them: each takes its place in the batch
        whole = [i for i, e in enumerate(examples) if e.turns]
        by_row = dict(zip(single, encoded, strict=True))
        by_row.update(
            zip(whole, encode_conversations(tokenizer, [examples[i].turns for i in whole], max_words), strict=True)
        )
        encoded = [by_row[i] for i in range(len(examples))]
    ids, labels = collate(encoded, pad_id)
    features = torch.from_numpy(np.stack([e.feature for e in examples]).astype(np.float32))
    return Micro(ids, labels, features)


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Produce `items` in a background thread, `depth` ahead (tokenising overlaps the model's step)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="train-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
