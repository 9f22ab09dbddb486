"""`ibllm evaluate --benchmark`: MME, VQA and captions asked of a trained model, resumed after an interruption,
scored, reported, and recorded in the catalog."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from pipelines.config import with_settings
from pipelines.demo import synthetic_media as media
from pipelines.errors import InputError
from pipelines.evaluate import benchmark
from pipelines.infer import stage as infer
from pipelines.runtime.answerer import Answerer
from pipelines.runtime.inputs import Request
from stores.catalog import Catalog
from stores.workspace import Workspace
from tests.pipelines.test_infer import trained  # noqa: F401 (the module's fixture)

SCENES = [("circle", "red"), ("square", "blue"), ("triangle", "green"), ("circle", "yellow")]


def mme_folder(root: Path) -> Path:
    """An MME-layout folder: `color` with images and .txt beside them, `existence` in the images/ + answers layout."""
    color, existence = root / "color", root / "existence"
    (existence / "images").mkdir(parents=True)
    (existence / "questions_answers_YN").mkdir()
    color.mkdir()
    for i, (shape, colour) in enumerate(SCENES):
        img = media.draw_shape((96, 80), shape, colour, "grey", 0.6, i)
        img.save(color / f"{i:03d}.jpg")
        other = SCENES[(i + 1) % len(SCENES)][1]
        (color / f"{i:03d}.txt").write_text(
            f"Is the shape {colour}? Please answer yes or no.\tYes\n"
            f"Is the shape {other}? Please answer yes or no.\tNo\n"
        )
        img.save(existence / "images" / f"{i:03d}.png")
        other_shape = SCENES[(i + 1) % len(SCENES)][0]
        (existence / "questions_answers_YN" / f"{i:03d}.txt").write_text(
            f"Is there a {shape} in the image? Please answer yes or no.\tYes\n"
            f"Is there a {other_shape} in the image? Please answer yes or no.\tNo\n"
        )
    return root


def test_mme_answers_as_generate_resumes_after_an_interruption_and_is_recorded(
    trained,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, _, checkpoint = trained
    cfg = cfg.model_copy(deep=True)
    cfg.workspace = str(tmp_path / "ws")  # a workspace of its own, the trained run borrowed by path
    on = {"infer.checkpoint": checkpoint, "infer.device": "cpu", "infer.dtype": "float32"}
    data = mme_folder(tmp_path / "MME")
    calls = {"n": 0}
    original = Answerer.answer_all

    def interrupted(self, requests, stream=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third chunk: two chunks of 4 are committed
        return original(self, requests, stream)

    monkeypatch.setattr(Answerer, "answer_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        benchmark.run(with_settings(cfg, on | {"infer.batch": 1}), "mme", str(data))
    monkeypatch.setattr(Answerer, "answer_all", original)
    result = benchmark.run(with_settings(cfg, on | {"infer.batch": 1}), "mme", str(data))
    assert (result.questions, result.resumed, result.asked_now) == (16, 8, 8)
    again = benchmark.run(with_settings(cfg, on | {"infer.batch": 4}), "mme", str(data))
    assert (again.resumed, again.asked_now) == (16, 0)
    assert [(r.subtask, r.score) for r in again.rows] == [(r.subtask, r.score) for r in result.rows]
    rows = {r.subtask: r for r in result.rows}
    assert set(rows) == {"existence", "color", "perception"}
    assert rows["perception"].score == rows["existence"].score + rows["color"].score
    assert all(r.questions == 8 and 0 <= r.score <= 200 for n, r in rows.items() if n != "perception")
    # every answer is the one `ibllm generate` gives the same request, one at a time
    doc = json.loads(Path(result.results).read_text())
    first = doc["answers"][0]
    single = Request(
        image=[str(data / "existence" / "images" / "000.png")],
        prompt=first["prompt"],
        temperature=0.0,
        max_new_tokens=30,
        seed=0,
    )
    assert infer.run(with_settings(cfg, {"infer.checkpoint": checkpoint}), single).answers[0].answer == first["answer"]
    page = Path(result.report).read_text()
    assert "<svg" in page and "existence" in page and "perception" in page
    assert "data:image/jpeg;base64," in page or "<p>none</p>" in page
    ws = Workspace(cfg.workspace)
    recorded = Catalog(ws).query("SELECT benchmark, subtask, score, questions FROM evaluations ORDER BY subtask")
    assert recorded == [("mme", r.subtask, r.score, r.questions) for r in sorted(result.rows, key=lambda r: r.subtask)]


def test_vqa_and_captions_run_and_bad_layouts_name_the_path(trained, tmp_path: Path) -> None:  # noqa: F811
    cfg, _, checkpoint = trained
    on = with_settings(cfg, {"infer.checkpoint": checkpoint, "infer.device": "cpu", "infer.dtype": "float32"})
    cfg = cfg.model_copy(deep=True)
    cfg.workspace = str(tmp_path / "ws")
    for i, (shape, colour) in enumerate(SCENES):
        media.draw_shape((96, 80), shape, colour, "grey", 0.6, i).save(tmp_path / f"{i}.jpg")
    np.save(tmp_path / "cloud.npy", np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
    lines = [
        {"image": "0.jpg", "question": "What colour is the shape?", "answer": "red", "choices": ["red", "blue"]},
        {"image": "1.jpg", "question": "Is the shape blue?", "answer": "yes"},
        {"point": "cloud.npy", "question": "What is it?", "answer": "a cloud"},
    ]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    vqa = benchmark.run(on, "vqa", str(tmp_path / "set.jsonl"))
    assert {r.subtask for r in vqa.rows} == {"choice", "yes/no", "open", "all"} and vqa.questions == 3
    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(4)],
        "annotations": [
            {"image_id": i, "caption": f"a {c} {s} on a grey background"} for i, (s, c) in enumerate(SCENES)
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    caps = benchmark.run(on, "captions", str(tmp_path / "captions.json"))
    assert caps.rows[0].subtask == "all" and caps.rows[0].bleu4 is not None and caps.questions == 4
    with pytest.raises(InputError, match="does not exist"):
        benchmark.run(on, "mme", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match=r"set\.jsonl is a file: the MME benchmark takes its folder"):
        benchmark.run(on, "mme", str(tmp_path / "set.jsonl"))
    with pytest.raises(InputError, match=f"{tmp_path}: no MME subtask folder"):
        benchmark.run(on, "mme", str(tmp_path))
    empty = tmp_path / "MME" / "color"
    empty.mkdir(parents=True)
    with pytest.raises(InputError, match=str(empty)):
        benchmark.run(on, "mme", str(tmp_path / "MME"))
    (empty / "0.jpg").write_bytes((tmp_path / "0.jpg").read_bytes())
    with pytest.raises(InputError, match=r"0\.jpg"):  # an image without its answer file
        benchmark.run(on, "mme", str(tmp_path / "MME"))
    with pytest.raises(InputError, match="unknown MME subtask 'colour'"):
        benchmark.run(on, "mme", str(tmp_path / "MME"), subtasks=["colour"])


def test_cli_evaluate_benchmark(trained, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    cfg, _, checkpoint = trained
    data = mme_folder(tmp_path / "MME")
    tokenizer = f"model.tokenizer_path={cfg.model.tokenizer_path}"
    base = ["evaluate", "--workspace", str(tmp_path / "ws"), "--set", tokenizer, "--checkpoint", checkpoint]
    assert main([*base, "--benchmark", "mme", "--data", str(data), "--subtasks", "color", "--limit", "4"]) == 0
    out = capfd.readouterr().out
    assert "color" in out and "existence" not in out and "4 asked now" in out
    assert main([*base, "--benchmark", "mme"]) == 4
    assert "needs --data" in capfd.readouterr().err
    assert main([*base, "--data", str(data)]) == 4
    assert "--data is the data of a --benchmark" in capfd.readouterr().err


def test_the_benchmark_flow_reports_as_an_artifact(trained, tmp_path: Path, prefect_harness: None) -> None:  # noqa: F811
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.stages import benchmark_flow

    cfg, _, checkpoint = trained
    cfg = cfg.model_copy(deep=True)
    cfg.workspace = str(tmp_path / "ws")
    data = mme_folder(tmp_path / "MME")
    state = benchmark_flow(
        cfg, benchmark="mme", data=str(data), checkpoint=checkpoint, limit=4, batch=2, return_state=True
    )
    result = state.result()
    assert [r.subtask for r in result.rows] == ["existence", "perception"] and result.questions == 4

    async def artifacts() -> list:
        async with get_client() as client:
            return [a for a in await client.read_artifacts() if a.flow_run_id == state.state_details.flow_run_id]

    (artifact,) = asyncio.run(artifacts())
    assert artifact.key == "benchmark" and "existence" in artifact.data and "perception" in artifact.data


def test_cli_zero_shot_check_of_the_encoder(trained, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    _, f, _ = trained
    root = tmp_path / "imagenet"
    for i, (shape, colour) in enumerate(SCENES[:3]):
        (root / colour).mkdir(parents=True)
        for j in range(2):
            media.draw_shape((64, 64), shape, colour, "grey", 0.6, 10 * i + j).save(root / colour / f"{j}.png")
    ws = tmp_path / "ws"
    base = ["evaluate", "--workspace", str(ws), "--set", f"model.imagebind_vocab={f['vocab']}"]
    assert main([*base, "--benchmark", "zeroshot-image", "--data", str(root), "--json"]) == 0
    doc = json.loads(capfd.readouterr().out)
    assert doc["classes"] == 3 and doc["samples"] == 6 and doc["encoder_id"] == "imagebind-tiny-init0"
    recorded = Catalog(Workspace(str(ws))).query("SELECT benchmark, checkpoint, score, top5 FROM evaluations")
    assert recorded == [("zeroshot-image", "imagebind-tiny-init0", doc["top1"], doc["top5"])]
    assert main([*base, "--benchmark", "zeroshot-audio", "--data", str(root)]) == 4
    assert f"{root}" in capfd.readouterr().err  # not an ESC-50 layout: the path is named
