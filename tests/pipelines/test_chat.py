"""Conversations at inference: `generate --history`, batched requests equal one by one, `ibllm chat` scripted."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli import main
from model.llm.chat import chat_prompt
from model.llm.generate import Sampling, generate_ids
from pipelines import stop
from pipelines.config import with_settings
from pipelines.errors import InputError
from pipelines.infer import chat
from pipelines.infer import stage as infer
from pipelines.runtime import checkpoints, loader
from pipelines.runtime.inputs import Request, parse_history, read_history
from stores.workspace import Workspace
from tests.pipelines.test_infer import GREEDY, cli, trained  # noqa: F401 (the module's fixture)

TURNS = [("What colour is the shape?", "The shape is red."), ("What shape is it?", "It is a circle.")]


def test_history_forms_are_read_and_bad_ones_named(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": TURNS[0][0]}, {"role": "assistant", "content": TURNS[0][1]}]
    sharegpt = [{"from": "human", "value": TURNS[0][0]}, {"from": "gpt", "value": TURNS[0][1]}]
    assert parse_history(messages) == parse_history(sharegpt) == parse_history([list(TURNS[0])]) == TURNS[:1]
    with pytest.raises(ValueError, match="ends with a user message"):
        parse_history(messages[:1])
    with pytest.raises(ValueError, match="message 0 is from 'assistant'"):
        parse_history(messages[::-1])
    with pytest.raises(ValueError, match="turn 0 is not a \\[question, answer\\] pair"):
        parse_history([["only a question"]])
    bad = tmp_path / "history.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=f"{bad}: not a JSON file"):
        read_history(str(bad))
    with pytest.raises(InputError, match="history file not found"):
        read_history(str(tmp_path / "nowhere.json"))


def test_an_answer_with_history_is_generate_ids_on_the_chat_prompt(trained) -> None:  # noqa: F811
    cfg, _, checkpoint = trained
    question = "And is it large?"
    answer = infer.run(cfg, Request(prompt=question, history=TURNS, **GREEDY)).answers[0].answer
    ws = Workspace(cfg.workspace)
    model, tokenizer = checkpoints.load(cfg, ws, checkpoints.inspect(cfg, ws, checkpoint))
    ids = chat_prompt(tokenizer, TURNS, question)
    sampling = Sampling(temperature=0.0, max_new_tokens=GREEDY["max_new_tokens"], max_seq_len=model.config.max_seq_len)
    (expected,) = generate_ids(model.eval(), [ids], None, sampling, eos_id=tokenizer.eos_id)
    assert answer == tokenizer.decode(expected).strip()
    without = infer.run(cfg, Request(prompt=question, **GREEDY)).answers[0].answer
    assert isinstance(without, str)


def test_a_batch_answers_as_one_by_one(trained, tmp_path: Path) -> None:  # noqa: F811
    cfg, f, _ = trained
    lines = [
        {"image": f["jpg"], "prompt": "Describe it."},
        {"prompt": "Name a colour."},
        {"audio": f["wav"], "max_new_tokens": 3},
        {"image": f["png"], "history": [list(TURNS[0])]},
        {"image": "gone.jpg"},
        {"video": f["mp4"], "prompt": "What moves?"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(line | GREEDY if "max_new_tokens" not in line else line) for line in lines))
    together = infer.run(with_settings(cfg, {"infer.batch": 16}), requests_file=str(path))
    alone = infer.run(with_settings(cfg, {"infer.batch": 1}), requests_file=str(path))
    assert [a.answer for a in together.answers] == [a.answer for a in alone.answers]
    assert [a.error is None for a in together.answers] == [True, True, True, True, False, True]


def test_the_cli_takes_a_history_file(trained, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    cfg, f, _ = trained
    base = cli(cfg, "generate", "--temperature", "0", "--max-new-tokens", "5")
    history = tmp_path / "so-far.json"
    history.write_text(
        json.dumps([{"role": "user", "content": TURNS[0][0]}, {"role": "assistant", "content": TURNS[0][1]}])
    )
    assert main([*base, "--image", f["jpg"], "--prompt", TURNS[1][0], "--history", str(history)]) == 0
    said = capfd.readouterr().out.strip()
    expected = (
        infer.run(
            cfg,
            Request(
                image=[f["jpg"]],
                prompt=TURNS[1][0],
                history=TURNS[:1],
                temperature=0.0,
                max_new_tokens=5,
                seed=cfg.seed,
            ),
        )
        .answers[0]
        .answer
    )
    assert said == expected
    history.write_text(json.dumps([{"role": "assistant", "content": "hello"}]))
    assert main([*base, "--prompt", "hi", "--history", str(history)]) == 4
    assert f"{history}: message 0 is from 'assistant'" in capfd.readouterr().err


def test_a_scripted_chat(trained, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch) -> None:  # noqa: F811
    cfg, f, checkpoint = trained
    settings = {"infer.checkpoint": checkpoint, "infer.device": "cpu", "infer.dtype": "float32"}
    answerer = loader.load(with_settings(cfg, settings), need_encoder=False, slots=1).answerer
    session = chat.Chat(answerer, Request(temperature=0.0, max_new_tokens=5))
    script = [
        "/help",
        f"/image {f['jpg']}",
        TURNS[0][0],
        TURNS[1][0],
        "/smell x",
        f"/audio {tmp_path}/gone.wav",
        "/reset",
        "Name a colour.",
        "/quit",
        "never read",
    ]
    out = io.StringIO()
    result = chat.run(session, script, out)
    text = out.getvalue()
    assert "/reset" in text and "[image " in text and "unknown command /smell" in text
    assert "audio file not found" in text and "forgotten" in text
    assert len(result.turns) == 1 and result.turns[0][0] == "Name a colour." and result.inputs == {}
    first = infer.run(cfg, Request(image=[f["jpg"]], prompt=TURNS[0][0], temperature=0.0, max_new_tokens=5))
    second = infer.run(
        cfg,
        Request(
            image=[f["jpg"]],
            prompt=TURNS[1][0],
            temperature=0.0,
            max_new_tokens=5,
            history=[(TURNS[0][0], first.answers[0].answer)],
        ),
    )
    assert f"ibllm> {first.answers[0].answer}\n" in text and f"ibllm> {second.answers[0].answer}\n" in text

    # Ctrl-C while an answer streams (the watcher's stop request) drops that answer; the chat goes on
    def interrupted_once() -> Iterator[str]:
        stop.request()
        yield "Name a colour."
        yield "Name a colour."

    session = chat.Chat(answerer, Request(temperature=0.0, max_new_tokens=5))
    out = io.StringIO()
    result = chat.run(session, interrupted_once(), out)
    assert "[answer cancelled]" in out.getvalue() and not stop.requested()
    assert [q for q, _ in result.turns] == ["Name a colour."] and answerer.engine.active == answerer.engine.waiting == 0
    # the command itself: questions on stdin, answers on stdout
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{TURNS[0][0]}\n/quit\n"))
    args = cli(cfg, "chat", "--image", f["jpg"], "--temperature", "0", "--max-new-tokens", "5")
    assert main(args) == 0
    assert f"ibllm> {first.answers[0].answer}\n" in capfd.readouterr().out
