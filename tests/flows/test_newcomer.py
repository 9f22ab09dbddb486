"""What a newcomer meets first: packaged configs by name, the command to run first, refusals before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.errors import InputError
from pipelines.runtime.inputs import check_weighted_inputs, make_request, parse_request
from tests.flows.test_cli import run_cli


def test_packaged_config_by_name_from_any_folder(tmp_path: Path) -> None:
    for name in ("paper", "paper.yaml", "configs/paper.yaml"):
        proc = run_cli("config", "-c", name, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert yaml.safe_load(proc.stdout)["workspace"] == "s3://ibllm/paper"
    proc = run_cli("config", "-c", "nope", cwd=tmp_path)
    assert proc.returncode == 2 and str(tmp_path / "nope") in proc.stderr and "demo, paper" in proc.stderr


def test_each_stage_names_the_command_to_run_first(tmp_path: Path) -> None:
    for command, first in (("ingest", "ibllm synthetic"), ("extract", "ibllm download")):
        proc = run_cli(command, cwd=tmp_path)
        assert proc.returncode == 4 and f"run `{first}` first" in proc.stderr, proc.stderr[-1000:]
        assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "workspace").rglob("*.txt.gz"))  # no vocabulary learned from nothing


def test_generate_refuses_weights_without_their_input(tmp_path: Path) -> None:
    (tmp_path / "workspace").mkdir()  # generate refuses a workspace that does not exist first
    proc = run_cli("generate", "--image", "x.jpg", "--weight", "audio=0.5", "--prompt", "hi", cwd=tmp_path)
    assert proc.returncode == 4 and "weight audio=0.5 given, but no audio input" in proc.stderr
    with pytest.raises(InputError, match="weight audio=1 given, but no audio input"):
        check_weighted_inputs(make_request({"image": "x.jpg", "weights": {"audio": 1}}))
    with pytest.raises(InputError, match="line 3: depth: generate takes image, audio, video, point, text inputs"):
        parse_request('{"depth": "d.png"}', 3)
    with pytest.raises(InputError, match="line 2: weight audio=2 given, but no audio input"):
        parse_request('{"image": "x.jpg", "weights": {"audio": 2}}', 2)


def test_convert_never_replaces_an_output_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    (tmp_path / "old.pth").write_bytes(b"x")
    for args in (["adapter", "7B.pth", "out"], ["export", "ours", "old.pth"], ["llama", "meta", "out"]):
        proc = run_cli("convert", *args, cwd=tmp_path)
        assert proc.returncode == 4 and "add --overwrite to replace it" in proc.stderr, (args, proc.stderr[-500:])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine" and (tmp_path / "old.pth").read_bytes() == b"x"
