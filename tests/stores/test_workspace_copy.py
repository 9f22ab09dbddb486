"""A copied or moved workspace reads and deletes only its own files, for new records and an older ibllm's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stores.ledger import Ledger
from stores.workspace import OutsideWorkspace, Workspace

SETTINGS = {"image_size": 64}


def commit(ws: Workspace, sid: str, payload: bytes, settings: dict = SETTINGS) -> str:
    ledger = Ledger(ws, "download", "src", settings)
    final = ws.shards("src", f"{sid}.tar")
    with ledger.shard(sid) as shard:
        ws.write_bytes(shard.path(final), payload)
        shard.rows = 1
    return final


def test_records_are_relative_and_a_copy_reads_its_own_files(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "a"))
    commit(ws, "00000", b"tar")
    record = json.loads(Path(ws.ledger("download", "src", "shards", "00000.json")).read_text())
    assert record["relative"] and record["path"] == "shards/src/00000.tar"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = Workspace(str(tmp_path / "b"))
    (rec,) = Ledger.reader(copy, "download", "src").committed().values()
    assert rec.path == str(tmp_path / "b" / "shards" / "src" / "00000.tar")
    Ledger(copy, "download", "src", {"image_size": 128}, force=True)  # --force in the copy
    assert (tmp_path / "a" / "shards" / "src" / "00000.tar").read_bytes() == b"tar"  # the original is untouched
    assert not (tmp_path / "b" / "shards" / "src" / "00000.tar").exists()


def _make_legacy(ws: Workspace) -> None:
    """Rewrite the records as an older ibllm wrote them: full paths, no `relative` flag."""
    for path in Path(ws.ledger("download", "src", "shards")).glob("*.json"):
        body = json.loads(path.read_text())
        body["files"] = [f | {"path": ws.path(f["path"])} for f in body["files"]]
        body["path"] = ws.path(body["path"])
        body.pop("relative")
        path.write_text(json.dumps(body))


def test_an_older_workspace_is_read_in_place_and_found_again_when_copied(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "shards"))  # a root that itself contains a layout folder name
    commit(ws, "00000", b"tar")
    _make_legacy(ws)
    assert Ledger.reader(ws, "download", "src").files(".tar") == [ws.shards("src", "00000.tar")]
    shutil.copytree(tmp_path / "shards", tmp_path / "moved")
    copy = Workspace(str(tmp_path / "moved"))
    assert Ledger.reader(copy, "download", "src").files(".tar") == [copy.shards("src", "00000.tar")]
    # a copy that lacks the file: refused, never read from the original, and --force deletes nothing there
    (tmp_path / "moved" / "shards" / "src" / "00000.tar").unlink()
    with pytest.raises(OutsideWorkspace, match=r"outside the workspace .* --force"):
        Ledger.reader(copy, "download", "src").committed()
    Ledger(copy, "download", "src", {"image_size": 128}, force=True)
    assert (tmp_path / "shards" / "shards" / "src" / "00000.tar").read_bytes() == b"tar"
    assert Ledger.reader(copy, "download", "src").committed() == {}


def test_paths_outside_the_workspace_are_refused(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "ws"))
    assert ws.relative(ws.path("shards", "x.tar")) == "shards/x.tar"
    for outside in (str(tmp_path / "other" / "x.tar"), ws.path("..", "x.tar"), ws.base):
        with pytest.raises(OutsideWorkspace):
            ws.relative(outside)
    for recorded in ("../x.tar", "shards/../../x.tar", "/etc/passwd", "file:///etc/passwd"):
        with pytest.raises(OutsideWorkspace):
            ws.inside(recorded)
    with pytest.raises(OutsideWorkspace):
        ws.resolve_legacy("/etc/passwd")
