"""The Alpaca prompt templates of the reference, and turning (prompt, answer) into tokens and answer-only labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.llm.model import IGNORE
from model.llm.tokenizer import TextTokenizer

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
CAPTION_INSTRUCTION = "Generate caption of this image"  # stage 1's prompt


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The reference's `format_prompt`: the no-input template when `input` is None or empty."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def encode_example(tokenizer: TextTokenizer, prompt: str, answer: str, max_words: int) -> tuple[list[int], list[int]]:
    """Tokens of BOS + prompt + answer + EOS, truncated to `max_words`, and labels with the prompt set to IGNORE.

    As the reference: the answer follows the prompt with no separator, the prompt length is that of the prompt
    encoded alone, and truncation can drop the EOS. Padding is left to `collate` (to the batch's longest).
    """
    n_prompt = len(tokenizer.encode(prompt, bos=True, eos=False))
    tokens = tokenizer.encode(prompt + answer, bos=True, eos=True)[:max_words]
    labels = [IGNORE] * min(n_prompt, len(tokens)) + tokens[n_prompt:]
    return tokens, labels


def encode_examples(
    tokenizer: TextTokenizer, pairs: Sequence[tuple[str, str]], max_words: int
) -> list[tuple[list[int], list[int]]]:
    """`encode_example` of every (prompt, answer) in a few batched tokenizer calls: prompts used once (stage 2's
    instructions) are encoded together, and a prompt shared by several answers (stage 1's caption instruction) has
    its own tokens reused across them wherever that is exact (`TextTokenizer.encode_after`)."""
    by_prompt: dict[str, list[int]] = {}
    for i, (prompt, _) in enumerate(pairs):
        by_prompt.setdefault(prompt, []).append(i)
    prompts = list(by_prompt)
    n_prompt = dict(zip(prompts, map(len, tokenizer.encode_batch(prompts, bos=True, eos=False)), strict=True))
    once = [by_prompt[p][0] for p in prompts if len(by_prompt[p]) == 1]
    whole = tokenizer.encode_batch([pairs[i][0] + pairs[i][1] for i in once], bos=True, eos=True)
    encoded = dict(zip(once, whole, strict=True))
    for prompt, rows in by_prompt.items():
        if len(rows) > 1:
            after = tokenizer.encode_after(prompt, [pairs[i][1] for i in rows], bos=True, eos=True)
            encoded.update(zip(rows, after, strict=True))
    out = []
    for i, (prompt, _) in enumerate(pairs):
        tokens, n = encoded[i][:max_words], n_prompt[prompt]
        out.append((tokens, [IGNORE] * min(n, len(tokens)) + tokens[n:]))
    return out


def collate(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (tokens, labels) pairs to the longest (or `pad_to`): (B, L) input ids and labels (IGNORE on pads)."""
    length = pad_to or max(len(t) for t, _ in examples)
    ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    labels = np.full((len(examples), length), IGNORE, dtype=np.int64)
    for i, (t, lab) in enumerate(examples):
        ids[i, : min(len(t), length)] = t[:length]
        labels[i, : min(len(lab), length)] = lab[:length]
    return torch.from_numpy(ids), torch.from_numpy(labels)
