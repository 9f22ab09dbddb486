"""LLM text tokenizers: a tiny in-process sentencepiece LLaMA-style model, the byte-level BPE, loading and errors."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from model.llm.tokenizer import (
    BPE_FILE,
    SENTENCEPIECE_FILE,
    BPETokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    TokenizerError,
    load_tokenizer,
    prefix_splitting,
    train_bpe_tokenizer,
)

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGenerate caption of this image\n\n### Response:"
)
TRICKY = [
    "",
    " ",
    "a",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "digits 0123456789 and 3.14159, -42!",
    "punctuation: !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "special-looking text <s> </s> <unk> stays text",
    "### ###\n###",
    PROMPT,
]


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = ["a dog", "the cat", "two birds", "a red car", "people", "an old man", "children"]
    verbs = ["runs", "sits", "plays", "waits", "walks", "sleeps", "looks"]
    places = ["on the beach", "in the park", "near the river", "at night", "under a tree", "in 2024", "by the sea"]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(places)}." for _ in range(n)]


CORPUS = [*_sentences(300), PROMPT, PROMPT]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a tiny LLaMA-layout sentencepiece BPE model, trained here."""
    directory = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(directory / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # LLaMA keeps whitespace and newlines as they are
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    assert (directory / SENTENCEPIECE_FILE).is_file()
    return directory


@pytest.fixture(scope="module")
def sp_ref(sp_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_dir / SENTENCEPIECE_FILE))


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe_tokenizer(CORPUS, vocab_size=320)


# --- sentencepiece ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["file", "directory"])
def test_sentencepiece_loads_from_file_and_directory(sp_dir: Path, form: str) -> None:
    path = sp_dir / SENTENCEPIECE_FILE if form == "file" else sp_dir
    tok = load_tokenizer(str(path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert isinstance(tok, TextTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (1, 2, 400)


def test_sentencepiece_matches_processor(sp_dir: Path, sp_ref: spm.SentencePieceProcessor) -> None:
    tok = load_tokenizer(str(sp_dir))
    for text in [*CORPUS[:20], *TRICKY]:
        ids = sp_ref.encode(text)
        assert tok.encode(text, bos=False, eos=False) == ids
        assert tok.encode(text, bos=True, eos=False) == [1, *ids]
        assert tok.encode(text, bos=False, eos=True) == [*ids, 2]
        assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
        assert tok.decode(ids) == sp_ref.decode(ids)
    assert tok.n_words == sp_ref.vocab_size()


def test_sentencepiece_encode_decode(sp_dir: Path) -> None:
    tok = load_tokenizer(str(sp_dir))
    text = "a dog runs on the beach."
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) > 2 and all(0 <= i < tok.n_words for i in ids)
    assert tok.decode(ids) == text  # sentencepiece drops control ids when decoding
    assert tok.decode(tok.encode(PROMPT, bos=False, eos=False)) == PROMPT


def test_sentencepiece_save_round_trip(sp_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(sp_dir))
    out = tok.save(str(tmp_path / "saved"))
    assert out == str(tmp_path / "saved" / SENTENCEPIECE_FILE)
    assert Path(out).read_bytes() == (sp_dir / SENTENCEPIECE_FILE).read_bytes()
    again = load_tokenizer(str(tmp_path / "saved"))
    assert isinstance(again, SentencePieceTokenizer)
    for text in [PROMPT, *CORPUS[:10]]:
        assert again.encode(text, bos=True, eos=True) == tok.encode(text, bos=True, eos=True)


# --- byte-level BPE -------------------------------------------------------------------------------------------


def test_bpe_layout(bpe: BPETokenizer) -> None:
    assert isinstance(bpe, TextTokenizer)
    assert (bpe.bos_id, bpe.eos_id) == (1, 2)
    assert 3 + 256 < bpe.n_words <= 320  # specials, bytes and some merges
    merged = bpe.encode("the park", bos=False, eos=False)
    assert len(merged) < len("the park")  # merges were learned


def test_bpe_is_deterministic(bpe: BPETokenizer) -> None:
    other = train_bpe_tokenizer(CORPUS, vocab_size=320)
    assert other.n_words == bpe.n_words
    for text in [*TRICKY, *CORPUS[:20]]:
        assert other.encode(text, bos=True, eos=True) == bpe.encode(text, bos=True, eos=True)


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trip(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text, bos=False, eos=False)
    assert bpe.decode(ids) == text
    assert bpe.bos_id not in ids and bpe.eos_id not in ids  # "<s>" in the text is text


def test_bpe_round_trip_random_ascii(bpe: BPETokenizer) -> None:
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(128)]
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert bpe.decode(bpe.encode(text, bos=False, eos=False)) == text


def test_bpe_bos_eos_placed_and_dropped_on_decode(bpe: BPETokenizer) -> None:
    body = bpe.encode(PROMPT, bos=False, eos=False)
    assert bpe.encode(PROMPT, bos=True, eos=False) == [1, *body]
    assert bpe.encode(PROMPT, bos=False, eos=True) == [*body, 2]
    ids = bpe.encode(PROMPT, bos=True, eos=True)
    assert ids == [1, *body, 2]
    assert bpe.decode(ids) == PROMPT
    assert bpe.decode([1, *body[:3], 2, *body[3:], 2]) == PROMPT
    assert bpe.decode([1, 0, 2]) == "<unk>"  # only bos/eos are dropped


def test_bpe_save_load_round_trip(bpe: BPETokenizer, tmp_path: Path) -> None:
    out = bpe.save(str(tmp_path))
    assert out == str(tmp_path / BPE_FILE)
    for loaded in (BPETokenizer.load(out), load_tokenizer(out), load_tokenizer(str(tmp_path))):
        assert isinstance(loaded, BPETokenizer)
        assert (loaded.bos_id, loaded.eos_id, loaded.n_words) == (bpe.bos_id, bpe.eos_id, bpe.n_words)
        for text in [*TRICKY, *CORPUS[:10]]:
            ids = loaded.encode(text, bos=True, eos=True)
            assert ids == bpe.encode(text, bos=True, eos=True)
            assert loaded.decode(ids) == text


def test_bpe_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)


# --- errors ---------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match=rf"{re.escape(str(missing))}.*does not exist"):
        load_tokenizer(str(missing))


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(
        TokenizerError, match=rf"{re.escape(str(tmp_path))}.*neither tokenizer.model nor tokenizer.json"
    ):
        load_tokenizer(str(tmp_path))


def test_directory_with_both(sp_dir: Path, bpe: BPETokenizer, tmp_path: Path) -> None:
    shutil.copy(sp_dir / SENTENCEPIECE_FILE, tmp_path / SENTENCEPIECE_FILE)
    bpe.save(str(tmp_path))
    with pytest.raises(TokenizerError, match=rf"{re.escape(str(tmp_path))}.*both tokenizer.model and tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_corrupt_sentencepiece_model(tmp_path: Path) -> None:
    bad = tmp_path / SENTENCEPIECE_FILE
    bad.write_bytes(random.Random(0).randbytes(2048))
    for path in (bad, tmp_path):
        with pytest.raises(TokenizerError, match=rf"{re.escape(str(bad))}.*not a valid sentencepiece model"):
            load_tokenizer(str(path))


def test_corrupt_bpe_json(tmp_path: Path) -> None:
    bad = tmp_path / BPE_FILE
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": [1, 2')
    for path in (bad, tmp_path):
        with pytest.raises(TokenizerError, match=rf"{re.escape(str(bad))}.*not a valid BPE tokenizer"):
            load_tokenizer(str(path))


def test_bpe_json_without_specials(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    path = tmp_path / BPE_FILE
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(path))
    with pytest.raises(TokenizerError, match=rf"{re.escape(str(path))}.*no <s> or </s>"):
        load_tokenizer(str(path))


def test_unknown_file_suffix(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("hello")
    with pytest.raises(TokenizerError, match=rf"{re.escape(str(path))}.*neither a .model"):
        load_tokenizer(str(path))


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_batched_encoding_equals_one_by_one(kind: str, sp_dir: Path) -> None:
    from model.llm.prompts import CAPTION_INSTRUCTION, encode_example, encode_examples, format_prompt

    texts = ["a red dog on the grass", "", "Where is the cat?\n\nin a box", "<s> is text here"]
    tok = load_tokenizer(sp_dir) if kind == "sentencepiece" else train_bpe_tokenizer(texts * 3, vocab_size=300)
    for bos, eos in [(True, True), (True, False), (False, False)]:
        assert tok.encode_batch(texts, bos, eos) == [tok.encode(t, bos, eos) for t in texts]
    pairs = [
        (format_prompt(CAPTION_INSTRUCTION), "a red dog"),
        (format_prompt("Where is the cat?"), "in a box"),
        (format_prompt(CAPTION_INSTRUCTION), "a small bird near the water"),
    ]
    for max_words in (512, 30, 5):
        assert encode_examples(tok, pairs, max_words) == [encode_example(tok, p, a, max_words) for p, a in pairs]


def _joins(seed: int, n: int) -> list[tuple[str, str]]:
    """(prefix, text) pairs whose join is likely to be tricky: contractions, punctuation, whitespace runs, digits."""
    rng = random.Random(seed)
    alphabet = [
        "'",
        "re",
        "s",
        "ll",
        "ve",
        "d",
        "m",
        "t",
        ":",
        ".",
        "!",
        " ",
        "  ",
        "\n",
        "\t",
        "a",
        "Response",
        "42",
        "3",
        "<s>",
        "<",
        "s>",
        "é",
        "日本",
        "#",
        "-",
        "x",
    ]
    prefixes = [PROMPT, PROMPT + " ", PROMPT + "'", "a", "don", "don'", "we'", "x ", "12", "<", "### Response:\n", ""]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))

    return [(rng.choice(prefixes) if i % 3 else text(), text()) for i in range(n)]


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe", "bpe-normalised"])
def test_encode_after_equals_encoding_the_join(kind: str, sp_dir: Path) -> None:
    """`encode_after(prefix, texts)` is `encode(prefix + text)` for every text, whether or not the prefix is reused."""
    from tokenizers import normalizers

    if kind == "sentencepiece":
        tok = load_tokenizer(sp_dir)
    else:
        tok = train_bpe_tokenizer(CORPUS + [s + t for s, t in _joins(1, 300)], vocab_size=400)
        if kind == "bpe-normalised":  # acts across the join: every text is encoded whole
            tok._tok.normalizer = normalizers.Lowercase()
            assert prefix_splitting(tok._tok) is None
            tok = BPETokenizer(tok._tok)
        else:
            assert prefix_splitting(tok._tok) is not None
    pairs = _joins(2, 3000)
    reused = 0
    for prefix in dict.fromkeys(p for p, _ in pairs):
        texts = [t for p, t in pairs if p == prefix]
        for bos, eos in [(True, True), (False, False)]:
            assert tok.encode_after(prefix, texts, bos, eos) == [tok.encode(prefix + t, bos, eos) for t in texts]
        if kind == "bpe" and prefix:
            reused += sum(tok._prefixes.splits(prefix, t[:4]) for t in texts)
    if kind == "bpe":
        assert reused > 500  # the fast path was taken, and often
