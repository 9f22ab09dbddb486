"""The curation report: generated, its figures are real images, its numbers agree with the catalog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines import curate, download, ingest, report, synthetic
from pipelines.config import Config, SourceConfig
from pipelines.synthetic_server import server_for, serving
from stores.catalog import Catalog
from stores.workspace import Workspace


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory) -> Config:
    cfg = Config.from_yaml(None, [f"workspace={tmp_path_factory.mktemp('report') / 'ws'}"])
    cfg.synthetic = cfg.synthetic.model_copy(update={"count": 40, "slow_seconds": 2.0, "audio_clips": 0})
    cfg.sources = [SourceConfig(name="synthetic", format="synthetic", filters={"min_similarity": 0.27})]
    cfg.download = cfg.download.model_copy(update={"timeout": 1.0, "processes": 1, "samples_per_shard": 16})
    with server_for(cfg) as server:
        synthetic.run(cfg, server.base_url, check=False)
    ingest.run(cfg)
    curate.run(cfg)
    with serving(cfg):
        download.run(cfg)
    return cfg


def test_report_numbers_agree_with_the_catalog(downloaded: Config) -> None:
    result = report.run(downloaded)
    ws = Workspace(downloaded.workspace)
    cat = Catalog(ws)
    summary = json.loads(Path(result.summary_json).read_text())
    (tot,) = summary["totals"]
    assert tot["metadata_rows"] == 40 == cat.query("SELECT count(*) FROM metadata")[0][0]
    assert tot["curated_rows"] == cat.query("SELECT count(*) FROM curated")[0][0]
    assert tot["downloaded"] == cat.query("SELECT count(*) FROM download_latest WHERE status = 'success'")[0][0] > 0
    assert summary["funnel"] == [r.model_dump() for r in curate.run(downloaded).sources[0].funnel]
    assert sum(r["samples"] for r in summary["download_reasons"]) == tot["attempted"] == tot["curated_rows"]
    assert sum(s["attempted"] for s in summary["shards"]) == tot["attempted"]
    clip = summary["histograms"]["clip_score"]
    assert sum(clip["before"]["counts"]["synthetic"]) == 40
    assert sum(clip["after"]["counts"]["synthetic"]) == tot["curated_rows"]
    page = Path(result.html).read_text()
    for section in ("Funnel", "Download outcomes", "CLIP score", "Caption length", "Downloaded images", "Shards"):
        assert f"<h2>{section}" in page
    assert "min_similarity" in page
    # every download outcome the catalog counts is on the page (which failures occur depends on timing: a 404 queued
    # behind the synthetic server's slow responses can time out on a loaded machine)
    assert any(r["reason"] != "success" for r in summary["download_reasons"])
    assert all(f"<td>{r['reason']}</td>" in page for r in summary["download_reasons"])
    assert "<td>yes</td>" in page and "<td>no</td>" in page  # retryable, in words
    for fig in result.figures:
        with Image.open(fig) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 150
            assert len(img.getcolors(1 << 20) or []) > 4  # a real plot, not a blank page
    assert (Path(downloaded.workspace) / "catalog.duckdb").is_file()
