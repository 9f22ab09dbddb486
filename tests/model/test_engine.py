"""The generation engine: greedy equals today's `generate_ids` token for token, batched, ragged, continuous."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.llm.engine import Engine, sample_top_p
from model.llm.generate import Sampling, generate_ids
from model.llm.model import ImageBindLLM
from tests.model.official_fixture import TINY
from tests.model.random_llm import random_model, visual_for

GREEDY = Sampling(temperature=0.0, max_new_tokens=12)
RAGGED = [[1, 5, 9], [1], [1, 70, 12, 8, 3, 44, 21, 60, 17], [1, 33, 2, 40], [1, 8, 8, 8, 8, 9]]


@pytest.fixture(scope="module")
def model() -> ImageBindLLM:
    return random_model()


def _reference(
    model: ImageBindLLM, prompts: list[list[int]], vq: torch.Tensor | None, sampling: Sampling, eos: int
) -> list[list[int]]:
    """Today's path, one prompt at a time (so no batch-wide token budget couples the rows)."""
    return [
        generate_ids(model, [p], None if vq is None else vq[i : i + 1], sampling, eos_id=eos)[0]
        for i, p in enumerate(prompts)
    ]


def _requests(prompts: list[list[int]], vq: torch.Tensor | None, sampling: Sampling, eos: int) -> list[dict]:
    return [
        {"prompt": p, "visual": None if vq is None else vq[i], "sampling": sampling, "eos_id": eos}
        for i, p in enumerate(prompts)
    ]


def _eos_inside(rows: list[list[int]]) -> int:
    """A token that ends at least one row early (so stopping on EOS is exercised), not the first of any row."""
    return next(t for r in rows for t in r[2:] if all(t != other[0] for other in rows if other))


@pytest.mark.parametrize("slots", [1, 2, 8])
def test_greedy_equals_generate_ids_batched_ragged_and_with_visual_inputs(model: ImageBindLLM, slots: int) -> None:
    vq = visual_for(model, len(RAGGED), seed=3)
    free = _reference(model, RAGGED, vq, GREEDY, eos=TINY.vocab_size + 1)
    assert len({tuple(r) for r in free}) == len(RAGGED)  # distinct continuations: rows cannot be mixed up
    eos = _eos_inside(free)
    expected = _reference(model, RAGGED, vq, GREEDY, eos)
    assert any(len(r) < GREEDY.max_new_tokens for r in expected)
    engine = Engine(model, slots=slots)
    assert engine.generate(_requests(RAGGED, vq, GREEDY, eos)) == expected
    assert engine.generate(_requests(RAGGED, vq, GREEDY, eos)) == expected  # slots are reused cleanly


def test_text_only_and_mixed_requests_in_one_batch(model: ImageBindLLM) -> None:
    vq = visual_for(model, len(RAGGED), seed=5)
    eos = TINY.vocab_size + 1
    visual = _reference(model, RAGGED, vq, GREEDY, eos)
    text = _reference(model, RAGGED, None, GREEDY, eos)
    assert visual != text
    mixed = [r | ({"visual": None} if i % 2 else {}) for i, r in enumerate(_requests(RAGGED, vq, GREEDY, eos))]
    assert Engine(model, slots=3).generate(mixed) == [text[i] if i % 2 else visual[i] for i in range(len(RAGGED))]


def test_a_model_without_lora() -> None:
    plain = random_model(seed=4, lora=False)
    vq = visual_for(plain, 3, seed=2)
    eos = TINY.vocab_size + 1
    expected = _reference(plain, RAGGED[:3], vq, GREEDY, eos)
    assert Engine(plain, slots=2).generate(_requests(RAGGED[:3], vq, GREEDY, eos)) == expected


def test_budgets_and_limits_follow_generate_ids(model: ImageBindLLM) -> None:
    vq = visual_for(model, 2)
    eos = TINY.vocab_size + 1
    prompts = RAGGED[2:4]
    for sampling in (dataclasses.replace(GREEDY, max_new_tokens=4), dataclasses.replace(GREEDY, max_seq_len=12)):
        assert Engine(model, slots=2).generate(_requests(prompts, vq, sampling, eos)) == _reference(
            model, prompts, vq, sampling, eos
        )
    engine = Engine(model, slots=2)
    with pytest.raises(ValueError, match="leaves no room under max_seq_len 9"):
        engine.submit(RAGGED[2], None, dataclasses.replace(GREEDY, max_seq_len=9))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([], None, GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        engine.submit([1, 4], None, dataclasses.replace(GREEDY, max_new_tokens=0))
    with pytest.raises(ValueError, match="slots"):
        Engine(model, slots=0)


def test_requests_join_while_others_decode_and_stream_in_order(model: ImageBindLLM) -> None:
    vq = visual_for(model, len(RAGGED), seed=3)
    eos = TINY.vocab_size + 1
    expected = _reference(model, RAGGED, vq, GREEDY, eos)
    engine = Engine(model, slots=2)
    streamed: dict[int, list[int]] = {}
    ids = [engine.submit(**r) for r in _requests(RAGGED[:2], vq[:2], GREEDY, eos)]
    for _ in range(3):
        for e in engine.step():
            streamed.setdefault(e.id, []).append(e.token)
    ids += [engine.submit(**r) for r in _requests(RAGGED[2:], vq[2:], GREEDY, eos)]
    finished = []
    while engine.pending():
        for e in engine.step():
            if e.token is not None:
                streamed.setdefault(e.id, []).append(e.token)
            if e.done:
                finished.append(e.id)
    assert sorted(finished) == ids
    assert [streamed[i] for i in ids] == expected


def test_sampling_is_seeded_per_request_and_a_tiny_top_p_is_greedy(model: ImageBindLLM) -> None:
    vq = visual_for(model, 2)
    eos = TINY.vocab_size + 1
    hot = Sampling(temperature=1.5, top_p=0.95, max_new_tokens=12)
    one = [{"prompt": RAGGED[0], "visual": vq[0], "sampling": hot, "eos_id": eos, "seed": 11}]
    alone = Engine(model, slots=2).generate(one)
    crowd = [*one, {"prompt": RAGGED[3], "visual": vq[1], "sampling": hot, "eos_id": eos, "seed": 3}]
    assert Engine(model, slots=2).generate(crowd)[0] == alone[0]  # another request does not change its draw
    draws = {tuple(Engine(model, slots=1).generate([one[0] | {"seed": s}])[0]) for s in range(4)}
    assert len(draws) > 1
    narrow = Sampling(temperature=1.5, top_p=1e-6, max_new_tokens=12)
    assert Engine(model, slots=2).generate(_requests(RAGGED[:2], vq, narrow, eos)) == _reference(
        model, RAGGED[:2], vq, GREEDY, eos
    )


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    drawn = {sample_top_p(logits, 1.0, 0.7, g) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    assert {sample_top_p(logits, 1.0, 1.0, g) for _ in range(400)} == {0, 1, 2, 3}


def test_a_cancelled_request_frees_its_slot(model: ImageBindLLM) -> None:
    vq = visual_for(model, 3, seed=3)
    eos = TINY.vocab_size + 1
    expected = _reference(model, RAGGED[:3], vq, GREEDY, eos)
    engine = Engine(model, slots=1)
    ids = [engine.submit(**r) for r in _requests(RAGGED[:3], vq, GREEDY, eos)]
    engine.step()
    assert (engine.active, engine.waiting) == (1, 2)
    assert engine.cancel(ids[0]) and engine.cancel(ids[1]) and not engine.cancel(ids[1])
    assert (engine.active, engine.waiting) == (0, 1)
    out = []
    while engine.pending():
        out += [e.token for e in engine.step() if e.id == ids[2] and e.token is not None]
    assert out == expected[2]


def test_with_the_visual_cache_mixed_in(model: ImageBindLLM) -> None:
    """The cache changes the visual query (model.visual_query with a lookup); the engine then equals today's path."""
    g = torch.Generator().manual_seed(9)
    stored = torch.nn.functional.normalize(torch.randn(50, TINY.feature_dim, generator=g), dim=-1)

    def lookup(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sims, ids = (query @ stored.T).topk(10, dim=-1)
        return sims, stored[ids]

    feats = torch.randn(3, TINY.feature_dim, generator=g)
    with torch.no_grad():
        plain, cached = model.visual_query(feats), model.visual_query(feats, cache=lookup, cache_w=0.9)
    eos = TINY.vocab_size + 1
    with_cache = _reference(model, RAGGED[:3], cached, GREEDY, eos)
    assert with_cache != _reference(model, RAGGED[:3], plain, GREEDY, eos)  # the cache really changed the query
    assert Engine(model, slots=2).generate(_requests(RAGGED[:3], cached, GREEDY, eos)) == with_cache
