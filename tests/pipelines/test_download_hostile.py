"""Hostile URLs through ingest, curate, download and its retry round: every URL's reason, every stored picture."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import Config, DownloadConfig, SourceConfig
from pipelines.curate import stage as curate
from pipelines.download import stage as download
from pipelines.ingest import stage as ingest
from pipelines.report import stage as report
from stores.catalog import Catalog
from stores.workspace import Workspace
from tests.pipelines.hostile_server import HostileServer, check_picture

IMAGE_SIZE = 64
DEADLINE = 2.5


def write_metadata(path: Path, server: HostileServer) -> None:
    """Every case once, each claiming a plain 640 x 480 picture, and a NaN-scored duplicate of the first."""
    urls = [server.url(c.name) for c in server.cases] + [server.url("jpeg")]
    captions = [f"case {c.name}" for c in server.cases] + ["the unscored duplicate"]
    n = len(urls)
    scores = [0.3] * (n - 1) + [float("nan")]
    table = pa.table({"URL": urls, "TEXT": captions, "similarity": scores, "WIDTH": [640] * n, "HEIGHT": [480] * n})
    pq.write_table(table, path)


def stored_pictures(ws: Workspace, cat: Catalog) -> dict[str, tuple[Image.Image, str]]:
    """url -> (stored picture, stored caption) of every success, read from the committed tar shards."""
    out = {}
    rows = cat.query("SELECT url, output, shard, key FROM downloads WHERE status = 'success'")
    for url, output, shard, key in rows:
        tar = Path(download.shard_folder(ws, output)) / f"{shard}.tar"
        with tarfile.open(tar) as tf:
            data = tf.extractfile(f"{key}.jpg").read()
            caption = tf.extractfile(f"{key}.txt").read().decode()
        out[url] = (Image.open(io.BytesIO(data)), caption)
    return out


@pytest.mark.slow
def test_every_hostile_url_ends_with_its_reason_and_every_picture_is_stored_right(tmp_path: Path) -> None:
    with HostileServer(seed=7) as server:
        (tmp_path / "meta").mkdir()
        write_metadata(tmp_path / "meta" / "part-0.parquet", server)
        source = SourceConfig(
            name="hostile",
            format="laion",
            paths=[str(tmp_path / "meta" / "*.parquet")],
            filters={"max_aspect_ratio": 3.0, "min_width": 40},
        )
        cfg = Config(
            workspace=str(tmp_path / "ws"),
            sources=[source],
            download=DownloadConfig(
                image_size=IMAGE_SIZE,
                processes=1,
                threads=6,
                timeout=1.0,
                deadline=DEADLINE,
                retries=0,
                samples_per_shard=8,
                min_image_size=24,
                allow_private_addresses=["127.0.0.1/32"],
            ),  # the server; 127.0.0.2 stays blocked
        )
        ingest.run(cfg)
        curate.run(cfg)
        first = download.run(cfg).sources[0]
        retry = download.run(cfg, retry_failed=True).sources[0]
        requests = dict(server.requests)
    summary = json.loads(Path(report.run(cfg).summary_json).read_text())
    # Two drips of a byte every 0.25 s (minutes each), in each round, were cut off at the deadline.
    wait_until = time.monotonic() + 10
    while len(server.drips) < 4 and time.monotonic() < wait_until:  # the server notices at its next byte
        time.sleep(0.1)
    assert len(server.drips) == 4 and max(server.drips) < DEADLINE + 10, server.drips
    ws = Workspace(cfg.workspace)
    cat = Catalog(ws)
    by_url = {server.url(c.name): c for c in server.cases}
    assert first.attempted == len(by_url) and not first.failed_shards  # the NaN duplicate lost the dedup
    first_reason = dict(cat.query("SELECT url, reason FROM downloads WHERE round = 0"))
    final = dict(cat.query("SELECT url, reason FROM download_latest"))
    for url, case in by_url.items():
        assert first_reason[url] == (case.first_reason or case.reason), case.name
        assert final[url] == case.reason, case.name
    errors = dict(cat.query("SELECT url, error_message FROM download_latest WHERE reason = 'timeout'"))
    assert all(f"deadline of {DEADLINE:g} s" in e for e in errors.values()) and len(errors) == 2
    # The retry round took only the retryable failures (503 and the drips), each fetched once per round.
    assert (retry.attempted, retry.succeeded) == (3, 1)
    assert requests["flaky"] == 2 and requests["drip_body"] == 2 and requests["jpeg"] == 2  # "moved" lands there
    # The allowed 127.0.0.1 redirected to 127.0.0.2: refused on connecting, in the worker process, and not retried.
    blocked = dict(cat.query("SELECT url, error_message FROM download_latest WHERE reason = 'blocked_address'"))
    assert list(blocked) == [server.url("to_private")] and "127.0.0.2 (loopback)" in blocked[server.url("to_private")]
    assert requests["to_private"] == 1
    pictures = stored_pictures(ws, cat)
    assert set(pictures) == {u for u, c in by_url.items() if c.reason == "success"}
    for url, (img, caption) in pictures.items():
        check_picture(img, by_url[url], IMAGE_SIZE)
        assert caption == f"case {by_url[url].name}"  # the scored row won over its NaN-scored duplicate

    # The report: examples per reason with their errors, the rounds, what the retry rescued and what still fails.
    examples = {(r["reason"], r["url"]): r for r in summary["failure_examples"]}
    drip = examples[("timeout", server.url("drip_body"))]
    assert f"deadline of {DEADLINE:g} s" in drip["error"] and (drip["attempts"], drip["final"]) == (2, "timeout")
    assert examples[("http_503", server.url("flaky"))]["final"] == "rescued in round 1"
    assert examples[("aspect_ratio", server.url("wide"))]["error"] == "aspect ratio too large"
    assert {reason for reason, _ in examples} == {c.first_reason or c.reason for c in server.cases} - {"success"}
    rounds = [(r["round"], r["attempted"], r["succeeded"]) for r in summary["retry_rounds"]]
    assert rounds == [(0, len(by_url), first.succeeded), (1, 3, 1)]
    retries = {r["first_reason"]: r for r in summary["retries_by_reason"]}
    assert {k: retries["http_503"][k] for k in ("failed", "retried", "rescued", "still_failing")} == {
        "failed": 1,
        "retried": 1,
        "rescued": 1,
        "still_failing": 0,
    }
    assert (retries["timeout"]["still_failing"], retries["timeout"]["failing_now_as"]) == (2, "timeout")
    assert retries["http_404"]["retried"] == 0
    final_rows = {r["reason"]: r for r in summary["download_reasons"]}
    assert (final_rows["timeout"]["samples"], final_rows["timeout"]["retried"]) == (2, 2)
