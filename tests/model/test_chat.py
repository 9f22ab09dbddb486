"""The conversation template: one turn equals the single-turn sample, answers all scored, whole-turn truncation."""

from __future__ import annotations

import pytest

from model.llm.chat import ConversationTooLong, chat_prompt, encode_conversation, encode_conversations, turn_prompt
from model.llm.model import IGNORE
from model.llm.prompts import encode_example, format_prompt
from model.llm.tokenizer import BPETokenizer, train_bpe_tokenizer

TURNS = [
    ("What colour is the shape?", "The shape is red."),
    ("What shape is it?", "It is a circle."),
    ("Is the shape large or small?", "It is small."),
]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    corpus = [turn_prompt(q, i == 0) + a for i, (q, a) in enumerate(TURNS)] * 3
    return train_bpe_tokenizer(corpus, vocab_size=300)


def test_one_turn_is_the_single_turn_sample(tok: BPETokenizer) -> None:
    q, a = TURNS[0]
    assert encode_conversation(tok, [(q, a)], 512) == encode_example(tok, format_prompt(q), a, 512)
    assert encode_conversation(tok, [(q, a)], 7) == encode_example(tok, format_prompt(q), a, 7)
    assert chat_prompt(tok, [], q) == tok.encode(format_prompt(q), bos=True, eos=False)


def test_every_answer_and_its_eos_is_scored_and_nothing_else(tok: BPETokenizer) -> None:
    tokens, labels = encode_conversation(tok, TURNS, 512)
    assert len(tokens) == len(labels) and tokens[0] == tok.bos_id
    assert tokens.count(tok.bos_id) == 1 and tokens.count(tok.eos_id) == len(TURNS)
    scored = [t for t, lab in zip(tokens, labels, strict=True) if lab != IGNORE]
    assert scored == [t for t, lab in zip(tokens, labels, strict=True) if lab == t]
    assert tok.decode(scored).replace(" ", "") == "".join(a for _, a in TURNS).replace(" ", "")
    assert scored.count(tok.eos_id) == len(TURNS)


def test_truncation_keeps_whole_turns(tok: BPETokenizer) -> None:
    full, _ = encode_conversation(tok, TURNS, 512)
    two, _ = encode_conversation(tok, TURNS[:2], 512)
    assert encode_conversation(tok, TURNS, len(full) - 1)[0] == two
    assert encode_conversation(tok, TURNS, len(two))[0] == two


def test_the_chat_prompt_is_the_training_prefix(tok: BPETokenizer) -> None:
    tokens, labels = encode_conversation(tok, TURNS, 512)
    prompt = chat_prompt(tok, TURNS[:2], TURNS[2][0])
    assert tokens[: len(prompt)] == prompt
    assert labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE


def test_a_budget_drops_the_oldest_turns(tok: BPETokenizer) -> None:
    full = chat_prompt(tok, TURNS[:2], TURNS[2][0])
    assert chat_prompt(tok, TURNS[:2], TURNS[2][0], budget=len(full)) == full
    shorter = chat_prompt(tok, TURNS[:2], TURNS[2][0], budget=len(full) - 1)
    assert shorter == chat_prompt(tok, TURNS[1:2], TURNS[2][0])
    assert shorter[0] == tok.bos_id
    with pytest.raises(ConversationTooLong, match="question alone"):
        chat_prompt(tok, TURNS[:2], TURNS[2][0], budget=3)


@pytest.mark.parametrize("max_words", [512, 40, 7])
def test_the_batched_encoding_is_the_one_by_one_encoding(tok: BPETokenizer, max_words: int) -> None:
    conversations = [TURNS, TURNS[:1], TURNS[1:], [(TURNS[2][0], "")], TURNS[::-1]]
    assert encode_conversations(tok, conversations, max_words) == [
        encode_conversation(tok, turns, max_words) for turns in conversations
    ]
    two = len(encode_conversation(tok, TURNS[:2], 512)[0])  # a budget that drops the third turn
    assert encode_conversations(tok, [TURNS], two) == [encode_conversation(tok, TURNS[:2], 512)]
    with pytest.raises(ValueError, match="at least one turn"):
        encode_conversations(tok, [TURNS, []], max_words)
