"""Instruction files: each layout into single-turn samples, clear errors, image keys and the feature join."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, BinaryIO

import duckdb
import numpy as np
import pytest

from stores.features import write_features
from stores.instructions import (
    DESCRIBE_PROMPTS,
    KEY_SQL,
    Instruction,
    InstructionFileError,
    image_key,
    join_features,
    read_instructions,
    require_features,
)
from stores.workspace import Workspace

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a colour.", "output": "Blue"},
]
SHAREGPT = [
    {
        "id": "a",
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "How are you?"},
            {"from": "gpt", "value": "Fine."},
            {"from": "human", "value": "   "},
            {"from": "gpt", "value": "Empty question."},
        ],
    },
    {
        "id": "b",
        "conversations": [
            {"from": "user", "value": "2+2?"},
            {"from": "assistant", "value": "4"},
            {"from": "user", "value": "Thanks"},
        ],
    },
]
LLAVA = [
    {
        "id": "000000033471",
        "image": "coco/train2017/000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
            {"from": "gpt", "value": "The bus is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "An advertisement."},
        ],
    },
    {
        "id": "000000052846",
        "image": "000000052846.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhere is the cat positioned?"},
            {"from": "gpt", "value": "On a car."},
        ],
    },
]
CC_SBU = {"annotations": [{"image_id": str(i), "caption": f"A picture number {i}."} for i in (2, 3, 5, 8, 13, 21)]}


def write(tmp_path: Path, name: str, data: Any) -> str:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data)
    elif name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in data) + "\n")
    else:
        path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("name", ["alpaca_data.json", "alpaca_gpt4_data.json", "data.jsonl"])
def test_alpaca(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, ALPACA)
    got = read_instructions(path)
    assert got.layout == "alpaca" and got.file == path
    assert got.records == [
        Instruction(path, 0, 0, "Give three tips for staying healthy.", "", "1. Eat well.", None, "alpaca"),
        Instruction(path, 1, 0, "Translate to French.", "Good morning", "Bonjour", None, "alpaca"),
        Instruction(path, 2, 0, "Name a colour.", "", "Blue", None, "alpaca"),
    ]
    assert got.counts["records"] == 3 and got.counts["samples"] == 3
    assert [r.index for r in read_instructions(path, limit=2).records] == [0, 1]


def test_sharegpt_pairs_and_first_turn_only(tmp_path: Path) -> None:
    path = write(tmp_path, "sharegpt.json", SHAREGPT)
    got = read_instructions(path)
    assert got.layout == "sharegpt"
    assert [(r.index, r.turn, r.instruction, r.answer, r.image) for r in got.records] == [
        (0, 0, "Hi", "Hello!", None),
        (0, 1, "How are you?", "Fine.", None),
        (1, 0, "2+2?", "4", None),
    ]
    assert got.counts == {
        "records": 2,
        "samples": 3,
        "turns": 4,
        "skipped_empty": 1,
        "skipped_unanswered": 1,
        "skipped_later_turns": 0,
    }
    first = read_instructions(path, first_turn_only=True)
    assert [(r.index, r.turn, r.instruction) for r in first.records] == [(0, 0, "Hi"), (1, 0, "2+2?")]
    assert first.counts["skipped_later_turns"] == 2 and first.counts["skipped_empty"] == 0


def test_llava_image_token(tmp_path: Path) -> None:
    path = write(tmp_path, "llava_instruct_150k.json", LLAVA)
    got = read_instructions(path)
    assert got.layout == "llava"
    assert [(r.index, r.turn, r.instruction, r.image) for r in got.records] == [
        (0, 0, "What are the colors of the bus in the image?", "coco/train2017/000000033471.jpg"),
        (0, 1, "What feature can be seen on the back of the bus?", "coco/train2017/000000033471.jpg"),
        (1, 0, "Where is the cat positioned?", "000000052846.jpg"),
    ]
    kept = read_instructions(path, keep_image_token=True, first_turn_only=True)
    assert [r.instruction for r in kept.records] == [
        "What are the colors of the bus in the image?\n<image>",
        "<image>\nWhere is the cat positioned?",
    ]


def test_llava_with_text_only_conversations(tmp_path: Path) -> None:
    # LLaVA-1.5's mix665k has text-only conversations among the image ones: they are samples without an image.
    got = read_instructions(write(tmp_path, "mix.json", LLAVA[:1] + SHAREGPT[1:]))
    assert got.layout == "llava"
    assert [(r.index, r.image, r.layout) for r in got.records][-1] == (1, None, "llava")


def test_whole_conversations_carry_their_earlier_turns(tmp_path: Path) -> None:
    path = write(tmp_path, "sharegpt.json", SHAREGPT)
    got = read_instructions(path, whole=True)
    assert [(r.index, r.turn, r.instruction, r.answer, r.history) for r in got.records] == [
        (0, 1, "How are you?", "Fine.", (("Hi", "Hello!"),)),  # the empty third pair is skipped, as when split
        (1, 0, "2+2?", "4", ()),
    ]
    assert got.counts == {
        "records": 2,
        "samples": 2,
        "turns": 4,
        "skipped_empty": 1,
        "skipped_unanswered": 1,
        "skipped_later_turns": 0,
    }
    llava = read_instructions(write(tmp_path, "llava.json", LLAVA), whole=True).records
    assert llava[0].history == (("What are the colors of the bus in the image?", "The bus is white and red."),)
    assert (llava[0].instruction, llava[0].image) == (LLAVA[0]["conversations"][2]["value"], LLAVA[0]["image"])
    assert llava[1].instruction == "Where is the cat positioned?" and not llava[1].history  # <image> stripped
    alpaca = write(tmp_path, "alpaca.json", ALPACA)
    assert read_instructions(alpaca, whole=True) == read_instructions(alpaca)  # one-turn conversations
    with pytest.raises(ValueError, match="exclude each other"):
        read_instructions(path, whole=True, first_turn_only=True)


# gpt4tools_71k.json (AILab-CVC/GPT4Tools): Alpaca records whose instruction is the tool prompt (tools, format,
# "Previous conversation:" with an image given by name and caption, "New input:"), and whose output is the next
# Thought / Action / Action Input step or the final "AI:" reply. The annotated validation files add fields such as
# `filename` (the COCO image the caption describes), empty for text-only samples. Our own wording below.
def gpt4tools(new_input: str, image: str | None, output: str, **extra: Any) -> dict[str, Any]:
    given = f"Human: Provide an image named {image}. Description: a dog on grass. Understand the image using tools.\n"
    prompt = (
        "GPT4Tools can handle text and visual tasks with tools.\nTOOLS:\n------\n\nGPT4Tools has access to the "
        "following tools:\n\n> Edge Detection On Image: finds edges. Input: image_path\n\nPrevious conversation:"
        f"\n\n{given + 'AI: Received.' if image else ''}\n\nNew input: {new_input}\nThink step by step.\n"
    )
    return {"instruction": prompt, "input": "", "output": output, **extra}


TOOL = "Thought: Do I need to use a tool? Yes\nAction: Edge Detection On Image\nAction Input: images/abc.png\n"
GPT4TOOLS = [
    gpt4tools("Find the edges of this picture", "images/abc.png", TOOL),
    gpt4tools("Name a colour.", None, "Thought: Do I need to use a tool? No\nAI: Blue.\n"),
    gpt4tools("What is in it?", "cache/xyz.png", "Thought: Do I need to use a tool? No\nAI: A dog.\n"),
]


def test_gpt4tools_tool_prompts_are_text_only_single_turn_samples(tmp_path: Path) -> None:
    path = write(tmp_path, "gpt4tools_71k.json", GPT4TOOLS)
    got = read_instructions(path)
    assert got.layout == "gpt4tools" and got.language is None
    assert [(r.instruction, r.answer, r.image, r.layout) for r in got.records] == [
        (g["instruction"], g["output"], None, "gpt4tools") for g in GPT4TOOLS
    ]  # the image names inside the prompt are invented: nothing to join
    assert got.counts["samples"] == 3 and got.counts["tool_use"] == 1 and got.counts["described_images"] == 2
    assert read_instructions(path, whole=True).records == got.records
    assert read_instructions(write(tmp_path, "plain.json", ALPACA + GPT4TOOLS[:1])).layout == "gpt4tools"
    for other in ("Use GPT4Tools.", "GPT4Tools is a system; describe it."):  # no tool prompt: plain Alpaca
        assert read_instructions(write(tmp_path, "a.json", [{"instruction": other, "output": "ok"}])).layout == "alpaca"


def test_gpt4tools_annotated_records_join_their_filename(tmp_path: Path) -> None:
    records = [
        {**GPT4TOOLS[0], "filename": "000000438993.jpg", "id": 28, "Action": ["Edge Detection On Image"]},
        {**GPT4TOOLS[1], "filename": "", "id": 29, "Action": []},
    ]
    got = read_instructions(write(tmp_path, "gpt4tools_val_seen.json", records))
    assert [r.image for r in got.records] == ["000000438993.jpg", None]
    assert image_key(got.records[0].image) == "000000438993"
    with pytest.raises(InstructionFileError, match=r"record 1: field 'filename' is not a string \(got int\)"):
        read_instructions(write(tmp_path, "bad.json", [records[0], {**records[1], "filename": 7}]))


ALPACA_ZH = [
    {"instruction": "保持健康的三个提示。", "input": "", "output": "多吃蔬菜，每天运动，睡眠充足。"},
    {"instruction": "把这句话翻译成英文。", "input": "早上好", "output": "Good morning"},
    {"instruction": "说出一种颜色。", "input": "", "output": "蓝色"},
]


def test_chinese_alpaca_is_tagged_zh(tmp_path: Path) -> None:
    got = read_instructions(write(tmp_path, "alpaca_gpt4_data_zh.json", ALPACA_ZH))
    assert (got.layout, got.language, got.counts["samples"]) == ("alpaca", "zh", 3)
    assert read_instructions(write(tmp_path, "alpaca_gpt4_data.json", ALPACA)).language is None
    names = [{"instruction": "Who wrote the Analects?", "output": "Confucius (孔子), a teacher in ancient China."}]
    assert read_instructions(write(tmp_path, "en.json", names * 3)).language is None  # a few Han names: English
    zh_chat = [bad(("human", "你好"), ("gpt", "你好！有什么可以帮你？"))]
    assert read_instructions(write(tmp_path, "sharegpt_zh.json", zh_chat), whole=True).language == "zh"


def test_cc_sbu_align_prompts_are_deterministic(tmp_path: Path) -> None:
    path = write(tmp_path, "filter_cap.json", CC_SBU)
    got = read_instructions(path)
    assert got.layout == "cc_sbu_align"
    assert [(r.image, r.answer, r.input) for r in got.records] == [
        (a["image_id"], a["caption"], "") for a in CC_SBU["annotations"]
    ]
    # The choice depends on the image id only (crc32, not the salted hash()), so it is fixed across runs and files.
    assert [r.instruction for r in got.records] == [DESCRIBE_PROMPTS[i] for i in (1, 3, 2, 3, 3, 0)]  # crc32 % 4
    other = read_instructions(write(tmp_path, "again.json", {"annotations": CC_SBU["annotations"][::-1]}))
    assert {r.image: r.instruction for r in other.records} == {r.image: r.instruction for r in got.records}


def test_open_fn(tmp_path: Path) -> None:
    path = write(tmp_path, "a.json", ALPACA)
    opened = []

    def open_fn(p: str) -> BinaryIO:
        opened.append(p)
        return open(p, "rb")

    assert read_instructions(path, open_fn=open_fn).counts["samples"] == 3 and opened == [path]


def bad(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


GOOD = bad(("human", "q"), ("gpt", "a"))
ERRORS = [
    ("x.json", '[{"instruction": "a", "output": "b"},', r"x\.json: not JSON: .* line 1"),
    ("x.json", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n', r"name the file \.jsonl"),
    ("x.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n\n[1,\n', r"x\.jsonl: line 2: not JSON .*2 line\(s\)"),
    ("x.json", "  \n", r"x\.json: empty file"),
    ("x.json", "[]", r"x\.json: empty file"),
    (
        "x.json",
        [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
        r"x\.json: unknown layout: record 0 has keys \['completion', 'prompt'\].*alpaca.*sharegpt.*llava.*cc_sbu_align"
        r".*2 record\(s\) have no known layout",
    ),
    ("x.json", {"data": []}, r"x\.json: unknown layout: a top-level object with keys \['data'\]"),
    ("x.json", [1, 2], r"x\.json: unknown layout: record 0 is a int, not an object.*2 record\(s\) have no known"),
    (
        "x.json",
        [ALPACA[0], GOOD, ALPACA[1], {"foo": 1}],
        r"x\.json: record 1: mixed layouts \(looks like sharegpt; record 0 is alpaca\)"
        r".*2 record\(s\) have this problem",
    ),
    (
        "x.json",
        [ALPACA[0], {"instruction": "a"}, {"instruction": "b"}, {"instruction": "c", "output": "d"}],
        r"x\.json: record 1: missing field 'output': \{'instruction': 'a'\}; 2 record\(s\) have this problem",
    ),
    (
        "x.json",
        [ALPACA[0], ALPACA[1], {"instruction": "a", "input": 3, "output": "b"}],
        r"x\.json: record 2: field 'input' is not a string \(got int\).*; 1 record\(s\) have this problem",
    ),
    (
        "x.json",
        [ALPACA[0], {"instruction": "a", "output": " "}, {"instruction": "b", "output": ""}],
        r"x\.json: record 1: empty field 'output'.*2 record\(s\) have this problem",
    ),
    (
        "x.jsonl",
        [ALPACA[0], ALPACA[1], {"instruction": "a", "output": ""}],
        r"x\.jsonl: record 2 \(line 3\): empty field 'output'",
    ),
    (
        "x.json",
        [GOOD, GOOD, bad(("human", "q"), ("human", "q2"), ("gpt", "a")), bad(("gpt", "a"))],
        r"x\.json: record 2: roles do not alternate human/gpt \(turn 1 is 'human'\).*2 record\(s\) have this problem",
    ),
    (
        "x.json",
        [GOOD, bad(("system", "be nice"), ("human", "q"), ("gpt", "a"))],
        r"x\.json: record 1: unknown role 'system' in turn 0.*1 record\(s\) have this problem",
    ),
    (
        "x.json",
        [GOOD, {"conversations": [{"from": "human"}]}, {"conversations": []}],
        r"x\.json: record 1: a turn is not .*1 record\(s\) have this problem \(also: 1 with "
        r"\"'conversations' is not a non-empty list\"\)",
    ),
    (
        "x.json",
        [{"image": 5, **GOOD}, {"image": "", **GOOD}],
        r"x\.json: record 0: field 'image' is not a string.*1 record\(s\).*also: 1 with \"empty field 'image'\"",
    ),
    (
        "x.json",
        {"annotations": [{"image_id": "2", "caption": "c"}, {"image_id": 3, "caption": "c"}]},
        r"x\.json: record 1: field 'image_id' is not a string",
    ),
]


@pytest.mark.parametrize(("name", "data", "match"), ERRORS)
def test_errors(tmp_path: Path, name: str, data: Any, match: str) -> None:
    path = write(tmp_path, name, data)
    with pytest.raises(InstructionFileError, match=match) as err:
        read_instructions(path)
    assert str(err.value).startswith(path)


def test_error_truncates_long_values(tmp_path: Path) -> None:
    path = write(tmp_path, "x.json", [ALPACA[0], {"instruction": "q" * 10_000, "output": ""}])
    with pytest.raises(InstructionFileError, match=r"record 1: empty field 'output'") as err:
        read_instructions(path)
    assert len(str(err.value)) < len(path) + 400


REFERENCES = [
    ("coco/train2017/000000033471.jpg", "000000033471"),
    ("http://images.cocodataset.org/train2017/000000033471.jpg", "000000033471"),
    ("https://host/a/000000033471.jpg?size=large&x=1.png#frag", "000000033471"),
    ("000000033471.jpg", "000000033471"),
    ("2", "2"),
    ("image/2.jpg", "2"),
    ("C:\\data\\image\\7.png", "7"),
    ("a/b.c.tar", "b.c"),
    ("dir.d/noext", "noext"),
    ("a/.hidden", ".hidden"),
]


@pytest.mark.parametrize(("reference", "key"), REFERENCES)
def test_image_key(reference: str, key: str) -> None:
    assert image_key(reference) == key


def test_image_key_sql_agrees() -> None:
    refs = [r for r, _ in REFERENCES] + ["s3://b/p/q.jpg?v=2", "local/with?q.jpg", "x..y", "trailing."]
    got = duckdb.execute(f"SELECT {KEY_SQL} FROM unnest($u) AS t(url)", {"u": refs}).fetchall()
    assert [k for (k,) in got] == [image_key(r) for r in refs]


def test_image_key_empty() -> None:
    with pytest.raises(ValueError, match="no file name"):
        image_key("http://host/dir/")


def features(path: Path, urls: list[str], uids: list[str], emb: np.ndarray) -> str:
    n = len(urls)
    rows = {
        "uid": uids,
        "source": ["s"] * n,
        "caption": ["c"] * n,
        "url": urls,
        "image_emb": emb,
        "text_emb": -emb,
        "clip_score": [0.3] * n,
        "encoder_id": ["enc"] * n,
    }
    write_features(str(path), rows, emb.shape[1])
    return str(path)


def test_join_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5, 8)).astype(np.float16)
    one = features(
        tmp_path / "a.parquet",
        ["http://x/train2017/000000033471.jpg?s=1", "http://y/2.jpg", "http://z/9.png"],
        ["u1", "u2", "u3"],
        emb[:3],
    )
    # "2" appears twice more in the second file: the first row by (url, uid) wins, wherever it is.
    two = features(tmp_path / "b.parquet", ["http://a/2.jpg", "http://a/2.jpg"], ["z", "b"], emb[3:])
    keys = ["000000033471", "2", "missing", None, "9", "2"]
    found, got = join_features(keys, [one, two])
    assert found.tolist() == [True, True, False, False, True, True]
    assert got.dtype == np.float32 and got.shape == (6, 8)
    expected = np.zeros((6, 8), np.float32)
    expected[[0, 1, 4, 5]] = emb[[0, 4, 2, 4]].astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    found_t, text = join_features(keys[:1], [two, one], column="text_emb")
    assert found_t.tolist() == [True] and np.array_equal(text[0], -emb[0].astype(np.float32))
    found_none, none = join_features([], [one])
    assert found_none.shape == (0,) and none.shape == (0, 8)


def test_join_features_on_object_storage(tmp_path: Path, s3_workspace: Workspace) -> None:
    """Stage 2 on an S3 workspace joins its instructions to feature parts read through the workspace's filesystem."""
    emb = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float16)
    local = features(tmp_path / "a.parquet", ["http://x/1.jpg", "http://x/2.jpg"], ["u1", "u2"], emb)
    ws = s3_workspace
    part = ws.features("enc", "s", "part-00000.parquet")
    ws.fs.put_file(local, part)
    found, got = join_features(["2", "3"], [ws.as_url(part)], filesystem=ws.fs)
    assert found.tolist() == [True, False] and np.array_equal(got[0], emb[1].astype(np.float32))


def test_join_instructions_and_require_features(tmp_path: Path) -> None:
    emb = np.eye(4, dtype=np.float16)
    feats = features(
        tmp_path / "f.parquet", ["http://images.cocodataset.org/train2017/000000033471.jpg"], ["u"], emb[:1]
    )
    got = read_instructions(write(tmp_path, "llava.json", LLAVA))
    found, vectors = join_features([r.image and image_key(r.image) for r in got.records], [feats])
    assert found.tolist() == [True, True, False] and vectors[1, 0] == 1.0
    require_features(got.records[:2], found[:2])
    with pytest.raises(
        InstructionFileError,
        match=re.escape(got.file) + r": record 1 \(image '000000052846\.jpg'\) "
        r"has no feature; 1 sample\(s\) \(1 distinct image\(s\)\)",
    ):
        require_features(got.records, found)
    text_only = read_instructions(write(tmp_path, "alpaca.json", ALPACA)).records
    require_features(text_only, np.zeros(len(text_only), bool))
