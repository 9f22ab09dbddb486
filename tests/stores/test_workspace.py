"""Workspace paths and file access on a local folder and on S3."""

from __future__ import annotations

import posixpath
from pathlib import Path

import boto3

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


def test_files_another_process_writes_are_seen(s3_workspace: Workspace) -> None:
    """Ray workers and img2dataset write through their own clients: a listing this one cached must not hide them."""
    ws = s3_workspace
    folder = ws.shards("src")
    first, second = posixpath.join(folder, "00000_stats.json"), posixpath.join(folder, "00001_stats.json")
    ws.write_bytes(first, b"{}")
    assert ws.glob(posixpath.join(folder, "*_stats.json")) == [first]  # listed (with a listings cache: remembered)
    other = boto3.client("s3", endpoint_url=ws.storage_options["client_kwargs"]["endpoint_url"])
    bucket, _, key = second.partition("/")
    other.put_object(Bucket=bucket, Key=key, Body=b"{}")
    assert ws.glob(posixpath.join(folder, "*_stats.json")) == [first, second]
    assert ws.exists(second)


def test_source_files_on_the_workspace_storage_use_its_options(s3_workspace: Workspace) -> None:
    """A metadata file beside the workspace on the same S3 endpoint is opened with the workspace's endpoint."""
    ws = s3_workspace
    assert ws.options_for("s3://elsewhere/x.parquet") == dict(ws.storage_options)
    assert ws.options_for("/data/x.parquet") == {} and ws.options_for("gs://b/x") == {}
    assert Workspace("/tmp/ws").options_for("s3://b/x") == {}
