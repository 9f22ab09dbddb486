"""Whether the tokenizer of the base can hold an instruction file's language (Chinese data needs a Chinese base)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from model.llm.tokenizer import TextTokenizer
from pipelines.errors import InputError
from stores.instructions import InstructionSet
from stores.language import HAN

MIN_HAN_COVERAGE = 0.9  # a Chinese-capable vocabulary holds nearly every character; byte-level fallbacks hold few
SAMPLE_RECORDS = 200  # samples checked, spread over the file


def han_coverage(tokenizer: TextTokenizer, texts: Sequence[str]) -> float:
    """The share of the Han characters of `texts` that the tokenizer keeps whole inside one token.

    A character the vocabulary lacks comes out as an unknown token or as byte pieces (byte fallback, byte-level
    BPE), none of which decodes to the character on its own. 1.0 for text without Han characters.
    """
    rows = tokenizer.encode_batch(list(texts), bos=False, eos=False)
    pieces = {i: tokenizer.decode([i]) for i in {i for row in rows for i in row}}
    total = held = 0
    for text, row in zip(texts, rows, strict=True):
        needed = Counter(HAN.findall(text))
        found = Counter(c for i in row for c in HAN.findall(pieces[i]))
        total += sum(needed.values())
        held += sum(min(n, found[c]) for c, n in needed.items())
    return held / total if total else 1.0


def check_language(data: InstructionSet, tokenizer: TextTokenizer, tokenizer_name: str) -> None:
    """Raise InputError when `data` is Chinese and the tokenizer holds too few of its characters."""
    if data.language != "zh":
        return
    step = max(1, len(data.records) // SAMPLE_RECORDS)
    texts = [t for r in data.records[::step] for t in (r.instruction, r.input, r.answer, *sum(r.history, ())) if t]
    coverage = han_coverage(tokenizer, texts)
    if coverage < MIN_HAN_COVERAGE:
        raise InputError(
            f"{data.file}: Chinese text ({data.layout} layout, language zh), and the tokenizer {tokenizer_name} keeps "
            f"only {coverage:.0%} of its Chinese characters as whole tokens (at least {MIN_HAN_COVERAGE:.0%} needed): "
            "this data needs a Chinese-capable base (model.llama_path and model.tokenizer_path, e.g. a LLaMA with a "
            "Chinese vocabulary)"
        )
