"""The demo's own stages: the synthetic language, stage 0's base, generated instructions, reused training runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.llm.chat import encode_conversation
from model.llm.checkpoint import load_llama
from model.llm.tokenizer import load_tokenizer, train_bpe_tokenizer
from pipelines.config import Config, SyntheticConfig
from pipelines.demo import base_lm
from pipelines.demo import text as demo_text
from pipelines.demo.synthetic import SyntheticSource
from pipelines.demo.synthetic_media import parse_caption, random_scene
from pipelines.errors import InputError
from pipelines.train import stage as train
from pipelines.train.setup import resolve_job
from stores.instructions import read_instructions
from stores.workspace import Workspace
from tests.pipelines.train_fixture import train_config

TINY_STAGE0 = [
    "train.stage0.dim=32",
    "train.stage0.n_layers=2",
    "train.stage0.intermediate_size=64",
    "train.stage0.steps=80",
    "train.stage0.texts=300",
    "train.stage0.batch_size=8",
    "train.stage0.lr=0.01",
]


def test_every_synthetic_caption_parses_back_to_its_scene() -> None:
    items = SyntheticSource(SyntheticConfig(count=60)).items
    for it in items:
        scene = parse_caption(it.caption)
        assert scene is not None and (scene.color, scene.shape, scene.background) == (it.color, it.shape, it.background)
    assert parse_caption("a photo of a dog") is None
    assert parse_caption("a large mauve circle on a grey background") is None  # not a colour of the source


def test_generated_conversations_read_back_as_llava_single_turn_samples(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [(f"{i:06d}", random_scene(rng).caption) for i in range(5)] + [("x", "not a synthetic caption")]
    path = tmp_path / "i.json"
    path.write_text(json.dumps(demo_text.conversations(rows)))
    data = read_instructions(str(path))
    assert data.layout == "llava"
    assert len(data.records) == 5 * (len(demo_text.QUESTIONS) + 1)  # and a yes/no question each
    first = data.records[0]
    assert first.image == "000000" and first.instruction == demo_text.QUESTIONS[0][0]
    assert first.answer == f"The shape is {parse_caption(rows[0][1]).color}."
    assert len(read_instructions(str(path), first_turn_only=True).records) == 5


def test_a_whole_generated_conversation_fits_the_demo_stage2_max_words(tmp_path: Path) -> None:
    cfg = Config.from_yaml(None)
    assert cfg.train.stage2.conversation == "whole"
    tok = train_bpe_tokenizer(demo_text.corpus(cfg.train.stage0.texts, cfg.seed), cfg.train.stage0.vocab_size)
    rng = np.random.default_rng(0)
    path = tmp_path / "i.json"
    path.write_text(json.dumps(demo_text.conversations([(f"{i:06d}", random_scene(rng).caption) for i in range(20)])))
    records = read_instructions(str(path), whole=True).records
    assert len(records) == 20 and all(len(r.history) == len(demo_text.QUESTIONS) for r in records)
    yes_no = [r.history[-1] for r in records]  # before the caption: one MME-style question, half of them "No."
    assert all(q.endswith(demo_text.YES_OR_NO) for q, _ in yes_no) and {a for _, a in yes_no} == {"Yes.", "No."}
    lengths = [len(encode_conversation(tok, (*r.history, (r.instruction, r.answer)), 10_000)[0]) for r in records]
    assert max(lengths) <= cfg.train.stage2.max_words, lengths


def test_stage0_trains_a_base_that_stage1_picks_up_and_is_not_retrained(tmp_path: Path) -> None:
    cfg = Config.from_yaml(None, [f"workspace={tmp_path / 'ws'}", *TINY_STAGE0])
    first = base_lm.run(cfg)
    assert first.trained and first.last_loss < first.first_loss / 2
    again = base_lm.run(cfg)
    assert not again.trained and again.last_loss == first.last_loss
    llama = load_llama(str(Path(first.path) / "llama"))
    tok = load_tokenizer(str(Path(first.path) / "tokenizer.json"))
    assert llama.config.hidden_size == 32 and llama.config.vocab_size == tok.n_words == first.vocab_size
    cfg_other = Config.from_yaml(None, [f"workspace={tmp_path / 'ws'}", *TINY_STAGE0, "train.stage0.steps=81"])
    assert base_lm.run(cfg_other).trained  # other settings: trained again, replacing the first


def test_stage0_needs_its_settings() -> None:
    cfg = Config.from_yaml(None, ["train.stage0=null"])
    with pytest.raises(InputError, match=r"train\.stage0"):
        base_lm.run(cfg)


def test_a_run_of_the_same_job_is_reused_and_another_setting_trains_anew(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, epochs=1)
    first = train.run(cfg, 1, local=True, reuse=True)
    again = train.run(cfg, 1, local=True, reuse=True)
    assert again.run_id == first.run_id and again.losses == first.losses and again.steps == first.steps
    other = cfg.model_copy(deep=True)
    other.train.stage1.blr = 0.03
    changed = train.run(other, 1, local=True, reuse=True)
    assert changed.run_id != first.run_id
    ws = Workspace(cfg.workspace)
    assert resolve_job(cfg, ws, 1, "x").base_llama is None  # no stage 0 here: the random tiny base
