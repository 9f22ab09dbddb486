"""The README's command blocks run as written, in order, in a fresh folder, as a newcomer would run them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- readme-test:[^>]*-->\n```bash\n(.*?)```", re.S)


def readme_lines() -> list[str]:
    """Every command line of the README's blocks marked `readme-test`, in the README's order."""
    blocks = MARKER.findall((ROOT / "README.md").read_text())
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_the_readme_marks_its_runnable_blocks() -> None:
    lines = readme_lines()
    assert any(line.startswith("ibllm train --stage 1") for line in lines)
    assert any(line.startswith("ibllm generate --requests") for line in lines)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    """Each line exits 0 with something on stdout and no traceback; then each stage's `--json` result parses."""
    bin_dir = str(Path(sys.executable).parent)  # where the virtualenv's `ibllm` is, as `. .venv/bin/activate` does
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "IBLLM_"))}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "HOME": str(home)}
    folder = tmp_path / "newcomer"
    folder.mkdir()

    def run(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True, text=True, timeout=1200)

    for line in readme_lines():
        proc = run(line)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{line}\n{proc.stderr[-3000:]}"
        # an answer may be empty (a short-trained model can end at once), and the stage then says so on stderr
        said = ">" in line or proc.stdout.strip() or "answer is empty" in proc.stderr
        assert said, f"{line}: nothing on stdout"
    resolved = yaml.safe_load((folder / "resolved.yaml").read_text())
    assert resolved["workspace"] == "s3://ibllm/paper" and resolved["download"]["timeout"] == 5
    answers = [json.loads(a) for a in (folder / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 1 and answers[0]["answer"]
    # every stage again with --json: nothing left to do, and stdout is one JSON document
    for stage in ("ingest", "curate", "download", "report", "extract", "index", "base", "config", "catalog", "runs"):
        proc = run(f"ibllm {stage} --json")
        assert proc.returncode == 0, f"{stage}\n{proc.stderr[-2000:]}"
        assert isinstance(json.loads(proc.stdout), dict), stage
    assert (folder / "workspace" / "checkpoints" / "stage2").is_dir()
    (folder / "notes.jpg").write_text("not an image")
    proc = run("ibllm index --query-image notes.jpg")
    assert proc.returncode == 4 and "notes.jpg" in proc.stderr and "Traceback" not in proc.stderr
