"""The ibllm command line: help, --json on stdout only, config errors and ledger conflicts as exit codes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import COMMANDS, main
from stores.lease import lease
from stores.workspace import Workspace

SMALL = ["--set", "synthetic.count=24", "--set", "synthetic.slow_seconds=3", "--set", "download.timeout=1.5"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`ibllm ARGS` in a fresh interpreter, from `cwd` (default: this one's)."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy()
    )


def test_help_lists_every_command() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout
    for flag in ("--config", "--set", "--workspace", "--json", "--force"):
        assert flag in run_cli("synthetic", "--help").stdout


def test_json_result_alone_on_stdout(tmp_path: Path) -> None:
    proc = run_cli("synthetic", "--json", "--workspace", str(tmp_path / "ws"), *SMALL)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rows"] == 24 and result["served"]["ok"] == result["good"]
    assert "served at http://127.0.0.1:" in proc.stderr  # logs went to stderr


def test_config_error_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synthetic", "--set", "synthetic.count=-3"]) == 2
    err = capsys.readouterr().err
    assert "synthetic.count" in err and "-3" in err


def test_setting_flags_and_a_missing_workspace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A flag that is a setting fails as the setting does (exit 2, the field named); generate, chat and serve refuse
    a workspace that does not exist instead of creating it empty."""
    assert main(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "--port 70000" in err and "serve.port: Input should be less than or equal to 65535" in err
    for command in ("generate", "chat", "serve"):
        assert main([command, "--workspace", str(tmp_path / "mistyped")]) == 4
        assert f"workspace {tmp_path / 'mistyped'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "mistyped").exists()
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # each setting flag names its field and the field's default
    assert "(infer.temperature; default 0.1)" in shown and "(infer.max_new_tokens; default 256)" in shown


def test_config_command_prints_resolved_yaml_on_stdout(tmp_path: Path) -> None:
    proc = run_cli("config", "--workspace", str(tmp_path), "--set", "index.cache_k=4")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["workspace"] == str(tmp_path) and "cache_k: 4" in proc.stdout
    as_json = json.loads(run_cli("config", "--json", "--set", "index.cache_k=4", cwd=tmp_path).stdout)
    assert as_json["index"]["cache_k"] == 4 and as_json["workspace"] == str(tmp_path / "workspace")


def test_changed_settings_exit_3_then_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main(["synthetic", "--json", *ws, *SMALL]) == 0
    capsys.readouterr()
    assert main(["synthetic", *ws, *SMALL, "--set", "synthetic.seed=9"]) == 3
    assert "seed: 0 -> 9" in capsys.readouterr().err
    assert main(["synthetic", "--json", "--force", *ws, *SMALL, "--set", "synthetic.seed=9"]) == 0
    capsys.readouterr()
    with lease(Workspace(str(tmp_path / "ws")), "synthetic", "synthetic"):  # another run is writing it
        assert main(["synthetic", *ws, *SMALL, "--set", "synthetic.seed=9"]) == 6
    assert "synthetic output 'synthetic' is being written by another run (pid" in capsys.readouterr().err


def test_serve_until_terminated(tmp_path: Path) -> None:
    import re
    import signal
    import time
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "synthetic", "--serve", "--workspace", str(tmp_path / "ws"), *SMALL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, url = time.time() + 60, None
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if "until interrupted" in line:
                url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        assert url, "the server never said where it serves"
        with urllib.request.urlopen(url + "/media/audio_00.wav", timeout=10) as resp:
            assert resp.status == 200 and resp.read(4) == b"RIFF"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "24 rows" in out
    finally:
        proc.kill()


def test_stage_commands_refuse_missing_and_bad_input_with_exit_4(tmp_path: Path) -> None:
    """Run from a folder that is not the repository, with a relative workspace, as a newcomer would."""
    ws = ["--workspace", "ws"]
    cli = functools.partial(run_cli, cwd=tmp_path)
    for command in ("ingest", "curate", "download"):
        proc = cli(command, *ws, *SMALL, "--set", "download.processes=1")
        assert proc.returncode == 4, (command, proc.stderr[-500:])  # nothing to read yet: a clear message
        assert "ibllm:" in proc.stderr and "Traceback" not in proc.stderr
    # the chain that follows, from a fresh folder with a relative workspace, is the README's first block: its test
    # (tests/e2e/test_readme.py) runs it as written, and asks the index about a file that is no image
    bad = tmp_path / "bad.csv"
    bad.write_text("link,text\nhttp://x,a,extra\n")
    proc = cli(
        "ingest", *ws, "--set", f"sources=[{{name: g, format: generic, paths: ['{bad}'], columns: {{url: link}}}}]"
    )
    assert proc.returncode == 4 and "bad.csv" in proc.stderr
