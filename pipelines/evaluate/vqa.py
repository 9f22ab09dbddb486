"""A question-answering set of our own (JSONL): yes/no, multiple-choice and short open answers, and its accuracy."""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipelines.errors import InputError
from pipelines.evaluate.mme import parse_yes_no

MODALITIES = ("image", "audio", "video", "point")
FIELDS = (*MODALITIES, "question", "answer", "choices", "id")
LETTERS = string.ascii_uppercase
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
KINDS = ("yes/no", "choice", "open")


@dataclass(frozen=True)
class Item:
    """One question about one or more inputs; `answer` is the text of one of `choices` when there are choices."""

    qid: str
    inputs: dict[str, list[str]]  # modality -> absolute paths, in MODALITIES order
    question: str
    answer: str
    choices: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """The kind: "choice" (has choices), "yes/no" (answer yes or no) or "open" (anything else)."""
        if self.choices:
            return "choice"
        return "yes/no" if self.answer.strip().lower() in ("yes", "no") else "open"


def read_vqa(path: str) -> list[Item]:
    """The items of a JSONL file, one object a line: one or more of image/audio/video/point (a path or a list of
    paths, relative ones against the file's folder), question, answer, optional choices (a list of strings; the
    answer is one of them, or its letter) and optional id (default: the line number). Blank lines are skipped;
    an InputError names the file, the line and the problem."""
    if not os.path.isfile(path):
        raise InputError(f"question file not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    items: list[Item] = []
    lines_of: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = _parse_item(line, number, folder)
        except InputError as e:
            raise InputError(f"{path} line {number}: {e}") from None
        if item.qid in lines_of:
            raise InputError(f"{path} line {number}: id {item.qid!r} is also on line {lines_of[item.qid]}")
        lines_of[item.qid] = number
        items.append(item)
    if not items:
        raise InputError(f"{path}: no questions")
    return items


def _parse_item(line: str, number: int, folder: str) -> Item:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"expected a JSON object, got {type(doc).__name__}")
    for name in doc:
        if name not in FIELDS:
            raise InputError(f"{name}: unknown field; an item has {', '.join(FIELDS)}")
    inputs = {m: _paths(doc[m], m, folder) for m in MODALITIES if m in doc}
    if not any(inputs.values()):
        raise InputError(f"no input: give one or more of {', '.join(MODALITIES)}")
    question, answer = _text(doc, "question"), _text(doc, "answer")
    choices = _choices(doc.get("choices"))
    if choices:
        answer = _choice_answer(answer, choices)
    qid = doc.get("id", number)
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == "":
        raise InputError(f"id must be a non-empty string or an integer, got {qid!r}")
    return Item(str(qid), {m: p for m, p in inputs.items() if p}, question, answer, choices)


def _paths(value: object, modality: str, folder: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise InputError(f"{modality}: expected a path or a list of paths, got {str(value)[:80]}")
    paths = [os.path.normpath(os.path.join(folder, v)) for v in values]
    for given, full in zip(values, paths, strict=True):
        if not os.path.isfile(full):
            raise InputError(f"{modality} file not found: {given}" + (f" ({full})" if given != full else ""))
    return paths


def _text(doc: dict, name: str) -> str:
    value = doc.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and name == "answer":
        value = str(value)  # a count: {"answer": 3}
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{name}: missing or empty" if value in (None, "") else f"{name} must be a string: {value!r}")
    return value.strip()


def _choices(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError(f"choices: expected a list of non-empty strings, got {str(value)[:80]}")
    choices = tuple(v.strip() for v in value)
    if not 2 <= len(choices) <= len(LETTERS):
        raise InputError(f"choices: {len(choices)} given; between 2 and {len(LETTERS)} are lettered")
    lowered = [c.lower() for c in choices]
    if len(set(lowered)) < len(lowered):
        raise InputError(f"choices: two choices are the same text: {list(choices)}")
    return choices


def _choice_answer(answer: str, choices: tuple[str, ...]) -> str:
    lowered = [c.lower() for c in choices]
    if answer.lower() in lowered:
        return choices[lowered.index(answer.lower())]
    if len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        return choices[LETTERS.index(answer.upper())]
    raise InputError(f"answer {answer!r} is not among the choices {list(choices)} (nor one of their letters)")


def choice_prompt(item: Item) -> str:
    """The question, its choices lettered A., B., ... one a line, and CHOICE_INSTRUCTION."""
    if not item.choices:
        raise ValueError(f"{item.qid}: not a multiple-choice item")
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.question}\n{options}\n{CHOICE_INSTRUCTION}"


_MARKUP = re.compile(r"[*_`#>\"“”]")
_BARE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
_LEADING_LETTER = re.compile(r"\(?([A-Z])[.:)]\s")
_ANSWER_LETTER = re.compile(r"\b(?:answer|option|choice)\b(?:\s+is)?\s*:?\s*\(?([A-Za-z])\)?(?!\w)", re.I)
_LETTER_OR_LETTER = re.compile(r"(?<!\w)\(?[A-Z]\)?\s+or\s+\(?[A-Z]\)?(?!\w)")
_ENDS_PHRASE = re.compile(r"\s*(?:[.,:;!?)]|$)")


def _plain(text: str) -> str:
    return " ".join(_MARKUP.sub(" ", text).split())


def parse_choice(answer: str, choices: Sequence[str]) -> int | None:
    """The index of the choice an answer names, or None when it names none, one out of range, or several ("A or B").

    Tried in turn (markdown marks and double quotes removed, case ignored): the answer is a letter alone ("B",
    "(B)", "B.", "b"); it is a choice's text (a final period aside); it names two letters ("A or B": None); it
    starts with a capital letter and a mark ("B. red", "(B) red"); it says "answer/option/choice [is] [:] B" ("The
    answer is B", "Option (B) is right"; a small letter must end the phrase, so "the answer is a cat" names none);
    exactly one choice's text appears in it as whole words (a choice inside a longer one that appears, "red" in
    "dark red", aside).
    """
    text = _plain(answer)
    if not text:
        return None
    lowered = [_plain(c).lower().rstrip(".") for c in choices]

    def letter(found: str) -> int | None:
        index = LETTERS.index(found.upper())
        return index if index < len(choices) else None

    if m := _BARE_LETTER.fullmatch(text):
        return letter(m.group(1))
    if text.lower().rstrip(".") in lowered:
        return lowered.index(text.lower().rstrip("."))
    if _LETTER_OR_LETTER.search(text):
        return None  # "A or B"
    if m := _LEADING_LETTER.match(text):
        return letter(m.group(1))
    named = {
        m.group(1).upper()
        for m in _ANSWER_LETTER.finditer(text)
        if m.group(1).isupper() or _ENDS_PHRASE.match(text, m.end())
    }
    if named:
        return letter(named.pop()) if len(named) == 1 else None
    inside = [c for c in lowered if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", text.lower())]
    inside = [c for c in inside if not any(c != other and c in other for other in inside)]  # "red" in "dark red"
    return lowered.index(inside[0]) if len(inside) == 1 else None


_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBERS = {word: str(i) for i, word in enumerate(_NUMBER_WORDS)}


def normalize_answer(text: str) -> str:
    """An open answer compared after: lower-case, punctuation to spaces, articles dropped, number words zero to
    ten as digits, spaces collapsed ("Two dogs." and "2 dogs" match)."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def judge(item: Item, answer: str) -> tuple[bool, bool]:
    """(correct, parsed) of a model's answer to an item."""
    kind = item.kind
    if kind == "yes/no":
        said = parse_yes_no(answer)
        return said == item.answer.lower(), said is not None
    if kind == "choice":
        index = parse_choice(answer, item.choices)
        return index is not None and item.choices[index] == item.answer, index is not None
    said = normalize_answer(answer)
    return bool(said) and said == normalize_answer(item.answer), bool(said)


def score_vqa(records: Iterable[tuple[Item, str]]) -> dict:
    """Accuracy (percent) of (item, model answer) records overall and by kind (only the kinds present): yes/no read
    by parse_yes_no, choices by parse_choice, open answers matched exactly after normalize_answer. An answer that
    cannot be read (for open ones: empty) counts wrong and is counted as unparseable."""
    counts = {kind: {"questions": 0, "correct": 0, "unparseable": 0} for kind in KINDS}
    seen: set[str] = set()
    for item, answer in records:
        if item.qid in seen:
            raise ValueError(f"{item.qid}: scored twice")
        seen.add(item.qid)
        correct, parsed = judge(item, answer)
        row = counts[item.kind]
        row["questions"] += 1
        row["correct"] += correct
        row["unparseable"] += not parsed

    def summary(rows: list[dict[str, int]]) -> dict:
        total = {key: sum(r[key] for r in rows) for key in ("questions", "correct", "unparseable")}
        return {**total, "accuracy": 100.0 * total["correct"] / total["questions"] if total["questions"] else 0.0}

    result = summary(list(counts.values()))
    result["by_kind"] = {kind: summary([row]) for kind, row in counts.items() if row["questions"]}
    return result
