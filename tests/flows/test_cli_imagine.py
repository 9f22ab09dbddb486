"""`ibllm imagine` end to end: a PNG from an image on the command line, its exit codes, and the Prefect task."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from flows.cli import main
from pipelines.config import Config
from pipelines.demo import synthetic_media as media
from pipelines.runtime.inputs import Request
from tests.model.tiny_unclip import unclip_folder  # noqa: F401 (a fixture)


def test_imagine_writes_a_png(tmp_path: Path, unclip_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    image = tmp_path / "shape.png"
    media.draw_shape((64, 64), "square", "blue", "grey", 0.6, 1).save(image)
    out = tmp_path / "picture.png"
    common = ["--workspace", str(tmp_path / "ws"), "--image", str(image), "--steps", "2", "--seed", "5"]
    assert main(["imagine", *common, "--generator", str(unclip_folder), "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (16, 16)
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["imagine", *common, "--generator", str(unclip_folder), "--out", str(out)]) == 4  # exists
    assert "add --force to replace" in capsys.readouterr().err
    assert main(["imagine", *common, "--generator", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b.png")]) == 4
    assert f"generator folder not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert main(["imagine", *common, "--generator", str(unclip_folder), "--steps", "0"]) == 2  # a setting's value
    err = capsys.readouterr().err
    assert "--steps 0" in err and "imagine.steps: Input should be greater than 0" in err


def test_the_prefect_task_draws(tmp_path: Path, unclip_folder: Path) -> None:  # noqa: F811
    from flows.tasks import imagine_task

    image = tmp_path / "shape.jpg"
    media.draw_shape((80, 64), "circle", "red", "grey", 0.6, 0).save(image)
    cfg = Config.from_yaml(
        None,
        [f"workspace={tmp_path / 'ws'}", f"imagine.generator={unclip_folder}", "imagine.steps=1", "imagine.images=2"],
    )
    result = imagine_task.fn(cfg, Request(image=[str(image)]), out=str(tmp_path / "t.png"))
    assert result.pictures[0].paths == [str(tmp_path / "t-0.png"), str(tmp_path / "t-1.png")]
    assert all(Path(p).is_file() for p in result.pictures[0].paths)
