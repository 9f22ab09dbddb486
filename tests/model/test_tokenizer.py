"""CLIP BPE tokenizer: vocabulary layout, cleanup, BPE, special tokens, padding and both truncation rules."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from model.imagebind.tokenizer import (
    NUM_MERGES,
    Tokenizer,
    bytes_to_unicode,
    clean_text,
    learn_merges,
    pre_tokenize,
    write_vocab,
)

CORPUS = [
    "a photo of a dog on the beach",
    "a photo of a cat sitting on a sofa",
    "two dogs playing with a ball in the park",
    "the cat and the dog are friends",
    "a red car parked in front of the house",
    "a bird flying over the sea at sunset",
    "people walking in the city at night",
    "a close-up photo of a flower, 3 petals!",
    "an elephant drinking water from a river in the savannah",
    "children building a sandcastle while their parents watch",
    "a mountain landscape covered with snow under a blue sky",
    "vintage bicycle leaning against a brick wall downtown",
    "a chef preparing fresh vegetables in a restaurant kitchen",
    "colourful hot air balloons rising above the valley",
    "an old lighthouse standing on rocky cliffs during a storm",
    "a bowl of strawberries, blueberries and raspberries",
    "students reading books quietly in the university library",
    "a train crossing a bridge over a frozen lake",
] * 3


@pytest.fixture(scope="module")
def merges() -> list[tuple[str, str]]:
    return learn_merges(CORPUS, 300)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory, merges: list[tuple[str, str]]) -> str:
    path = tmp_path_factory.mktemp("bpe") / "tiny_vocab.txt.gz"
    write_vocab(path, merges)
    return str(path)


@pytest.fixture(scope="module")
def tok(vocab: str) -> Tokenizer:
    return Tokenizer(vocab)


def test_vocabulary_layout(tok: Tokenizer, merges: list[tuple[str, str]]) -> None:
    assert 100 < len(merges) <= 300
    assert tok.vocab_size == 256 + 256 + len(merges) + 2
    assert (tok.sot, tok.eot) == (tok.vocab_size - 2, tok.vocab_size - 1)
    assert len(set(bytes_to_unicode().values())) == 256 and bytes_to_unicode()[ord("a")] == "a"
    assert tok.encode("!") == [256 + 0]  # "!" is byte char 0; with the end-of-word mark it is 256 + 0


def test_full_size_vocabulary_ids(tmp_path: Path) -> None:
    chars = list(bytes_to_unicode().values())
    synthetic = [(a, b) for a in chars for b in chars][: NUM_MERGES + 100]  # more lines than are read
    write_vocab(tmp_path / "full.txt.gz", synthetic)
    full = Tokenizer(str(tmp_path / "full.txt.gz"))
    assert (full.vocab_size, full.sot, full.eot) == (49408, 49406, 49407)


def test_cleanup() -> None:
    assert clean_text("  A  Photo&amp;amp;of\n\tTHE   Dog ") == "a photo&of the dog"
    assert clean_text("cafÃ©") == "café"  # ftfy repairs mojibake
    assert pre_tokenize("it's a dog's 12 toys!!") == ["it", "'s", "a", "dog", "'s", "1", "2", "toys", "!!"]


def test_encode_applies_the_merges(tok: Tokenizer, merges: list[tuple[str, str]]) -> None:
    assert len(tok.encode("photo")) == 1  # a frequent corpus word is one token
    assert tok.encode("A   PHOTO &amp; the  dog") == tok.encode("a photo & the dog")
    # Applying every merge in rank order gives the same segmentation (true for merges learned this way).
    for word in ["photo", "sitting", "sunset", "zebra", "parked", "unbelievable"]:
        symbols = [*word[:-1], word[-1] + "</w>"]
        for a, b in merges:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == a and symbols[i + 1] == b:
                    symbols[i : i + 2] = [a + b]
                i += 1
        assert [tok.decode([t]) for t in tok.encode(word)] == [s.replace("</w>", "") for s in symbols]


def test_round_trip(tok: Tokenizer) -> None:
    for text in ["a photo of a dog on the beach", "zebra quiz jumps over 7 lazy foxes", "naïve café"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok(["a cat"])[0]) == "a cat"  # SOT dropped, stops at EOT, padding ignored


def test_rows_padding_and_argmax(tok: Tokenizer) -> None:
    rows = tok(["a dog", "the photo of a cat"])
    assert rows.shape == (2, 77) and rows.dtype == torch.long
    for row, text in zip(rows, ["a dog", "the photo of a cat"], strict=True):
        ids = tok.encode(text)
        assert row[: len(ids) + 2].tolist() == [tok.sot, *ids, tok.eot]
        assert not row[len(ids) + 2 :].any()
        assert int(row.argmax()) == len(ids) + 1  # the text head pools the EOT position
    assert tok("a dog").shape == (1, 77)
    arrays = tok.rows(["a dog", "the photo of a cat"])  # the torch-free path of extraction's readers
    assert arrays.dtype == np.int64 and np.array_equal(arrays, rows.numpy())
    assert tok.decode(arrays[1]) == "the photo of a cat"


def test_literal_endoftext_is_the_eot_token(tok: Tokenizer) -> None:
    ids = tok.encode("a dog <|endoftext|> and a cat")
    assert ids.count(tok.eot) == 1 and ids[2] == tok.eot
    row = tok("a dog <|endoftext|> and a cat")[0]
    assert int(row.argmax()) == 3  # the first maximum: the literal one, before the real EOT


@pytest.mark.parametrize("words", [75, 76, 100])
def test_truncation_rules(vocab: str, words: int) -> None:
    upstream, adapter = Tokenizer(vocab), Tokenizer(vocab, truncation="llama_adapter")
    text = " ".join(["dog"] * words)
    ids = upstream.encode(text)
    assert len(ids) == words
    up, ad = upstream(text)[0].tolist(), adapter(text)[0].tolist()
    assert up == [upstream.sot, *ids[:75], upstream.eot]  # EOT always at 76 once the text fills the row
    if words == 75:
        assert ad == up
    else:
        assert ad == [adapter.sot, *ids[:76]] and adapter.eot not in ad
        assert int(torch.tensor(ad).argmax()) == 0  # without EOT the head would pool SOT


def test_context_length_and_bad_arguments(vocab: str, tmp_path: Path) -> None:
    short = Tokenizer(vocab, context_length=8)
    assert short("a photo of a dog on the beach at night").shape == (1, 8)
    with pytest.raises(ValueError, match="truncation"):
        Tokenizer(vocab, truncation="sometimes")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="missing_vocab"):
        Tokenizer(str(tmp_path / "missing_vocab.txt.gz"))
    (tmp_path / "plain.txt.gz").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match=r"plain\.txt\.gz"):
        Tokenizer(str(tmp_path / "plain.txt.gz"))
    with gzip.open(tmp_path / "odd.txt.gz", "wt") as f:
        f.write("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="two symbols"):
        Tokenizer(str(tmp_path / "odd.txt.gz"))


def test_pickles_for_worker_processes(tok: Tokenizer) -> None:
    texts = ["a photo of a dog", "two cats"]
    assert torch.equal(pickle.loads(pickle.dumps(tok))(texts), tok(texts))
