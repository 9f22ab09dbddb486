"""Leases: a live run's lease refuses a second run; a dead or silent holder's lease is taken over."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from stores.lease import LeaseHeld, lease, lease_path
from stores.ledger import Ledger
from stores.workspace import Workspace


def test_a_held_lease_refuses_a_second_run_and_is_released(workspace: Workspace) -> None:
    with lease(workspace, "download", "laion") as held:
        body = json.loads(workspace.read_bytes(held.path))
        assert {"owner", "host", "pid", "heartbeat", "command", "started_at"} <= set(body)
        refused = r"download output 'laion' is being written by another run \(pid \d+"
        with pytest.raises(LeaseHeld, match=refused), lease(workspace, "download", "laion"):
            pass
        with lease(workspace, "download", "coco"):  # another output is free
            pass
    assert not workspace.exists(lease_path(workspace, "download", "laion"))
    with lease(workspace, "download", "laion"):  # free again
        pass


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path) -> None:
    ws = Workspace(str(tmp_path / "ws"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    with lease(ws, "extract", "enc.src") as held:
        body = json.loads(ws.read_bytes(held.path))
    ws.write_bytes(held.path, json.dumps(body | {"pid": pid, "token": "old"}).encode())  # as if killed -9
    with lease(ws, "extract", "enc.src") as taken:
        assert json.loads(ws.read_bytes(taken.path))["pid"] != pid


def test_a_silent_lease_goes_stale_and_a_live_one_keeps_beating(workspace: Workspace) -> None:
    path = lease_path(workspace, "index", "cc3m")
    other = {
        "stage": "index",
        "output": "cc3m",
        "token": "x",
        "host": "elsewhere",
        "pid": 1,
        "heartbeat": time.time() - 10,
    }
    workspace.write_bytes(path, json.dumps(other).encode())
    with pytest.raises(LeaseHeld, match="elsewhere"), lease(workspace, "index", "cc3m", stale_seconds=60):
        pass
    with lease(workspace, "index", "cc3m", stale_seconds=5) as held:  # 10 s without a heartbeat: stale
        first = json.loads(workspace.read_bytes(path))["heartbeat"]
        time.sleep(2.0)  # a beat every 5/4 s
        assert json.loads(workspace.read_bytes(path))["heartbeat"] > first
        assert not held.lost


def test_the_ledger_opens_for_writing_under_the_lease(tmp_path) -> None:
    ws = Workspace(str(tmp_path / "ws"))
    with Ledger.writing(ws, "curate", "laion", {"k": 1}) as ledger:
        assert ws.exists(lease_path(ws, "curate", "laion"))
        with pytest.raises(LeaseHeld), Ledger.writing(ws, "curate", "laion", {"k": 2}, force=True):
            pass
        assert ledger.settings == {"k": 1}  # the refused run changed nothing
    assert not ws.exists(lease_path(ws, "curate", "laion"))
