"""The language of instruction text, told by its script: Chinese ("zh") where Han characters make most letters."""

from __future__ import annotations

import re
from collections.abc import Sequence

# CJK Unified Ideographs, extension A and the compatibility block: the Han characters of Chinese text.
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
ZH_SHARE = 0.3  # Chinese when at least this share of the letters is Han (English words, code and names mix in)
SAMPLE_TEXTS = 2000  # texts looked at, spread over the file


def han_share(texts: Sequence[str]) -> float:
    """The share of letters (str.isalpha) that are Han characters; 0.0 for text without letters."""
    letters = sum(c.isalpha() for t in texts for c in t)
    return sum(len(HAN.findall(t)) for t in texts) / letters if letters else 0.0


def detect_language(texts: Sequence[str]) -> str | None:
    """Chinese ("zh") when the texts are (at most SAMPLE_TEXTS of them, evenly spaced, are looked at), else None."""
    step = max(1, len(texts) // SAMPLE_TEXTS)
    return "zh" if han_share(texts[::step]) >= ZH_SHARE else None
