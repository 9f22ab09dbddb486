"""Generation: KV-cached greedy equals an uncached loop, ragged batches, EOS, limits, sampling, text round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.llm.generate import Sampling, generate_ids, generate_text, left_pad
from model.llm.model import ImageBindLLM
from model.llm.prompts import CAPTION_INSTRUCTION, format_prompt
from model.llm.tokenizer import train_bpe_tokenizer
from tests.model.official_fixture import TINY
from tests.model.random_llm import random_model, visual_for

GREEDY = Sampling(temperature=0.0, max_new_tokens=12)
CAPTIONS = [
    f"a {colour} {thing} {place}"
    for colour in ("red", "small", "brown", "white")
    for thing in ("dog", "cat", "bird")
    for place in ("on the grass", "in a box", "near the water")
]


@torch.no_grad()
def _greedy_loop(model: ImageBindLLM, prompts: list[list[int]], visual: torch.Tensor | None, n: int) -> list[list[int]]:
    """No cache, no padding: the whole sequence through the full forward at every step, argmax of the last position."""
    ids = torch.tensor(prompts)
    for _ in range(n):
        logits = model(ids, visual=visual).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, len(prompts[0]) :].tolist()


def _absent(rows: list[list[int]], vocab: int) -> int:
    """A token id (not a special) that none of `rows` contains: an EOS that never stops generation."""
    return next(t for t in range(3, vocab) if all(t not in r for r in rows))


@pytest.fixture(scope="module")
def model() -> ImageBindLLM:
    return random_model()


PROMPTS = [[1, 5, 9, 33, 40], [1, 70, 12, 8, 3]]


def test_left_pad_puts_prompts_on_the_right() -> None:
    ids, mask = left_pad([[1, 4], [1, 5, 6, 7]], pad_id=0)
    assert ids.tolist() == [[0, 0, 1, 4], [1, 5, 6, 7]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_cached_greedy_equals_an_uncached_loop_and_the_visual_query_matters(model: ImageBindLLM) -> None:
    vq = visual_for(model, 2)
    expected = _greedy_loop(model, PROMPTS, vq, 12)
    eos = _absent(expected, TINY.vocab_size)
    assert generate_ids(model, PROMPTS, vq, GREEDY, eos_id=eos) == expected
    assert generate_ids(model, PROMPTS, vq, GREEDY, eos_id=eos, use_cache=False) == expected
    text_only = _greedy_loop(model, PROMPTS, None, 12)
    assert text_only != expected  # the injection changes the tokens, so the cached path above really injected it
    assert generate_ids(model, PROMPTS, None, GREEDY, eos_id=_absent(text_only, TINY.vocab_size)) == text_only
    other = _greedy_loop(model, PROMPTS, visual_for(model, 2, seed=7), 12)
    assert other != expected  # and which visual query is injected matters too


def test_a_ragged_batch_generates_what_each_prompt_generates_alone(model: ImageBindLLM) -> None:
    ragged = [[1, 5, 9], [1], [1, 70, 12, 8, 3, 44, 21, 60, 17], [1, 33, 2, 40]]
    vq = visual_for(model, len(ragged), seed=3)
    alone = [_greedy_loop(model, [p], vq[i : i + 1], 12)[0] for i, p in enumerate(ragged)]
    assert len({tuple(a) for a in alone}) == len(ragged)  # distinct continuations: rows cannot be mixed up
    eos = _absent(alone, TINY.vocab_size)
    assert generate_ids(model, ragged, vq, GREEDY, eos_id=eos) == alone
    singles = [generate_ids(model, [p], vq[i : i + 1], GREEDY, eos_id=eos)[0] for i, p in enumerate(ragged)]
    assert singles == alone


def test_generation_stops_before_the_first_eos(model: ImageBindLLM) -> None:
    vq = visual_for(model, 2)
    full = _greedy_loop(model, PROMPTS, vq, 12)
    row = full[0]
    k = next(i for i in range(1, len(row)) if row[i] not in row[:i])  # a token first produced at step k > 0
    eos = row[k]
    got = generate_ids(model, PROMPTS, vq, GREEDY, eos_id=eos)
    assert got[0] == row[:k]
    other = full[1]
    assert got[1] == (other[: other.index(eos)] if eos in other else other)  # the other row is not cut short
    single = generate_ids(model, [PROMPTS[0]], vq[:1], GREEDY, eos_id=eos)
    assert single == [row[:k]]


def test_max_new_tokens_and_max_seq_len_limit_the_output(model: ImageBindLLM) -> None:
    vq = visual_for(model, 2)
    full = _greedy_loop(model, PROMPTS, vq, 12)
    eos = _absent(full, TINY.vocab_size)
    few = generate_ids(model, PROMPTS, vq, dataclasses.replace(GREEDY, max_new_tokens=4), eos_id=eos)
    assert few == [r[:4] for r in full]
    room = generate_ids(model, PROMPTS, vq, dataclasses.replace(GREEDY, max_seq_len=8), eos_id=eos)  # 5 + 3 tokens
    assert room == [r[:3] for r in full]


def test_bad_prompts_are_refused(model: ImageBindLLM) -> None:
    vq = visual_for(model, 2)
    with pytest.raises(ValueError, match="leaves no room under max_seq_len 5"):
        generate_ids(model, PROMPTS, vq, dataclasses.replace(GREEDY, max_seq_len=5))
    with pytest.raises(ValueError, match="leaves no room"):
        generate_ids(model, [[1, 2], [1] * 9], vq, dataclasses.replace(GREEDY, max_seq_len=9))
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[1, 4], []], vq, GREEDY)
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [], vq, GREEDY)


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(model: ImageBindLLM) -> None:
    vq = visual_for(model, 2)
    eos = TINY.vocab_size + 1  # out of the vocabulary: never sampled
    hot = Sampling(temperature=1.5, top_p=0.95, max_new_tokens=12)
    first = generate_ids(model, PROMPTS, vq, hot, eos_id=eos, generator_seed=11)
    assert generate_ids(model, PROMPTS, vq, hot, eos_id=eos, generator_seed=11) == first
    draws = {tuple(map(tuple, generate_ids(model, PROMPTS, vq, hot, eos_id=eos, generator_seed=s))) for s in range(4)}
    assert len(draws) > 1  # the seed matters: it really samples
    greedy = _greedy_loop(model, PROMPTS, vq, 12)
    assert first != greedy
    narrow = Sampling(temperature=1.5, top_p=1e-6, max_new_tokens=12)
    assert generate_ids(model, PROMPTS, vq, narrow, eos_id=eos, generator_seed=5) == greedy


def test_no_default_top_k_truncates_the_distribution(model: ImageBindLLM) -> None:
    """transformers' default top_k is 50; a near-uniform draw (huge temperature) must reach more than 50 tokens."""
    prompts = [[1, 3 + i] for i in range(8)]
    flat = Sampling(temperature=1e4, top_p=1.0, max_new_tokens=40)
    out = generate_ids(model, prompts, visual_for(model, 8), flat, eos_id=TINY.vocab_size + 1, generator_seed=0)
    assert all(len(r) == 40 for r in out)
    assert len({t for r in out for t in r}) > 60


@torch.no_grad()
def test_generate_text_decodes_stripped_answers() -> None:
    tok = train_bpe_tokenizer(CAPTIONS, vocab_size=300)
    config = dataclasses.replace(TINY, vocab_size=tok.n_words)
    assert (tok.bos_id, tok.eos_id) == (config.bos_id, config.eos_id) == (1, 2)
    model = random_model(config, seed=2)
    prompts = [format_prompt(CAPTION_INSTRUCTION), format_prompt("Describe the animal", "a dog")]
    vq = visual_for(model, 2, seed=4)
    sampling = Sampling(temperature=0.0, max_new_tokens=10)
    texts = generate_text(model, tok, prompts, vq, sampling)
    assert isinstance(texts, list) and all(isinstance(t, str) for t in texts) and len(texts) == 2
    assert all(t == t.strip() for t in texts)
    encoded = [tok.encode(p, bos=True, eos=False) for p in prompts]
    ids = generate_ids(model, encoded, vq, sampling, eos_id=tok.eos_id)
    assert texts == [tok.decode(r).strip() for r in ids]
    assert any(r for r in ids) and any(texts)
    hot = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=10)
    assert generate_text(model, tok, prompts, vq, hot, seed=3) == generate_text(model, tok, prompts, vq, hot, seed=3)
