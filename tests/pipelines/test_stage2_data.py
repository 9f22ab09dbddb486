"""Stage 2's data: conversations as turns, first turns or whole samples; their batches; Chinese data's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.llm.chat import encode_conversation, turn_prompt
from model.llm.prompts import collate, encode_example, format_prompt
from model.llm.tokenizer import BPETokenizer, train_bpe_tokenizer
from pipelines.errors import InputError
from pipelines.train.data import Example, micro_batch
from pipelines.train.instructions import instruction_examples
from pipelines.train.language import han_coverage
from pipelines.train.setup import resolve_job
from stores.features import write_meta
from stores.workspace import Workspace
from tests.pipelines.train_fixture import train_config, write_feature_set

ENCODER = "enc"
PLACEHOLDER = [0.5] * 4


def chat(*turns: tuple[str, str], image: str | None = None) -> dict[str, Any]:
    said = [{"from": who, "value": v} for q, a in turns for who, v in (("human", q), ("gpt", a))]
    return {"id": "x", **({"image": image} if image else {}), "conversations": said}


SHAREGPT = [chat(("Hi", "Hello!"), ("How are you?", "Fine."), ("And now?", "Still fine.")), chat(("2+2?", "4"))]
ALPACA_ZH = [
    {"instruction": "保持健康的三个提示。", "input": "", "output": "多吃蔬菜，每天运动，睡眠充足。"},
    {"instruction": "说出一种颜色。", "input": "", "output": "蓝色是天空的颜色。"},
    {"instruction": "把这句话翻译成英文。", "input": "早上好", "output": "Good morning"},
]


def files(tmp_path: Path, **data: Any) -> tuple[Workspace, dict[str, str]]:
    """A workspace whose feature set has only a placeholder, and the given instruction files."""
    ws = Workspace(str(tmp_path / "ws"))
    write_meta(ws, ENCODER, {"encoder_id": ENCODER, "dim": 4, "placeholder": PLACEHOLDER})
    paths = {}
    for name, records in data.items():
        paths[name] = str(tmp_path / f"{name}.json")
        Path(paths[name]).write_text(json.dumps(records, ensure_ascii=False))
    return ws, paths


def test_each_conversation_option_makes_its_samples(tmp_path: Path) -> None:
    ws, path = files(tmp_path, sharegpt=SHAREGPT, alpaca=[{"instruction": "Add.", "input": "2+2", "output": "4"}])
    read = {
        mode: instruction_examples(ws, ENCODER, [path["sharegpt"], path["alpaca"]], [], mode)
        for mode in ("turns", "first", "whole")
    }
    assert [(e.prompt, e.answer, e.turns) for e in read["turns"][:3]] == [
        (format_prompt("Hi"), "Hello!", ()),
        (format_prompt("How are you?"), "Fine.", ()),
        (format_prompt("And now?"), "Still fine.", ()),
    ]
    assert [e.answer for e in read["first"]] == ["Hello!", "4", "4"]
    whole = read["whole"]
    assert len(whole) == 3 and whole[0].turns == (
        ("Hi", "Hello!"),
        ("How are you?", "Fine."),
        ("And now?", "Still fine."),
    )
    assert (whole[0].prompt, whole[0].answer, whole[0].key) == (
        turn_prompt("And now?", False),
        "Still fine.",
        f"{path['sharegpt']}#0",
    )
    fields = [[(e.prompt, e.answer, e.key, e.turns) for e in read[m]] for m in ("whole", "turns")]
    assert fields[0][1:] == fields[1][3:]  # one-turn conversations and Alpaca records: today's samples exactly
    assert whole[2].prompt == format_prompt("Add.", "2+2")
    assert all(np.array_equal(e.feature, PLACEHOLDER) for e in whole)


def test_whole_visual_conversations_take_their_image_feature(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "ws"))
    rows = write_feature_set(ws, ENCODER, n=6, shards=1)
    llava = [
        chat(
            ("<image>\nWhat colour?", rows[0][1]),
            ("And the shape?\n<image>", rows[0][2]),
            image=f"coco/{rows[0][0]}.jpg",
        )
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(llava))
    parts = [str(p) for p in sorted((tmp_path / "ws").rglob("part-*.parquet"))]
    (whole,) = instruction_examples(ws, ENCODER, [str(path)], parts, "whole")
    (first, second) = instruction_examples(ws, ENCODER, [str(path)], parts, "turns")
    assert whole.turns == (("What colour?", rows[0][1]), ("And the shape?", rows[0][2]))
    assert np.array_equal(whole.feature, first.feature) and np.array_equal(whole.feature, second.feature)
    assert not np.array_equal(whole.feature, np.zeros_like(whole.feature))


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    texts = [turn_prompt(q, True) + a for q, a in (("Hi", "Hello!"), ("How are you?", "Fine."), ("2+2?", "4"))]
    return train_bpe_tokenizer(texts * 3, vocab_size=400)


def test_a_batch_encodes_whole_conversations_and_single_turns_in_place(tok: BPETokenizer) -> None:
    turns = (("Hi", "Hello!"), ("How are you?", "Fine."))
    single = Example(np.zeros(4, np.float32), format_prompt("2+2?"), "4", "a")
    whole = Example(np.ones(4, np.float32), turn_prompt("How are you?", False), "Fine.", "b", turns)
    for max_words in (512, 30):
        micro = micro_batch([single, whole, single], tok, max_words, pad_id=0)
        rows = [encode_example(tok, single.prompt, "4", max_words), encode_conversation(tok, turns, max_words)]
        ids, labels = collate([rows[0], rows[1], rows[0]])
        assert micro.input_ids.equal(ids) and micro.labels.equal(labels)
        assert micro.features[:, 0].tolist() == [0.0, 1.0, 0.0]
    alone = micro_batch([single, single], tok, 512, pad_id=0)  # the single-turn path as before
    assert alone.input_ids.equal(collate([encode_example(tok, single.prompt, "4", 512)] * 2)[0])


def test_chinese_data_needs_a_tokenizer_that_holds_chinese(tmp_path: Path, tok: BPETokenizer) -> None:
    ws, path = files(tmp_path, alpaca_gpt4_data_zh=ALPACA_ZH, alpaca=[{"instruction": "Hi", "output": "Hello"}])
    texts = [t for r in ALPACA_ZH for t in (r["instruction"], r["input"], r["output"])]
    zh_tok = train_bpe_tokenizer(texts * 4, vocab_size=600)
    assert han_coverage(zh_tok, texts) == 1.0 and han_coverage(tok, texts) == 0.0
    assert han_coverage(tok, ["no Chinese here"]) == 1.0
    assert len(instruction_examples(ws, ENCODER, [path["alpaca_gpt4_data_zh"]], [], "turns", zh_tok, "zh.json")) == 3
    with pytest.raises(
        InputError,
        match=r"alpaca_gpt4_data_zh\.json: Chinese text .*en\.json keeps only 0% .*"
        r"needs a Chinese-capable base",
    ):
        instruction_examples(ws, ENCODER, [path["alpaca"], path["alpaca_gpt4_data_zh"]], [], "whole", tok, "en.json")
    assert len(instruction_examples(ws, ENCODER, [path["alpaca"]], [], "whole", tok, "en.json")) == 1


def test_the_conversation_option_is_part_of_the_run(tmp_path: Path) -> None:
    cfg = train_config(tmp_path)
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(SHAREGPT * 2))
    cfg.train.stage2.data, cfg.train.stage2.global_batch_size = [str(data)], 2
    ws = Workspace(cfg.workspace)
    jobs = {}
    for mode in ("turns", "first", "whole"):
        cfg.train.stage2.conversation = mode
        jobs[mode] = resolve_job(cfg, ws, 2, "run", init="stage1-checkpoint")
    assert {m: (j.conversation, j.examples) for m, j in jobs.items()} == {
        "turns": ("turns", 8),
        "first": ("first", 4),
        "whole": ("whole", 4),
    }
    cfg.train.stage2.conversation = "turns"
    cfg.train.stage2.first_turn_only = True  # the deprecated alias
    assert resolve_job(cfg, ws, 2, "run", init="stage1-checkpoint").conversation == "first"
