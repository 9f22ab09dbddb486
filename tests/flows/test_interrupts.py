"""Ctrl-C and SIGTERM as a user sends them: a stop at a safe point, a forced end, the line of what was kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipelines.train import stage as train
from stores.runs import Runs
from stores.workspace import Workspace
from tests.pipelines.train_fixture import train_config

ROOT = Path(__file__).resolve().parents[2]
# A command that never checks for a stop: only the watcher's KeyboardInterrupt, or its deadline, ends it.
STUBBORN = textwrap.dedent(
    """
    import sys, time
    from flows.interrupts import Interrupts
    from pipelines import stop
    grace, deadline, mode = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    with Interrupts(grace, deadline).installed() as watcher, stop.note(lambda: "the note of what was kept"):
        print("ready", flush=True)
        try:
            while True:
                time.sleep(0.02)
        except KeyboardInterrupt:
            while mode == "ignore":
                time.sleep(0.02)
            print(f"interrupted {watcher.exit_code}", flush=True)
            sys.exit(watcher.exit_code)
    """
)


def _stubborn(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _ended(proc: subprocess.Popen[str], within: float) -> tuple[int, str, str, float]:
    start = time.monotonic()
    out, err = proc.communicate(timeout=within)  # a hang fails here instead of hanging the suite
    return proc.returncode, out, err, time.monotonic() - start


def test_a_command_that_never_checks_is_interrupted_then_forced() -> None:
    """After the grace the main thread gets a KeyboardInterrupt (130; SIGTERM 143); one that ignores it ends at the
    deadline; a second Ctrl-C ends it at once. Each end says what was kept."""
    proc = _stubborn("0.5", "20", "react")
    proc.send_signal(signal.SIGINT)
    code, out, err, _ = _ended(proc, 20)
    assert (code, out.strip()) == (130, "interrupted 130") and "stopping at the next safe point" in err
    proc = _stubborn("0.5", "20", "react")
    proc.send_signal(signal.SIGTERM)
    assert _ended(proc, 20)[:2] == (143, "interrupted 143\n")
    proc = _stubborn("0.2", "2", "ignore")
    proc.send_signal(signal.SIGINT)
    code, _, err, seconds = _ended(proc, 20)
    assert code == 130 and "interrupted (forced after 2 s); the note of what was kept" in err and seconds < 10
    proc = _stubborn("30", "60", "ignore")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    code, _, err, seconds = _ended(proc, 20)
    assert code == 130 and "interrupted (forced by a second signal); the note of what was kept" in err
    assert seconds < 5


@pytest.mark.parametrize("where", ["ray"])  # in this process (--local): the next test, at several moments
def test_ctrl_c_stops_training_and_resume_goes_on(tmp_path: Path, where: str) -> None:
    """`ibllm train` on Ray Train stops after Ctrl-C (its workers end with the driver) with exit 130, saying where
    --resume goes on; the run is recorded `stopped`, and --resume continues from its newest checkpoint to the end."""
    cfg = train_config(tmp_path, checkpoint_every_steps=5, epochs=30)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    runs = Runs.of_stage(Workspace(cfg.workspace), 1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "train",
            "--stage",
            "1",
            *([where] if where == "--local" else []),
            "-c",
            str(config),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 120
    while not (runs.run_ids() and runs.latest(runs.run_ids()[-1])):  # its first checkpoint is written
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code, _, err, seconds = _ended(proc, 60)
    (run_id,) = runs.run_ids()
    latest = runs.latest(run_id)
    assert code == 130 and seconds < 30, err[-2000:]
    assert f"stage 1 run {run_id} stopped; `ibllm train --stage 1 --resume` continues from step {latest.step}" in err
    record = json.loads((tmp_path / "ws" / "checkpoints" / "stage1" / run_id / "run.json").read_text())
    assert record["status"] == "stopped" and latest.step < record["job"]["total_steps"]
    done = train.run(cfg, 1, resume=True, local=True)
    assert (done.run_id, done.resumed_from, done.status) == (run_id, latest.step, "complete")


def _train(cfg_file: Path, cwd: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "--stage", "1", "--local", "-c", str(cfg_file), *extra],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_ctrl_c_at_any_moment_keeps_every_checkpoint_whole(tmp_path: Path) -> None:
    """Ctrl-C before the first checkpoint, then again and again while checkpoints are written at every step (the
    race of a signal during a write): each attempt ends 130 within 30 s, the run stays `stopped` and points at a
    whole checkpoint, and each --resume says where it starts and goes on from there to the end."""
    cfg = train_config(tmp_path, checkpoint_every_steps=1, epochs=12)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    runs = Runs.of_stage(Workspace(cfg.workspace), 1)
    proc = _train(config, tmp_path)
    deadline = time.monotonic() + 120
    while not runs.run_ids():  # the run is recorded; its first step is still to come
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    code, _, err, seconds = _ended(proc, 60)
    (run_id,) = runs.run_ids()
    assert code == 130 and seconds < 30, err[-2000:]
    assert runs.record(run_id).status == "stopped"
    reached = runs.latest(run_id).step if runs.latest(run_id) else 0
    kept = "stopped before its first checkpoint;" if reached == 0 else f"continues from step {reached}"
    assert f"stage 1 run {run_id} stopped" in err and kept in err, err[-2000:]
    for delay in (0.1, 0.7):  # at different moments of a step and of its checkpoint's write
        proc = _train(config, tmp_path, "--resume")
        while not (runs.latest(run_id) and runs.latest(run_id).step > reached):
            assert proc.poll() is None and time.monotonic() < deadline + 120, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        code, _, err, seconds = _ended(proc, 60)
        assert code == 130 and seconds < 30, err[-2000:]
        assert f"resuming at step {reached}" in err or (reached == 0 and "no checkpoint yet" in err), err[-2000:]
        latest = runs.latest(run_id)
        assert runs.record(run_id).status == "stopped" and latest.step > reached
        model = Path(latest.path) / "model"
        assert json.loads((model / "config.json").read_text()) and any(model.glob("*.safetensors"))
        assert not list(Path(latest.path).parent.glob("*.tmp*"))  # no half-written step left beside it
        reached = latest.step
    done = train.run(cfg, 1, resume=True, local=True)
    assert (done.run_id, done.resumed_from, done.status) == (run_id, reached, "complete")
