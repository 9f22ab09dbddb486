"""Failure reasons from img2dataset's messages, and which are retryable."""

from __future__ import annotations

import duckdb
import pytest

from stores.catalog import REASON_SQL, RETRYABLE_SQL, retry_round

MESSAGES = [
    ("success", None, "success", False),
    ("failed_to_download", "HTTP Error 404: Not Found", "http_404", False),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_503", True),
    ("failed_to_download", "HTTP Error 429: Too Many Requests", "http_429", True),
    (
        "failed_to_download",
        "HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite "
        "loop.\nThe last 30x error message was:\nFound",
        "redirect_loop",
        False,
    ),
    ("failed_to_download", "timed out", "timeout", True),
    ("failed_to_download", "The read operation timed out", "timeout", True),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection", True),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "connection", True),
    ("failed_to_download", "Remote end closed connection without response", "connection", True),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "opt_out", False),
    ("failed_to_resize", "Image decoding error", "decode", False),
    ("failed_to_resize", "image too small", "too_small", False),
    ("failed_to_resize", "image area too large", "too_large", False),
    ("failed_to_resize", "aspect ratio too large", "aspect_ratio", False),
    ("failed_to_resize", "cannot decode image: image file is truncated (2 bytes not processed)", "decode", False),
    ("failed_to_resize", "cannot decode image: broken data stream when reading image file", "decode", False),
    ("failed_to_resize", "cannot decode image: [Errno 22] connection timed out", "decode", False),
    ("failed_to_download", "timed out: no complete answer within the download deadline of 6 s", "timeout", True),
    ("failed_to_download", "response too large: over 134217728 bytes", "too_large", False),
    ("failed_to_download", "hash mismatch", "hash_mismatch", False),
    (
        "failed_to_download",
        "blocked address: localhost -> 127.0.0.1 (loopback): not a public address (see "
        "download.allow_private_addresses)",
        "blocked_address",
        False,
    ),
    (
        "failed_to_download",
        "blocked address: the URL scheme 'ftp' is not fetched (only http and https)",
        "blocked_address",
        False,
    ),
    (
        "failed_to_download",
        "HTTP Error 302: Found - Redirection to url 'file:///etc/passwd' is not allowed",
        "blocked_address",
        False,
    ),
    ("failed_to_download", "something new", "other", False),
]


@pytest.mark.parametrize(("status", "message", "reason", "retryable"), MESSAGES)
def test_reason_and_retryable(status: str, message: str | None, reason: str, retryable: bool) -> None:
    got = duckdb.execute(
        f"SELECT reason, {RETRYABLE_SQL} FROM (SELECT {REASON_SQL} AS reason FROM "
        "(SELECT $s AS status, $m AS error_message))",
        {"s": status, "m": message},
    ).fetchall()[0]
    assert got == (reason, retryable)


def test_retry_round_names() -> None:
    assert retry_round("laion") == 0 and retry_round("laion.retry-03") == 3


def test_every_view_exists_on_an_empty_workspace(tmp_path) -> None:
    from stores.catalog import Catalog
    from stores.workspace import Workspace

    cat = Catalog(Workspace(str(tmp_path)))
    for view in ("metadata", "curated", "funnel", "features", "feature_failures", "downloads", "download_latest"):
        assert cat.query(f"SELECT count(*) FROM {view}") == [(0,)]
    assert cat.feature_counts() == [] and cat.clip_thresholds([0.2]) == []


def test_the_saved_catalog_works_in_a_moved_workspace(tmp_path, monkeypatch) -> None:
    import os
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from stores.catalog import Catalog
    from stores.ledger import Ledger
    from stores.workspace import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    ledger = Ledger(ws, "ingest", "s", {"format": "generic"})
    with ws.scratch() as scratch, ledger.shard("00000") as pending:
        part = os.path.join(scratch, "part.parquet")
        pq.write_table(pa.table({"uid": ["a", "b"], "source": ["s", "s"], "url": ["http://x/a", "http://x/b"]}), part)
        pending.put(part, ws.sources("s", "00000.parquet"))
        pending.rows = 2
    saved = Catalog(ws).save()
    shutil.move(tmp_path / "ws", tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    con = duckdb.connect(os.path.join(tmp_path / "moved", os.path.basename(saved)), read_only=True)
    assert con.execute("SELECT count(*) FROM metadata").fetchall() == [(2,)]
