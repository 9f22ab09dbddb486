"""Alpaca templates, answer-only labels, right-padding collation and the loss they give: spec section 3.8."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model.llm.model import IGNORE, ImageBindLLM
from model.llm.prompts import CAPTION_INSTRUCTION, collate, encode_example, format_prompt
from model.llm.tokenizer import BPETokenizer, train_bpe_tokenizer
from tests.model.official_fixture import TINY

CAPTIONS = [
    f"a {colour} {thing} {place}"
    for colour in ("red", "small", "brown", "white")
    for thing in ("dog", "cat", "bird")
    for place in ("on the grass", "in a box", "near the water")
]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return train_bpe_tokenizer([*CAPTIONS, format_prompt(CAPTION_INSTRUCTION)], vocab_size=300)


# ----------------------------------------------------------------------------- templates


def test_the_input_template_is_the_reference_text() -> None:
    assert format_prompt("Name the animal.", "a dog on the grass") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName the animal.\n\n### Input:\na dog on the grass\n\n### Response:"
    )


@pytest.mark.parametrize("empty", [None, ""])
def test_no_input_or_an_empty_one_gives_the_no_input_template(empty: str | None) -> None:
    expected = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nGenerate caption of this image\n\n### Response:"
    )
    assert format_prompt(CAPTION_INSTRUCTION, empty) == expected
    assert format_prompt("Generate caption of this image") == expected


def test_braces_in_the_instruction_are_kept_verbatim() -> None:
    prompt = format_prompt("Say {input} and {}", "x {instruction} y")
    assert "### Instruction:\nSay {input} and {}\n\n### Input:\nx {instruction} y\n\n### Response:" in prompt


# ----------------------------------------------------------------------------- tokens and labels


def test_labels_ignore_the_prompt_and_follow_the_answer(tok: BPETokenizer) -> None:
    prompt, answer = format_prompt(CAPTION_INSTRUCTION), "a brown cat in a box"
    tokens, labels = encode_example(tok, prompt, answer, max_words=512)
    full = tok.encode(prompt + answer, bos=True, eos=True)
    n_prompt = len(tok.encode(prompt, bos=True, eos=False))
    assert tokens == full and tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert 1 < n_prompt < len(tokens) - 2
    assert labels == [IGNORE] * n_prompt + full[n_prompt:]
    assert tok.decode(labels[n_prompt:]) == answer


def test_truncation_drops_the_eos_and_a_short_budget_ignores_everything(tok: BPETokenizer) -> None:
    prompt, answer = format_prompt(CAPTION_INSTRUCTION), "a white bird near the water"
    full = tok.encode(prompt + answer, bos=True, eos=True)
    n_prompt = len(tok.encode(prompt, bos=True, eos=False))
    cut = n_prompt + 2
    tokens, labels = encode_example(tok, prompt, answer, max_words=cut)
    assert tokens == full[:cut] and tok.eos_id not in tokens
    assert labels == [IGNORE] * n_prompt + full[n_prompt:cut]
    tokens, labels = encode_example(tok, prompt, answer, max_words=n_prompt - 3)
    assert tokens == full[: n_prompt - 3] and labels == [IGNORE] * (n_prompt - 3)


# ----------------------------------------------------------------------------- collation


def test_collate_right_pads_with_zero_and_ignore() -> None:
    ids, labels = collate([([1, 5, 6, 7], [IGNORE, IGNORE, 6, 7]), ([1, 8], [IGNORE, 8])])
    assert ids.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert labels.tolist() == [[IGNORE, IGNORE, 6, 7], [IGNORE, 8, IGNORE, IGNORE]]
    assert ids.dtype == labels.dtype == torch.long
    ids, labels = collate([([1, 5, 6], [IGNORE, 5, 6]), ([1, 8], [IGNORE, 8])], pad_to=5)
    assert ids.tolist() == [[1, 5, 6, 0, 0], [1, 8, 0, 0, 0]]
    assert labels.tolist() == [[IGNORE, 5, 6, IGNORE, IGNORE], [IGNORE, 8, IGNORE, IGNORE, IGNORE]]
    ids, _ = collate([([1, 5], [IGNORE, 5])], pad_id=3, pad_to=4)
    assert ids.tolist() == [[1, 5, 3, 3]]


# ----------------------------------------------------------------------------- the loss of a collated batch


def _random_model(vocab_size: int, seed: int = 0) -> ImageBindLLM:
    model = ImageBindLLM(dataclasses.replace(TINY, vocab_size=vocab_size))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("k_proj.bias", "v_proj.bias")) and "lora" not in name:
                continue
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") or name.startswith("gates."):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2 and "embed_tokens" not in name and "prefix_query" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


@torch.no_grad()
def test_the_loss_counts_answer_tokens_only(tok: BPETokenizer) -> None:
    model = _random_model(tok.n_words)
    pairs = [
        (format_prompt(CAPTION_INSTRUCTION), "a red dog on the grass"),
        (format_prompt("Where is the cat?", "a cat in a box"), "in a box"),
        (format_prompt(CAPTION_INSTRUCTION), "a small bird near the water, small and white"),
    ]
    examples = [encode_example(tok, p, a, max_words=512) for p, a in pairs]
    feats = torch.randn(len(pairs), TINY.feature_dim, generator=torch.Generator().manual_seed(1))
    ids, labels = collate(examples)
    assert len({len(t) for t, _ in examples}) == len(pairs)  # ragged: padding is really there
    loss = model(ids, feats, labels=labels).loss

    logits = model(ids, feats).logits  # by hand: position j - 1 predicts answer token j of each example
    terms = []
    for b, ((p, _), (tokens, _)) in enumerate(zip(pairs, examples, strict=True)):
        n_prompt = len(tok.encode(p, bos=True, eos=False))
        terms += [-F.log_softmax(logits[b, j - 1], -1)[tokens[j]] for j in range(n_prompt, len(tokens))]
    assert len(terms) == sum(int((lab != IGNORE).sum()) for lab in labels)
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)

    longer = collate(examples, pad_to=ids.shape[1] + 7)
    assert torch.allclose(model(longer[0], feats, labels=longer[1]).loss, loss, atol=1e-6)
    pads = torch.arange(ids.shape[1]) >= torch.tensor([len(t) for t, _ in examples])[:, None]
    noise = torch.randint(3, tok.n_words, ids.shape, generator=torch.Generator().manual_seed(2))
    noisy_pads = torch.where(pads, noise, ids)  # new content in the padding only
    assert int(pads.sum()) > 0 and bool((ids[pads] == 0).all())
    assert torch.allclose(model(noisy_pads, feats, labels=labels).loss, loss, atol=1e-6)
    scored_prompt = torch.where(labels == IGNORE, ids, labels)  # if prompt and pad tokens were labelled
    assert not torch.allclose(model(ids, feats, labels=scored_prompt).loss, loss, atol=1e-3)
    other_visual = model(ids, torch.randn_like(feats), labels=labels).loss
    assert not torch.allclose(other_visual, loss, atol=1e-4)  # the features do reach the scored positions
