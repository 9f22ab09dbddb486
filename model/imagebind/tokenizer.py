"""CLIP's byte-level BPE tokenizer as ImageBind uses it: cleanup, pre-tokenizer, merges, SOT/EOT, 77-token rows."""

from __future__ import annotations

import gzip
import html
import itertools
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Literal

import ftfy
import numpy as np
import regex

if TYPE_CHECKING:
    import torch

CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # merges used from bpe_simple_vocab_16e6.txt.gz: lines[1 : NUM_MERGES + 1]
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
VOCAB_HEADER = "#version: 0.2"  # first line of the vocabulary file; never read as a merge
PRE_TOKENIZER = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BPE_CACHE_SIZE = 100_000  # cached words per tokenizer; cleared when full
Truncation = Literal["upstream", "llama_adapter"]

_PATTERN = regex.compile(PRE_TOKENIZER, regex.IGNORECASE)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable characters (printable Latin-1 bytes map to themselves,
    the rest to code points from 256 up), so BPE works on strings without whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(extra)}


def clean_text(text: str) -> str:
    """CLIP's cleanup: ftfy, HTML unescape twice, strip, collapse whitespace to single spaces, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def pre_tokenize(text: str) -> list[str]:
    """Splits cleaned text into words: special tokens, contractions, letter runs, single digits, symbol runs."""
    return _PATTERN.findall(text)


def _word_symbols(word: str) -> tuple[str, ...]:
    """A pre-token as byte characters, the last one marked as the end of a word."""
    chars = "".join(bytes_to_unicode()[b] for b in word.encode("utf-8"))
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replaces every left-to-right non-overlapping occurrence of `pair` in `symbols` with its concatenation."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Learns BPE merges from a small corpus (for tests and tiny demo vocabularies, not for a real one).

    Each step merges the most frequent adjacent pair over the cleaned, pre-tokenised words (ties: the smallest pair).
    Stops early when no pair is left.
    """
    words = Counter(
        _word_symbols(w) for t in texts for w in pre_tokenize(clean_text(t)) if w not in (SOT_TOKEN, EOT_TOKEN)
    )
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge(s, best): n for s, n in words.items()})
    return merges


def write_vocab(path: str | os.PathLike, merges: Sequence[tuple[str, str]]) -> None:
    """Writes merges in the gzipped `bpe_simple_vocab_16e6.txt.gz` format: a version header, then one "a b" per line."""
    lines = [VOCAB_HEADER, *(f"{a} {b}" for a, b in merges)]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Reads the merges of a gzipped CLIP vocabulary file: lines[1 : 48895], blank lines skipped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"BPE vocabulary file not found: {os.fspath(path)}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"not a gzipped BPE vocabulary file: {os.fspath(path)}: {err}") from err
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1] if line.strip()]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise ValueError(f"{os.fspath(path)}: a merge line must hold two symbols, got {' '.join(bad)!r}")
    return merges  # type: ignore[return-value]


class Tokenizer:
    """CLIP BPE tokenizer producing ImageBind's (B, 77) token rows.

    Args:
        vocab_path: the gzipped merges file (`bpe_simple_vocab_16e6.txt.gz` or one written by `write_vocab`).
        context_length: tokens per row, zero padded.
        truncation: "upstream" = ([SOT] + bpe)[:L-1] + [EOT], EOT always kept (facebookresearch/ImageBind);
            "llama_adapter" = ([SOT] + bpe + [EOT])[:L], EOT lost on long texts (ImageBind-LLM's vendored copy).
    """

    def __init__(self, vocab_path: str, context_length: int = CONTEXT_LENGTH, truncation: Truncation = "upstream"):
        if truncation not in ("upstream", "llama_adapter"):
            raise ValueError(f"truncation must be 'upstream' or 'llama_adapter', got {truncation!r}")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        self.context_length = context_length
        self.truncation = truncation
        merges = read_merges(vocab_path)
        byte_chars = list(bytes_to_unicode().values())
        vocab = [
            *byte_chars,
            *(c + END_OF_WORD for c in byte_chars),
            *("".join(m) for m in merges),
            SOT_TOKEN,
            EOT_TOKEN,
        ]
        self._encoder = {token: i for i, token in enumerate(vocab)}  # a repeated token keeps its last id
        self._decoder = dict(enumerate(vocab))
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._ranks = {pair: i for i, pair in enumerate(merges)}
        self._cache: dict[str, tuple[str, ...]] = {}

    @property
    def sot(self) -> int:
        """Id of <|startoftext|> (49406 with the full vocabulary)."""
        return self._encoder[SOT_TOKEN]

    @property
    def eot(self) -> int:
        """Id of <|endoftext|> (49407 with the full vocabulary); the largest id, which the text head's argmax finds."""
        return self._encoder[EOT_TOKEN]

    @property
    def vocab_size(self) -> int:
        """Number of ids (49408 with the full vocabulary)."""
        return len(self._decoder)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Applies the merges to one pre-token, lowest rank first, until none applies."""
        if word in (SOT_TOKEN, EOT_TOKEN):
            return (word,)
        if (cached := self._cache.get(word)) is not None:
            return cached
        symbols = _word_symbols(word)
        while len(symbols) > 1:
            pairs = set(itertools.pairwise(symbols))
            best = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
            if best not in self._ranks:
                break
            symbols = _merge(symbols, best)
        if len(self._cache) >= BPE_CACHE_SIZE:
            self._cache.clear()
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """BPE ids of a text after cleanup, without SOT/EOT; a literal '<|endoftext|>' becomes the EOT id."""
        return [self._encoder[s] for word in pre_tokenize(clean_text(text)) for s in self._bpe(word)]

    def rows(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token rows for ImageBind's text tower, as numpy (what `__call__` returns, without torch).

        Args:
            texts: one text or a sequence of texts.

        Returns:
            (B, context_length) int64, zero padded; B is 1 for a single string.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = self.context_length
        out = np.zeros((len(texts), n), dtype=np.int64)  # (B, L)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text)]
            ids = [*ids[: n - 1], self.eot] if self.truncation == "upstream" else [*ids, self.eot][:n]
            out[row, : len(ids)] = ids
        return out

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """`rows` as a torch int64 tensor (B, context_length)."""
        import torch  # imported on use: extraction's CPU readers call `rows` and never load torch

        return torch.from_numpy(self.rows(texts))

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        """Text of token ids: a leading SOT is dropped, decoding stops at the first EOT (so a padded row decodes to its
        text), end-of-word marks become spaces, and the result is stripped. Invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]  # a tensor or an array
        if ids and ids[0] == self.sot:
            ids = ids[1:]
        if self.eot in ids:
            ids = ids[: ids.index(self.eot)]
        data = bytearray(self._byte_decoder[c] for i in ids for c in self._decoder[i])
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()
