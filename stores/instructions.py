"""Stage-2 instruction files (Alpaca, GPT4LLM, GPT4Tools, ShareGPT, LLaVA, cc_sbu_align) as samples; their features."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any

import duckdb
import numpy as np
import pyarrow.parquet as pq

from stores.errors import StoreInputError
from stores.language import detect_language

LAYOUTS = {
    "alpaca": "[{instruction, input?, output}]",
    "gpt4tools": "[{instruction: 'GPT4Tools can handle ... New input: ...', input, output, filename?}]",
    "sharegpt": "[{conversations: [{from, value}]}]",
    "llava": "[{image, conversations: [{from, value}]}]",
    "cc_sbu_align": "{annotations: [{image_id, caption}]}",
}
# cc_sbu_align has captions only; each gets one of these, chosen by a stable hash of its image id.
DESCRIBE_PROMPTS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
IMAGE_FIELDS = {"llava": "image", "cc_sbu_align": "image_id"}
# GPT4Tools' prompts (gpt4tools_71k.json) are Alpaca records whose instruction is its Visual-ChatGPT-style tool prompt.
GPT4TOOLS_PROMPT = ("GPT4Tools ", "\nNew input:")  # how the prompt starts, and the line that holds the request
GPT4TOOLS_COUNTS = {"tool_use": "Do I need to use a tool? Yes", "described_images": "Provide an image named"}
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
IMAGE_TOKEN = re.compile(r"<image>\n|\n<image>|<image>")
COUNTS = ("records", "samples", "turns", "skipped_empty", "skipped_unanswered", "skipped_later_turns")
# The join key of a feature row's url; must agree with image_key() (tests check both on the same references).
KEY_SQL = (
    r"regexp_replace(regexp_extract(CASE WHEN contains(url, '://') THEN regexp_replace(url, '[?#].*$', '') "
    r"ELSE url END, '[^/\\]*$'), '^(.+)\.[^.]*$', '\1')"
)
JOIN_SQL = """
SELECT key, emb FROM (SELECT {key} AS key, url, uid, "{column}" AS emb FROM read_parquet($files))
SEMI JOIN (SELECT unnest($keys) AS key) USING (key)
WHERE emb IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY key ORDER BY url, uid) = 1
"""


class InstructionFileError(StoreInputError):
    """An instruction file that cannot be read; the message names the file, the first bad record and the count."""


@dataclass(frozen=True)
class Instruction:
    """One sample: a (human, gpt) pair of a conversation, or one Alpaca / GPT4Tools / cc_sbu_align record.

    Read whole (`read_instructions(whole=True)`), a conversation is one sample: its last turn here, the turns before
    it in `history`.
    """

    file: str
    index: int
    turn: int
    instruction: str
    input: str
    answer: str
    image: str | None
    layout: str
    history: tuple[tuple[str, str], ...] = ()  # a whole conversation's earlier (instruction, answer) turns


@dataclass
class InstructionSet:
    """The samples of one file, its layout, its language ("zh" for Chinese text, else None), what was read and made."""

    file: str
    layout: str
    records: list[Instruction]
    counts: dict[str, int] = field(default_factory=dict)
    language: str | None = None


class _Problem(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind, self.detail = kind, detail


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _snippet(record: Any, width: int = 200) -> str:
    if not isinstance(record, dict):
        return _short(record, width)
    text = "{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in record.items()) + "}"
    return text if len(text) <= width else text[: width - 3] + "..."


def _decode(path: str, open_fn: Callable[[str], IO[bytes]] | None) -> str:
    with (open_fn or (lambda p: open(p, "rb")))(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InstructionFileError(f"{path}: not UTF-8 text ({e})") from None


def _load(path: str, text: str) -> tuple[Any, list[int] | None]:
    """The top-level JSON value (or the list of JSONL records) and, for JSONL, each record's line number."""
    if not text.strip():
        raise InstructionFileError(f"{path}: empty file")
    if not path.endswith(".jsonl"):
        try:
            return json.loads(text), None
        except json.JSONDecodeError as e:
            hint = " (one record per line? name the file .jsonl)" if e.msg == "Extra data" else ""
            raise InstructionFileError(f"{path}: not JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}") from None
    records, lines, bad = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
                lines.append(number)
            except json.JSONDecodeError as e:
                bad.append((number, e, line))
    if bad:
        number, e, line = bad[0]
        raise InstructionFileError(
            f"{path}: line {number}: not JSON ({e.msg} at column {e.colno}): {_short(line, 80)}; "
            f"{len(bad)} line(s) are not valid JSON"
        )
    return records, lines


def _records(path: str, value: Any) -> list[Any]:
    if isinstance(value, dict):
        if isinstance(value.get("annotations"), list):
            return value["annotations"]
        raise InstructionFileError(
            f"{path}: unknown layout: a top-level object with keys {sorted(value)[:10]}; expected a list of records "
            f"or {LAYOUTS['cc_sbu_align']} ({_expected()})"
        )
    if not isinstance(value, list):
        raise InstructionFileError(f"{path}: unknown layout: top-level {type(value).__name__}; expected a list")
    return value


def _expected() -> str:
    return "expected one of " + "; ".join(f"{name} {shape}" for name, shape in LAYOUTS.items())


def _layout_of(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "llava" if "image" in record else "sharegpt"
    if "instruction" in record or "output" in record:
        text = record.get("instruction")
        start, request = GPT4TOOLS_PROMPT
        gpt4tools = isinstance(text, str) and text.lstrip().startswith(start) and request in text
        return "gpt4tools" if gpt4tools else "alpaca"
    if "image_id" in record or "caption" in record:
        return "cc_sbu_align"
    return None


def _family(layout: str | None) -> str | None:
    return {"sharegpt": "conversation", "llava": "conversation", "gpt4tools": "alpaca"}.get(layout, layout)


def _image(record: dict[str, Any], kind: str) -> str | None:
    """The image a record refers to: LLaVA's and cc_sbu_align's (required); GPT4Tools' `filename` where non-empty."""
    if kind == "gpt4tools":
        return _text(record, "filename", optional=True) or None
    image_field = IMAGE_FIELDS.get(kind)
    return _text(record, image_field, nonempty=True) if image_field else None


def _text(record: dict[str, Any], key: str, *, optional: bool = False, nonempty: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        raise _Problem(f"missing field {key!r}")
    if not isinstance(value, str):
        raise _Problem(f"field {key!r} is not a string", f" (got {type(value).__name__})")
    if nonempty and not value.strip():
        raise _Problem(f"empty field {key!r}")
    return value


def _pairs(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The (human, gpt) values of a conversation, checked: known roles, alternating from human; no answer, no pair."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Problem("'conversations' is not a non-empty list")
    values = []
    for t, turn in enumerate(turns):
        if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ("from", "value"))):
            raise _Problem("a turn is not {'from': str, 'value': str}", f" (turn {t}: {_short(turn)})")
        role = ROLES.get(turn["from"].lower())
        if role is None:
            raise _Problem("unknown role", f" {turn['from']!r} in turn {t} (expected human/user or gpt/assistant)")
        if role != ("human", "gpt")[t % 2]:
            raise _Problem("roles do not alternate human/gpt", f" (turn {t} is {turn['from']!r})")
        values.append(turn["value"])
    return list(zip(values[::2], values[1::2], strict=False))


def _samples(record: Any, layout: str, keep_image_token: bool, counts: dict[str, int]) -> list[tuple[str, str, str]]:
    """(instruction, input, answer) per turn of one record; empty turns are skipped (and counted)."""
    if layout in ("alpaca", "gpt4tools"):
        out = [
            (
                _text(record, "instruction", nonempty=True),
                _text(record, "input", optional=True),
                _text(record, "output", nonempty=True),
            )
        ]
    elif layout == "cc_sbu_align":
        image_id, caption = _text(record, "image_id", nonempty=True), _text(record, "caption", nonempty=True)
        out = [(DESCRIBE_PROMPTS[zlib.crc32(image_id.encode()) % len(DESCRIBE_PROMPTS)], "", caption)]
    else:
        pairs = _pairs(record)
        counts["skipped_unanswered"] += len(record["conversations"]) % 2
        strip = "image" in record and not keep_image_token
        out = [(IMAGE_TOKEN.sub("", q).strip() if strip else q, "", a) for q, a in pairs]
    counts["turns"] += len(out)
    return out


@dataclass
class _Problems:
    """Per kind of problem: the first record that has it and how many do."""

    path: str
    lines: list[int] | None
    first: dict[str, tuple[int, str, Any]] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, index: int, detail: str, record: Any) -> None:
        self.first.setdefault(kind, (index, detail, record))
        self.count[kind] = self.count.get(kind, 0) + 1

    def where(self, index: int) -> str:
        return f"record {index}" + (f" (line {self.lines[index]})" if self.lines else "")

    def check(self) -> None:
        if not self.first:
            return
        kind = min(self.first, key=lambda k: self.first[k][0])
        index, detail, record = self.first[kind]
        others = "; ".join(f"{n} with {k!r}" for k, n in self.count.items() if k != kind)
        raise InstructionFileError(
            f"{self.path}: {self.where(index)}: {kind}{detail}: {_snippet(record)}; "
            f"{self.count[kind]} record(s) have this problem" + (f" (also: {others})" if others else "")
        )


def read_instructions(
    path: str,
    *,
    first_turn_only: bool = False,
    whole: bool = False,
    keep_image_token: bool = False,
    limit: int | None = None,
    open_fn: Callable[[str], IO[bytes]] | None = None,
) -> InstructionSet:
    """Read one instruction file (.json or .jsonl) into samples; raise InstructionFileError on bad data.

    Each (human, gpt) pair of a conversation becomes a sample (`first_turn_only` keeps the first pair, as the
    reference does; `whole` makes each conversation one sample, its earlier pairs in `Instruction.history`); pairs
    with an empty side are skipped. A GPT4Tools record is a single-turn sample, text-only unless it names a
    `filename` (the annotated validation files do: the COCO image its caption describes); the image paths inside
    its prompt are invented names, never joined. The set's `language` is "zh" for Chinese text. `limit` reads only
    the first records. `open_fn` opens the path for binary reading (e.g. Workspace.open); plain open() by default.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if first_turn_only and whole:
        raise ValueError("first_turn_only and whole exclude each other")
    value, lines = _load(path, _decode(path, open_fn))
    records = _records(path, value)
    if not records:
        raise InstructionFileError(f"{path}: empty file (no records)")
    records = records[:limit]
    layouts = [_layout_of(r) for r in records]
    problems = _Problems(path, lines)
    if layouts[0] is None:
        first = records[0]
        has = f"has keys {sorted(first)}" if isinstance(first, dict) else f"is a {type(first).__name__}, not an object"
        raise InstructionFileError(
            f"{path}: unknown layout: {problems.where(0)} {has} ({_snippet(first)}); {_expected()}; "
            f"{layouts.count(None)} record(s) have no known layout"
        )
    family = _family(layouts[0])
    layout = next((k for k in ("llava", "gpt4tools") if k in layouts and _family(k) == family), layouts[0])
    counts = dict.fromkeys(COUNTS, 0)
    counts["records"] = len(records)
    out: list[Instruction] = []
    for index, (record, kind) in enumerate(zip(records, layouts, strict=True)):
        if _family(kind) != family:
            looks = f" (looks like {kind or 'no known layout'}; record 0 is {layouts[0]})"
            problems.add("mixed layouts", index, looks, record)
            continue
        try:
            image = _image(record, kind)
            samples = _samples(record, kind, keep_image_token, counts)
        except _Problem as e:
            problems.add(e.kind, index, e.detail, record)
            continue
        if first_turn_only:
            counts["skipped_later_turns"] += len(samples) - 1
            samples = samples[:1]
        kept = []
        for turn, (instruction, text_input, answer) in enumerate(samples):
            if not instruction.strip() or not answer.strip():
                counts["skipped_empty"] += 1
                continue
            kept.append(Instruction(path, index, turn, instruction, text_input, answer, image, layout))
        if whole and kept:
            kept = [replace(kept[-1], history=tuple((k.instruction, k.answer) for k in kept[:-1]))]
        out += kept
    problems.check()
    counts["samples"] = len(out)
    if layout == "gpt4tools":
        counts |= {name: sum(mark in r.instruction + r.answer for r in out) for name, mark in GPT4TOOLS_COUNTS.items()}
    texts = [t for r in out for t in (r.instruction, r.input, r.answer, *(x for turn in r.history for x in turn))]
    return InstructionSet(path, layout, out, counts, detect_language(texts))


def image_key(reference: str) -> str:
    """The join key of an image reference and a feature row's url: its base name without directory or extension."""
    ref = re.sub(r"[?#].*$", "", reference) if "://" in reference else reference
    key = re.sub(r"^(.+)\.[^.]*$", r"\1", re.search(r"[^/\\]*$", ref).group())
    if not key:
        raise ValueError(f"image reference {reference!r} has no file name")
    return key


def join_features(
    keys: Sequence[str | None], feature_files: Sequence[str], column: str = "image_emb", filesystem: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Look image keys up by image_key(url) in feature Parquet files: (found (N,) bool, (N, dim) float32). The files
    are local paths, or URLs of `filesystem` (an fsspec filesystem: the workspace's on object storage).

    Not found (and None) keys get zeros. A key with several rows takes the first by (url, uid).
    """
    if not feature_files:
        raise ValueError("no feature files to join")
    if filesystem is None:
        schema = pq.read_schema(feature_files[0])
    else:
        with filesystem.open(feature_files[0], "rb") as f:
            schema = pq.read_schema(f)
    kind = schema.field(column).type
    dim = getattr(kind, "list_size", None)
    if dim is None:
        raise ValueError(f"{feature_files[0]}: column {column!r} is {kind}, not a fixed-size embedding")
    wanted = sorted({k for k in keys if k is not None})
    sql = JOIN_SQL.format(key=KEY_SQL, column=column)
    with duckdb.connect() as con:
        if filesystem is not None:
            con.register_filesystem(filesystem)
        table = con.sql(sql, params={"files": list(feature_files), "keys": wanted}).to_arrow_table()
    rows = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    values = np.asarray(table.column("emb").combine_chunks().flatten(), dtype=np.float32).reshape(-1, dim)
    found = np.array([k in rows for k in keys], dtype=bool)
    emb = np.zeros((len(keys), dim), dtype=np.float32)
    emb[found] = values[[rows[k] for k in keys if k in rows]]
    return found, emb


def require_features(records: Sequence[Instruction], found: np.ndarray) -> None:
    """Raise InstructionFileError if a sample with an image has no feature (found is join_features' mask)."""
    missing = [r for r, ok in zip(records, found, strict=True) if r.image is not None and not ok]
    if missing:
        first = missing[0]
        images = len({r.image for r in missing})
        raise InstructionFileError(
            f"{first.file}: record {first.index} (image {first.image!r}) has no feature; {len(missing)} sample(s) "
            f"({images} distinct image(s)) have none"
        )
