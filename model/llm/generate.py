"""Text generation with the visual query injected: batched ragged prompts, KV cache, greedy or top-p sampling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from model.llm.model import ImageBindLLM
from model.llm.tokenizer import TextTokenizer


@dataclass(frozen=True)
class Sampling:
    """How new tokens are drawn: at most `max_new_tokens` within `max_seq_len` in all; T=0 is greedy, `top_p` the
    nucleus mass. The system's defaults (the reference's T=0.1, top_p=0.75, 256 tokens) are the config's `infer.*`."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    max_seq_len: int = 512


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask of ragged prompts, padded on the left so that generation continues each."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, length - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate_ids(
    model: ImageBindLLM,
    prompts: Sequence[Sequence[int]],
    visual: torch.Tensor | None,
    sampling: Sampling,
    eos_id: int | None = None,
    generator_seed: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """New token ids per prompt (up to and excluding the first EOS), through transformers' `generate`.

    Args:
        prompts: token ids, each starting with BOS (ragged lengths are fine).
        visual: (B, 1, dim) bound visual queries (`model.visual_query`), or None for text only.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    cfg = model.config
    eos = cfg.eos_id if eos_id is None else eos_id
    longest = max(len(p) for p in prompts)
    budget = min(sampling.max_new_tokens, sampling.max_seq_len - longest)
    if budget <= 0:
        raise ValueError(f"a prompt of {longest} tokens leaves no room under max_seq_len {sampling.max_seq_len}")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, cfg.pad_id)
    gen = GenerationConfig(
        max_new_tokens=budget,
        do_sample=sampling.temperature > 0,
        temperature=sampling.temperature if sampling.temperature > 0 else None,
        top_p=sampling.top_p if sampling.temperature > 0 else None,
        top_k=None,
        eos_token_id=eos,
        pad_token_id=cfg.pad_id,
        bos_token_id=cfg.bos_id,
        use_cache=use_cache,
    )
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    with model.injecting(None if visual is None else visual.to(device)):
        out = model.llama.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        results.append(row[: row.index(eos)] if eos in row else row)
    return results


def generate_text(
    model: ImageBindLLM,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    visual: torch.Tensor | None,
    sampling: Sampling,
    seed: int | None = None,
) -> list[str]:
    """Answers to `prompts` (already formatted, e.g. with `prompts.format_prompt`), stripped as the reference."""
    encoded = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    new = generate_ids(model, encoded, visual, sampling, tokenizer.eos_id, seed)
    return [tokenizer.decode(ids).strip() for ids in new]
