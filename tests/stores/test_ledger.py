"""The shard ledger on a local folder and on S3: commits, crashes, reruns and settings conflicts."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stores.ledger import Ledger, LedgerConflict, settings_hash
from stores.workspace import Workspace

SETTINGS = {"image_size": 256, "resize_mode": "keep_ratio"}


def write_shard(ledger: Ledger, ws: Workspace, shard_id: str, payload: bytes) -> str:
    final = ws.shards("demo", f"{shard_id}.tar")
    with ledger.shard(shard_id) as shard:
        ws.write_bytes(shard.path(final), payload)
        shard.rows = len(payload)
    return final


def test_commit_writes_file_and_record(workspace: Workspace) -> None:
    ledger = Ledger(workspace, "download", "demo", SETTINGS)
    final = write_shard(ledger, workspace, "00000", b"hello")
    rec = ledger.committed()["00000"]
    assert rec.path == final and rec.rows == 5
    assert rec.checksum == hashlib.sha256(b"hello").hexdigest()
    assert rec.config_hash == settings_hash(SETTINGS)
    assert workspace.read_bytes(final) == b"hello"
    assert not workspace.glob(final + ".tmp-*")
    assert ledger.is_committed("00000") and not ledger.is_committed("00001")


def test_exception_leaves_nothing_visible_and_records_the_failure(workspace: Workspace) -> None:
    ledger = Ledger(workspace, "download", "demo", SETTINGS)
    final = workspace.shards("demo", "00000.tar")
    with pytest.raises(RuntimeError, match="boom"), ledger.shard("00000") as shard:
        workspace.write_bytes(shard.path(final), b"partial")
        raise RuntimeError("boom")
    assert not workspace.exists(final)
    assert not workspace.glob(final + "*")
    assert ledger.committed() == {}
    assert ledger.failures()["00000"].error == "RuntimeError: boom"
    write_shard(ledger, workspace, "00000", b"ok")  # a rerun clears the failure
    assert ledger.failures() == {}


def test_rerun_skips_committed_and_redoes_the_rest(workspace: Workspace) -> None:
    ledger = Ledger(workspace, "download", "demo", SETTINGS)
    for sid in ("00000", "00002"):
        write_shard(ledger, workspace, sid, sid.encode())
    again = Ledger(workspace, "download", "demo", SETTINGS)
    todo = again.pending(["00000", "00001", "00002", "00003"])
    assert todo == ["00001", "00003"]
    for sid in todo:
        write_shard(again, workspace, sid, sid.encode())
    assert sorted(again.committed()) == ["00000", "00001", "00002", "00003"]


def test_changed_settings_are_refused_then_forced(workspace: Workspace) -> None:
    ledger = Ledger(workspace, "download", "demo", SETTINGS)
    final = write_shard(ledger, workspace, "00000", b"x")
    changed = {**SETTINGS, "image_size": 384}
    with pytest.raises(LedgerConflict) as e:
        Ledger(workspace, "download", "demo", changed)
    msg = str(e.value)
    assert "image_size: 256 -> 384" in msg and "--force" in msg and "1 committed shard" in msg
    assert workspace.exists(final)  # nothing was touched by the refusal
    forced = Ledger(workspace, "download", "demo", changed, force=True)
    assert forced.committed() == {} and not workspace.exists(final)
    assert Ledger(workspace, "download", "demo", changed).committed() == {}  # the new settings stick


def test_other_encoder_is_a_conflict(workspace: Workspace) -> None:
    ledger = Ledger(workspace, "extract", "demo", SETTINGS, encoder_id="tiny-abc")
    write_shard(ledger, workspace, "00000", b"x")
    with pytest.raises(LedgerConflict, match="encoder_id: 'tiny-abc' -> 'huge-def'"):
        Ledger(workspace, "extract", "demo", SETTINGS, encoder_id="huge-def")


def test_other_outputs_are_independent(workspace: Workspace) -> None:
    write_shard(Ledger(workspace, "download", "a", SETTINGS), workspace, "00000", b"x")
    other = Ledger(workspace, "download", "b", {**SETTINGS, "image_size": 1})
    assert other.committed() == {}


def test_multi_file_shard(workspace: Workspace) -> None:
    ledger = Ledger(workspace, "download", "demo", SETTINGS)
    tar, meta = workspace.shards("demo", "00000.tar"), workspace.shards("demo", "00000.parquet")
    with ledger.shard("00000") as shard:
        workspace.write_bytes(shard.path(tar), b"tar")
        workspace.write_bytes(shard.path(meta), b"meta")
    rec = ledger.committed()["00000"]
    assert [f.path for f in rec.files] == [tar, meta] and rec.path == tar


@pytest.mark.parametrize("bad", ["../x", "", "a/b", ".hidden"])
def test_bad_names_are_refused(tmp_path: Path, bad: str) -> None:
    ws = Workspace(str(tmp_path))
    with pytest.raises(ValueError, match="must match"):
        Ledger(ws, "download", bad, SETTINGS)
    ledger = Ledger(ws, "download", "ok", SETTINGS)
    with pytest.raises(ValueError, match="must match"), ledger.shard(bad):
        pass


def test_shard_without_files_is_an_error(tmp_path: Path) -> None:
    ledger = Ledger(Workspace(str(tmp_path)), "download", "demo", SETTINGS)
    with pytest.raises(ValueError, match="wrote no file"), ledger.shard("00000"):
        pass
    assert ledger.committed() == {}


CRASH = textwrap.dedent(
    """
    import os, sys
    from stores.ledger import Ledger
    from stores.workspace import Workspace

    ws = Workspace(sys.argv[1])
    ledger = Ledger(ws, "download", "demo", {"image_size": 256, "resize_mode": "keep_ratio"})
    where = sys.argv[2]
    if where == "before-record":  # die after the rename, before the record: the commit point is the record
        write_json = ledger._write_json
        def dying(path, body):
            if "/shards/" in path:
                os._exit(9)
            write_json(path, body)
        ledger._write_json = dying
    with ledger.shard("00001") as shard:
        ws.write_bytes(shard.path(ws.shards("demo", "00001.tar")), b"half")
        if where == "while-writing":
            os._exit(9)
    """
)


@pytest.mark.parametrize("where", ["while-writing", "before-record"])
def test_killed_process_leaves_no_visible_shard(tmp_path: Path, where: str) -> None:
    ws = Workspace(str(tmp_path / "ws"))
    ledger = Ledger(ws, "download", "demo", SETTINGS)
    write_shard(ledger, ws, "00000", b"done")
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path / "ws"), where], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    again = Ledger(ws, "download", "demo", SETTINGS)
    assert sorted(again.committed()) == ["00000"]
    assert again.pending(["00000", "00001"]) == ["00001"]
    final = write_shard(again, ws, "00001", b"whole")
    assert ws.read_bytes(final) == b"whole"
    assert not ws.glob(final + ".tmp-*")  # the stale temporary was cleared by the rerun
