"""Text tokenizers of the language model: LLaMA's sentencepiece model and a small byte-level BPE, one interface."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.errors import ModelInputError

SENTENCEPIECE_FILE = "tokenizer.model"
BPE_FILE = "tokenizer.json"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)  # ids 0, 1, 2: LLaMA's layout
MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + 256  # the specials and every byte
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}  # GPT-2's


class TokenizerError(ModelInputError):
    """A tokenizer file or directory is missing, ambiguous, unreadable or not a tokenizer."""


@runtime_checkable
class TextTokenizer(Protocol):
    """What the language model needs from a tokenizer (the reference LLaMA `Tokenizer`'s interface)."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def n_words(self) -> int:
        """Vocabulary size."""
        ...

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        """`encode` of every text, in one call to the tokenizer's native batch encoder."""
        ...

    def encode_after(self, prefix: str, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        """`encode(prefix + t)` of every text, exactly; faster than `encode_batch` when the prefix is long."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str) -> str:
        """Write the tokenizer file into `directory` (created if needed); return the file's path."""
        ...


class SentencePieceTokenizer:
    """LLaMA's tokenizer (`tokenizer.model`), behaving exactly like the reference code's `Tokenizer`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            self._proto = Path(path).read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read sentencepiece model {self.path!r}: {e}") from e
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise TokenizerError(f"{self.path!r} is not a valid sentencepiece model (tokenizer.model): {e}") from e
        if self._sp.vocab_size() <= 0 or self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise TokenizerError(
                f"sentencepiece model {self.path!r} has vocab_size={self._sp.vocab_size()}, "
                f"bos_id={self._sp.bos_id()}, eos_id={self._sp.eos_id()}; expected a vocabulary with <s> and </s>"
            )

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def n_words(self) -> int:
        return int(self._sp.vocab_size())

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return _specials(list(self._sp.encode(text)), self.bos_id if bos else None, self.eos_id if eos else None)

    def encode_batch(self, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        b, e = self.bos_id if bos else None, self.eos_id if eos else None
        return [_specials(list(ids), b, e) for ids in self._sp.encode(list(texts))]

    def encode_after(self, prefix: str, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        return self.encode_batch([prefix + t for t in texts], bos, eos)  # sentencepiece's pieces span the join

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: str) -> str:
        out = Path(directory) / SENTENCEPIECE_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self._proto)
        return str(out)


class BPETokenizer:
    """A byte-level BPE (HuggingFace `tokenizers`) with LLaMA's specials: 0 `<unk>`, 1 `<s>`, 2 `</s>`.

    Every string round-trips: `decode(encode(s, False, False)) == s`. Special-token text inside the input
    ("<s>") is encoded as ordinary bytes, as sentencepiece does; `decode` drops only the bos/eos ids.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>") -> None:
        ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"BPE tokenizer {source!r} has no {' or '.join(missing)} token; expected {BOS}, {EOS}")
        tokenizer.encode_special_tokens = True  # not serialised: "<s>" in the text is text, never the bos id
        self._tok = tokenizer
        self._bos, self._eos = int(ids[BOS]), int(ids[EOS])
        self._prefixes = prefix_splitting(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Load a `tokenizer.json` written by `save`."""
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on unreadable or malformed JSON
            raise TokenizerError(f"{str(path)!r} is not a valid BPE tokenizer (tokenizer.json): {e}") from e
        return cls(tokenizer, source=str(path))

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def n_words(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        return _specials(ids, self._bos if bos else None, self._eos if eos else None)

    def encode_batch(self, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        b, e = self._bos if bos else None, self._eos if eos else None
        return [_specials(list(x.ids), b, e) for x in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_after(self, prefix: str, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        """`encode(prefix + t)`: the prefix's ids once, then `t` alone, wherever the join is a pre-token boundary.

        A byte-level BPE merges only within the pieces its regex cuts the text into, so when `prefix + t` is cut at
        `len(prefix)`, its ids are the prefix's followed by `t`'s. Whether it is cut there depends on the prefix and
        at most the first 3 characters of `t` (GPT-2's pattern: "'re" is the longest look across a join); each
        (prefix, first 4 characters) is checked once on the real pre-tokenizer. Other texts are encoded whole.
        """
        if self._prefixes is None or not prefix:
            return self.encode_batch([prefix + t for t in texts], bos, eos)
        head = self._prefixes.ids(prefix)
        split = [self._prefixes.splits(prefix, t[:4]) for t in texts]
        rest = self.encode_batch([t if ok else prefix + t for t, ok in zip(texts, split, strict=True)], False, eos)
        start = [self._bos] if bos else []
        return [start + (head + ids if ok else ids) for ids, ok in zip(rest, split, strict=True)]

    def decode(self, ids: Sequence[int]) -> str:
        kept = [int(i) for i in ids if int(i) not in (self._bos, self._eos)]
        return self._tok.decode(kept, skip_special_tokens=False)

    def save(self, directory: str) -> str:
        out = Path(directory) / BPE_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out))
        return str(out)


class _PrefixSplits:
    """Per tokenizer: the ids of recent prefixes, and whether (prefix, head of text) joins at a piece boundary."""

    def __init__(self, tokenizer: Tokenizer, limit: int = 65_536) -> None:
        self._tok, self._limit = tokenizer, limit
        self._ids: dict[str, list[int]] = {}
        self._splits: dict[tuple[str, str], bool] = {}

    def ids(self, prefix: str) -> list[int]:
        if prefix not in self._ids:
            if len(self._ids) >= 256:
                self._ids.clear()
            self._ids[prefix] = list(self._tok.encode(prefix, add_special_tokens=False).ids)
        return list(self._ids[prefix])

    def splits(self, prefix: str, head: str) -> bool:
        key = (prefix, head)
        found = self._splits.get(key)
        if found is None:
            if len(self._splits) >= self._limit:
                self._splits.clear()
            pieces = self._tok.pre_tokenizer.pre_tokenize_str(prefix + head)
            found = self._splits[key] = not head or any(start == len(prefix) for _, (start, _) in pieces)
        return found


def prefix_splitting(tokenizer: Tokenizer) -> _PrefixSplits | None:
    """A `_PrefixSplits` when the tokenizer is a plain byte-level BPE over GPT-2's pattern (as we train), else None.

    Anything that acts across pieces (a normalizer, added non-special tokens, BPE dropout, word suffixes) or
    another pre-tokenizer makes prefix + text not split exactly, and then every text is encoded whole.
    """
    config = json.loads(tokenizer.to_str())
    model = config.get("model") or {}
    plain = (
        config.get("normalizer") is None
        and config.get("pre_tokenizer") == BYTE_LEVEL
        and model.get("type") == "BPE"
        and not any(model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"))
        and all(t.get("special") for t in config.get("added_tokens") or [])
    )
    return _PrefixSplits(tokenizer) if plain else None


def _specials(ids: list[int], bos: int | None, eos: int | None) -> list[int]:
    if bos is not None:
        ids.insert(0, bos)
    if eos is not None:
        ids.append(eos)
    return ids


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE on `texts`, in-process and deterministically (same texts -> same ids).

    The vocabulary holds the 3 specials, all 256 bytes and at most `vocab_size - 259` merges.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_BPE_VOCAB}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return BPETokenizer(tokenizer)


def _resolve(path: Path) -> Path:
    """The tokenizer file `path` names: itself, or the only tokenizer.model / tokenizer.json in a directory."""
    if not path.exists():
        raise TokenizerError(
            f"tokenizer path {str(path)!r} does not exist; expected {SENTENCEPIECE_FILE} or {BPE_FILE}"
        )
    if not path.is_dir():
        return path
    found = [path / name for name in (SENTENCEPIECE_FILE, BPE_FILE) if (path / name).is_file()]
    if not found:
        raise TokenizerError(f"directory {str(path)!r} contains neither {SENTENCEPIECE_FILE} nor {BPE_FILE}")
    if len(found) > 1:
        raise TokenizerError(f"directory {str(path)!r} holds both {found[0].name} and {found[1].name}; keep only one")
    return found[0]


def load_tokenizer(path: str | os.PathLike[str]) -> TextTokenizer:
    """Load a `tokenizer.model` (sentencepiece) or `tokenizer.json` (BPE) file, or a directory holding one of them."""
    file = _resolve(Path(path))
    if file.suffix == ".model":
        return SentencePieceTokenizer(file)
    if file.suffix == ".json":
        return BPETokenizer.load(file)
    raise TokenizerError(f"tokenizer file {str(file)!r} is neither a .model (sentencepiece) nor a .json (BPE) file")
