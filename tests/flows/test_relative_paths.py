"""Relative paths from a folder that is not the repository: every process sees the same files (issue 17)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from pipelines.config import dump_config, load_config
from tests.flows.test_cli import run_cli
from tests.pipelines.train_fixture import train_config


@pytest.mark.slow
def test_ray_train_with_a_relative_workspace_and_tokenizer(tmp_path: Path) -> None:
    """Ray Train starts its workers in a folder of Ray's own: the driver must still find the run's checkpoint."""
    cfg = train_config(tmp_path, epochs=1)
    doc = yaml.safe_load(dump_config(cfg))
    doc["workspace"] = "ws"
    doc["model"]["tokenizer_path"] = os.path.relpath(cfg.model.tokenizer_path, tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text(yaml.safe_dump(doc))
    proc = run_cli("train", "--stage", "1", "--json", "-c", "conf/mine.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["steps"] == result["total_steps"] > 0
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.is_absolute() and checkpoint.is_relative_to(tmp_path / "ws"), checkpoint
    assert (checkpoint / "config.json").is_file()
    assert list((tmp_path / "ws" / "checkpoints" / "stage1").glob("*/latest.json"))


def test_local_paths_are_absolute_once_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "workspace=ws",
            "model.llama_path=m/llama",
            "train.stage2.data=[i.json, s3://b/i.json]",
            "sources=[{name: g, format: generic, paths: ['meta/*.csv']}]",
        ],
    )
    assert cfg.workspace == str(tmp_path / "ws")
    assert cfg.model.llama_path == str(tmp_path / "m" / "llama")
    assert cfg.train.stage2.data == [str(tmp_path / "i.json"), "s3://b/i.json"]
    assert cfg.sources[0].paths == [str(tmp_path / "meta" / "*.csv")]
    assert cfg.train.stage1.data == ["synthetic"]  # source names stay names
    assert load_config(None, ["workspace=s3://bucket/run"]).workspace == "s3://bucket/run"
    monkeypatch.chdir("/")
    assert load_config(None, [f"workspace={cfg.workspace}"]).workspace == cfg.workspace  # idempotent


def test_bad_workspace_or_model_path_fails_before_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    assert main(["ingest", "--workspace", "file/ws"]) == 2
    err = capsys.readouterr().err
    assert "workspace" in err and str(tmp_path / "file" / "ws") in err
    assert main(["train", "--stage", "1", "--workspace", "ws", "--set", "model.tokenizer_path=tok/nope.json"]) == 4
    err = capsys.readouterr().err
    assert "model.tokenizer_path" in err and str(tmp_path / "tok" / "nope.json") in err
    assert not (tmp_path / "ws" / "checkpoints").exists()
