"""`ibllm generate`: every modality and a mix, the cache, batch mode with bad lines, clear errors, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import main
from model.imagebind.tokenizer import learn_merges, write_vocab
from model.llm.checkpoint import read_checkpoint, write_checkpoint
from pipelines.config import Config, with_settings
from pipelines.demo import synthetic_media as media
from pipelines.errors import InputError
from pipelines.index import stage as index
from pipelines.infer import stage as infer
from pipelines.runtime import checkpoints
from pipelines.runtime.encoders import cache_lookup
from pipelines.runtime.inputs import Request, parse_request, parse_weights
from pipelines.train import stage as train
from stores.index import CacheIndex
from stores.workspace import Workspace
from tests.hostile_media import png_claiming
from tests.pipelines.train_fixture import COLOURS, SHAPES, caption, train_config

GREEDY = {"temperature": 0.0, "max_new_tokens": 6}


def cli(cfg: Config, command: str = "generate", *more: str) -> list[str]:
    """The command line of `command` on the trained fixture's workspace and tokenizer, then `more`."""
    return [command, "--workspace", cfg.workspace, "--set", f"model.tokenizer_path={cfg.model.tokenizer_path}", *more]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict[str, str], str]:
    """A stage-1 run, its cache index, media of every kind (good and corrupt) and a CLIP vocabulary."""
    tmp = tmp_path_factory.mktemp("infer")
    cfg = train_config(tmp, epochs=1)
    checkpoint = train.run(cfg, 1, local=True).checkpoint
    cfg.index.holdout = 20
    index.run(cfg)
    files = {"jpg": tmp / "shape.jpg", "png": tmp / "shape.png", "wav": tmp / "tone.wav", "mp4": tmp / "move.mp4"}
    media.draw_shape((96, 80), "circle", "red", "grey", 0.6, 0).save(files["jpg"])
    media.draw_shape((64, 64), "square", "blue", "grey", 0.6, 1).save(files["png"])
    files["wav"].write_bytes(media.tone_wav(1.0, 16000, 1, 440.0))
    files["mp4"].write_bytes(media.moving_shape_mp4(1.0))
    for kind in ("jpg", "wav", "mp4"):
        bad = tmp / f"broken.{kind}"
        bad.write_bytes(b"this is not media at all" * 8)
        files[f"bad_{kind}"] = bad
    vocab = tmp / "clip_vocab.txt.gz"
    write_vocab(vocab, learn_merges([caption(c, s) for c in COLOURS for s in SHAPES], 60))
    files["vocab"] = vocab
    return cfg, {k: str(v) for k, v in files.items()}, checkpoint


def test_each_modality_and_a_mix_answer_deterministically(trained: tuple[Config, dict[str, str], str]) -> None:
    cfg, f, _ = trained
    cfg = cfg.model_copy(deep=True)
    cfg.model.imagebind_vocab = f["vocab"]
    mix = Request(
        image=[f["jpg"]],
        audio=[f["wav"]],
        video=[f["mp4"]],
        text=["a red circle"],
        weights={"audio": 0.5},
        prompt="What is shown?",
        **GREEDY,
    )
    result = infer.run(cfg, mix)
    (answer,) = result.answers
    assert isinstance(answer.answer, str) and result.summary() == answer.answer
    assert answer.weights == {"image": 1.0, "audio": 0.5, "video": 1.0, "text": 1.0}
    assert result.encoder_id == result.trained_encoder_id == "imagebind-tiny-init0"
    assert result.checkpoint.endswith("/model") and "/stage1/" in result.checkpoint
    assert infer.run(cfg, mix).answers[0].answer == answer.answer  # greedy: the same answer again
    single = [{"image": f["jpg"]}, {"image": f["png"]}, {"audio": f["wav"]}, {"video": f["mp4"]}, {"text": "a cat"}]
    requests = Path(f["vocab"]).parent / "each.jsonl"
    requests.write_text("\n".join(json.dumps(r | GREEDY) for r in single))
    each = infer.run(cfg, requests_file=str(requests))
    assert [a.error for a in each.answers] == [None] * 5
    assert all(isinstance(a.answer, str) for a in each.answers) and [a.line for a in each.answers] == [1, 2, 3, 4, 5]
    assert each.answers[0].prompt == "Generate caption of this image"  # the default prompt with inputs


def test_text_only_prompting_needs_no_encoder(trained: tuple[Config, dict[str, str], str]) -> None:
    cfg, _, _ = trained
    result = infer.run(cfg, Request(prompt="Name a colour.", **GREEDY))
    assert result.encoder_id is None and isinstance(result.answers[0].answer, str)


def test_the_cache_mixes_in_neighbours(trained: tuple[Config, dict[str, str], str]) -> None:
    cfg, f, _ = trained
    result = infer.run(with_settings(cfg, {"infer.use_cache": True}), Request(image=[f["jpg"]], **GREEDY))
    assert result.cache == cfg.index.name and isinstance(result.answers[0].answer, str)
    opened = CacheIndex.open(Workspace(cfg.workspace), cfg.index.name)
    lookup = cache_lookup(opened, cfg.index.cache_k)
    query = torch.from_numpy(opened.gather(np.array([3, 7]))) * 0.5  # unnormalised queries of stored features
    sims, values = lookup(query)
    assert sims.shape == (2, cfg.index.cache_k) and values.shape == (2, cfg.index.cache_k, opened.dim)
    assert sims[:, 0].tolist() == pytest.approx([0.5, 0.5], abs=2e-3)  # itself first: the unnormalised inner product
    assert torch.allclose(values[:, 0], query * 2, atol=1e-6)


def test_batch_mode_answers_good_lines_and_names_bad_ones(trained: tuple[Config, dict[str, str], str]) -> None:
    cfg, f, _ = trained
    tmp = Path(f["vocab"]).parent
    lines = [
        json.dumps({"image": f["jpg"], "prompt": "Describe it."}),
        "{not json",
        json.dumps({"image": [f["jpg"], str(tmp / "nowhere.jpg")]}),
        json.dumps({"audio": f["wav"], "weights": {"smell": 1}}),
        "",
        json.dumps({"prompt": "Name a colour.", "max_new_tokens": 3}),
        json.dumps({"image": f["bad_jpg"]}),
        json.dumps({"audio": f["bad_wav"]}),
        json.dumps({"video": f["bad_mp4"]}),
        json.dumps({"text": "a red circle"}),  # no CLIP vocabulary in this config
        json.dumps({"image": f["jpg"], "colour": "red"}),
    ]
    (tmp / "batch.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp / "answers.jsonl"
    result = infer.run(cfg, Request(**GREEDY), requests_file=str(tmp / "batch.jsonl"), output=str(out))
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["line"] for w in written] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11] == [a.line for a in result.answers]
    errors = {w["line"]: w.get("error") for w in written}
    assert errors[1] is None and errors[6] is None and result.errors == 8
    assert isinstance(written[0]["answer"], str) and written[0]["inputs"] == {"image": [f["jpg"]]}
    assert errors[2].startswith("line 2: not JSON")
    assert errors[3] == f"line 3: image file not found: {tmp / 'nowhere.jpg'}"
    assert errors[4].startswith("line 4: weights: weight of unknown modality 'smell'")
    assert errors[7].startswith(f"line 7: unreadable image {f['bad_jpg']}: cannot decode image")
    assert errors[8].startswith(f"line 8: unreadable audio {f['bad_wav']}: cannot decode audio")
    assert errors[9].startswith(f"line 9: unreadable video {f['bad_mp4']}: cannot decode video")
    assert "model.imagebind_vocab" in errors[10]
    assert errors[11].startswith("line 11: colour: unknown field; a request has image, audio")
    assert f"-> {out}" in result.summary()


def test_bad_inputs_are_refused_with_clear_errors(trained: tuple[Config, dict[str, str], str], tmp_path: Path) -> None:
    cfg, f, checkpoint = trained
    with pytest.raises(InputError, match=r"image file not found: .*nowhere\.jpg"):
        infer.run(cfg, Request(image=[str(tmp_path / "nowhere.jpg")]))
    with pytest.raises(InputError, match=r"unreadable audio .*broken\.wav: cannot decode audio"):
        infer.run(cfg, Request(audio=[f["bad_wav"]], **GREEDY))
    with pytest.raises(InputError, match="unknown modality 'depth'"):
        parse_weights(["image=1", "depth=0.5"])
    with pytest.raises(InputError, match="expected MODALITY=NUMBER"):
        parse_weights(["image:1"])
    with pytest.raises(InputError, match="line 5: temperature: must be >= 0"):
        parse_request('{"image": "x.jpg", "temperature": -1}', 5)
    with pytest.raises(InputError, match="nothing to answer"):
        infer.run(cfg, Request())
    with pytest.raises(InputError, match="need ImageBind's CLIP BPE vocabulary"):
        infer.run(cfg, Request(text=["a red circle"]))
    with pytest.raises(InputError, match=r"checkpoint not found: .*missing"):
        infer.run(with_settings(cfg, {"infer.checkpoint": str(tmp_path / "missing")}), Request(prompt="Hi"))

    config, tensors, _ = read_checkpoint(checkpoint)
    other = write_checkpoint(str(tmp_path / "other"), config, tensors, {"encoder_id": "imagebind-huge-0123456789ab"})
    with pytest.raises(
        InputError,
        match="trained on encoder imagebind-huge-0123456789ab, but the configured encoder is imagebind-tiny-init0",
    ):
        infer.run(with_settings(cfg, {"infer.checkpoint": other}), Request(image=[f["jpg"]]))
    reseeded = cfg.model_copy(deep=True)
    reseeded.seed = 1  # another random tiny encoder than the run recorded in its run.json
    with pytest.raises(InputError, match=r"trained on encoder imagebind-tiny-init0, .* is imagebind-tiny-init1"):
        infer.run(reseeded, Request(image=[f["jpg"]]))

    empty = cfg.model_copy(deep=True)
    empty.workspace = str(tmp_path / "empty")
    with pytest.raises(InputError, match=r"no trained checkpoint .*run `ibllm train --stage 1` first"):
        infer.run(empty, Request(prompt="Hi"))


def test_the_newest_stage2_run_is_preferred(trained: tuple[Config, dict[str, str], str], tmp_path: Path) -> None:
    _, _, trained_checkpoint = trained
    ws = Workspace(str(tmp_path / "ws"))
    checkpoint = ws.checkpoints("stage1", "20260101-000000-aaaa", "local", "step-00000001", "model")
    copy = ws.checkpoints("stage2", "20260102-000000-bbbb", "local", "step-00000001", "model")
    for target in (checkpoint, copy):
        shutil.copytree(trained_checkpoint, target)
    run1 = Path(ws.checkpoints("stage1", "20260101-000000-aaaa", "run.json"))
    run1.write_text(json.dumps({"status": "complete", "checkpoint": "local/step-00000001/model"}))
    assert checkpoints.choose(ws) == checkpoint
    run2 = Path(ws.checkpoints("stage2", "20260102-000000-bbbb", "run.json"))
    run2.write_text(json.dumps({"status": "running", "checkpoint": "local/step-00000001/model"}))
    assert checkpoints.choose(ws) == checkpoint  # an unfinished stage-2 run is not used
    run2.write_text(json.dumps({"status": "complete", "checkpoint": copy}))  # as an older ibllm wrote it: in full
    assert checkpoints.choose(ws) == copy
    assert checkpoints.choose(ws, copy) == copy


def test_cli_generate(trained: tuple[Config, dict[str, str], str], capfd: pytest.CaptureFixture[str]) -> None:
    cfg, f, _ = trained
    base = cli(cfg)
    opts = ["--temperature", "0", "--max-new-tokens", "5"]
    mix = ["--image", f["jpg"], "--audio", f["wav"], "--weight", "audio=0.5", *opts]
    assert main([*base, *mix, "--json"]) == 0
    doc = json.loads(capfd.readouterr().out)
    assert doc["answers"][0]["weights"] == {"image": 1.0, "audio": 0.5} and doc["errors"] == 0
    assert main([*base, *mix]) == 0
    assert capfd.readouterr().out == doc["answers"][0]["answer"] + "\n"  # the answer alone on stdout
    assert main([*base, "--image", f["jpg"], "--weight", "smell=1"]) == 4
    assert "unknown modality 'smell'" in capfd.readouterr().err
    assert main([*base, "--video", f["jpg"] + ".missing"]) == 4
    assert "video file not found" in capfd.readouterr().err
    batch, out = Path(f["vocab"]).parent / "two.jsonl", Path(f["vocab"]).parent / "two-answers.jsonl"
    batch.write_text(json.dumps({"image": f["jpg"], "max_new_tokens": 3}) + "\n" + json.dumps({"image": "gone.jpg"}))
    assert main([*base, "--requests", str(batch), "--output", str(out)]) == 7  # a request failed: not a success
    assert "1 request(s) failed" in capfd.readouterr().err and len(out.read_text().splitlines()) == 2
    assert main([*base, "--requests", str(batch), "--output", str(out)]) == 4  # nothing replaced without --force
    assert "add --force" in capfd.readouterr().err
    assert main([*base, "--requests", str(batch), "--output", str(out), "--force"]) == 7


def test_infer_settings_are_the_defaults_of_generate(
    trained: tuple[Config, dict[str, str], str], capfd: pytest.CaptureFixture[str]
) -> None:
    """`--set infer.temperature=...` and `infer.max_new_tokens` change what is generated; a request's own field wins."""
    cfg, f, _ = trained
    base = cli(cfg, "generate", "--image", f["jpg"], "--seed", "3", "--json")

    def answer(*args: str) -> str:
        assert main([*base, *args]) == 0
        said = json.loads(capfd.readouterr().out)["answers"][0]
        assert said["finish_reason"] in ("stop", "length")
        return said["answer"]

    greedy = answer("--set", "infer.temperature=0", "--set", "infer.max_new_tokens=12")
    assert answer("--temperature", "0", "--max-new-tokens", "12") == greedy  # the flags are the same settings
    short = answer("--set", "infer.temperature=0", "--set", "infer.max_new_tokens=2")
    assert len(short) < len(greedy) and greedy.startswith(short.rstrip("\ufffd"))  # 2 byte tokens: cut mid-character
    assert main([*base, "--set", "infer.temperature=0", "--set", "infer.max_new_tokens=2"]) == 0
    assert json.loads(capfd.readouterr().out)["answers"][0]["finish_reason"] == "length"
    hot = {answer("--set", "infer.temperature=50", "--set", "infer.max_new_tokens=12", "--seed", s) for s in "123"}
    assert hot != {greedy}  # sampling far from greedy: the setting reached the engine
    assert main([*base, "--set", "infer.max_new_tokens=0"]) == 2
    assert "infer.max_new_tokens: Input should be greater than 0" in capfd.readouterr().err


def test_cli_generate_refuses_hostile_media(
    trained: tuple[Config, dict[str, str], str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg, f, _ = trained
    base = cli(cfg)
    assert main([*base, "--image", str(tmp_path)]) == 4
    assert f"image {tmp_path} is a directory, not a file" in capfd.readouterr().err
    assert main([*base, "--audio", f["mp4"]]) == 4  # a video without sound
    assert f"unreadable audio {f['mp4']}: cannot decode audio {f['mp4']}: no audio stream (it has: video)" in (
        capfd.readouterr().err
    )
    (tmp_path / "notes.txt").write_text("not audio\n" * 20)
    assert main([*base, "--audio", str(tmp_path / "notes.txt")]) == 4
    assert "notes.txt: pyav: not a media file FFmpeg can read" in capfd.readouterr().err
    (tmp_path / "huge.png").write_bytes(png_claiming(10_000, 10_000))  # a few dozen bytes on disk
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's warning at open; our limit refuses it right after
        assert main([*base, "--image", str(tmp_path / "huge.png")]) == 4
    err = capfd.readouterr().err
    assert f"image {tmp_path / 'huge.png'} is 10000x10000 (100,000,000 pixels), above the limit of 89,478,485" in err
    assert "model.max_image_pixels sets the limit" in err
    assert main([*base, "--set", "model.max_image_pixels=1000", "--video", f["mp4"]]) == 4
    assert f"video {f['mp4']} is " in capfd.readouterr().err


def test_point_clouds_alone_mixed_and_with_the_cache(
    trained: tuple[Config, dict[str, str], str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg, f, _ = trained
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(300, 3)).astype(np.float32)
    np.save(tmp_path / "cloud.npy", xyz)
    ply = tmp_path / "cloud.ply"  # the same cloud as an ASCII PLY with normals
    header = "ply\nformat ascii 1.0\nelement vertex 300\n" + "".join(f"property float {a}\n" for a in "xyz")
    header += "property float nx\nproperty float ny\nproperty float nz\nend_header\n"
    ply.write_text(header + "".join(" ".join(f"{v:.9g}" for v in [*p, 0, 0, 1]) + "\n" for p in xyz))
    alone = infer.run(cfg, Request(point=[str(tmp_path / "cloud.npy")], prompt="What is it?", **GREEDY))
    assert alone.answers[0].weights == {"point": 1.0} and isinstance(alone.answers[0].answer, str)
    same = infer.run(cfg, Request(point=[str(ply)], prompt="What is it?", **GREEDY)).answers[0]
    assert same.answer == alone.answers[0].answer
    cached = with_settings(cfg, {"infer.use_cache": True})
    mixed = infer.run(cached, Request(point=[str(ply)], image=[f["jpg"]], weights={"point": 0.5}, **GREEDY))
    assert mixed.cache == cfg.index.name and mixed.answers[0].weights == {"image": 1.0, "point": 0.5}
    base = cli(cfg)
    opts = ["--temperature", "0", "--max-new-tokens", str(GREEDY["max_new_tokens"]), "--json"]
    assert main([*base, "--point-cloud", str(ply), "--prompt", "What is it?", *opts]) == 0
    assert json.loads(capfd.readouterr().out)["answers"][0]["answer"] == alone.answers[0].answer
    assert main([*base, "--point-cloud", str(ply), "--normalize-points", "--resample-points", "256", *opts]) == 0
    assert json.loads(capfd.readouterr().out)["answers"][0]["inputs"] == {"point": [str(ply)]}
    xyz[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", xyz)
    assert main([*base, "--point-cloud", str(tmp_path / "nan.npy")]) == 4
    assert f"unreadable point {tmp_path / 'nan.npy'}" in capfd.readouterr().err
    assert main([*base, "--point-cloud", str(tmp_path / "cloud.stl")]) == 4
    assert "point file not found" in capfd.readouterr().err
