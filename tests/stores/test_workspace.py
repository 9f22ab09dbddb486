"""Workspace paths and file access on a local folder and on S3."""

from __future__ import annotations

from pathlib import Path

from stores.workspace import Workspace


def test_layout_paths(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "run"))
    base = str(tmp_path / "run")
    assert ws.shards("laion", "00000.tar") == f"{base}/shards/laion/00000.tar"
    assert (
        ws.features("huge-1a2b", "cc3m", "part-00000.parquet") == f"{base}/features/huge-1a2b/cc3m/part-00000.parquet"
    )
    assert ws.index("cache") == f"{base}/index/cache"
    assert ws.checkpoints("stage1", "r1") == f"{base}/checkpoints/stage1/r1"
    assert ws.url("sources", "x") == f"{base}/sources/x" and ws.is_local


def test_read_write_glob_rename(workspace: Workspace) -> None:
    a, b = workspace.curated("src", "a.parquet"), workspace.curated("src", "b.parquet")
    workspace.write_bytes(a, b"payload")
    assert workspace.exists(a) and workspace.read_bytes(a) == b"payload"
    workspace.rename(a, b)
    assert not workspace.exists(a) and workspace.glob(workspace.curated("src", "*.parquet")) == [b]
    workspace.remove(b)
    workspace.remove(b)  # removing what is gone is fine
    assert workspace.glob(workspace.curated("src", "*")) == []


def test_s3_urls(s3_workspace: Workspace) -> None:
    assert s3_workspace.url("index", "cache").startswith("s3://ibllm-")
    assert s3_workspace.url("index", "cache").endswith("/run/index/cache")
    assert not s3_workspace.is_local
