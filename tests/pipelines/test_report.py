"""The curation report: generated, its figures are real images, its numbers agree with the catalog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines.config import Config, SourceConfig
from pipelines.curate import stage as curate
from pipelines.demo import synthetic
from pipelines.demo.synthetic_server import server_for, serving
from pipelines.download import stage as download
from pipelines.ingest import stage as ingest
from pipelines.report import stage as report
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
    for label, rows in (("before", 40), ("after", tot["curated_rows"])):  # in range or in an overflow bin
        hist = clip[label]
        assert sum(hist["counts"]["synthetic"]) + hist["below"]["synthetic"] + hist["above"]["synthetic"] == rows
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


def test_empty_sections_say_so_in_one_line_and_outliers_get_labelled_overflow_bins(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.report.figures import plot_histogram

    rng = np.random.default_rng(0)
    scores = [*np.round(rng.normal(0.3, 0.02, 60), 4), 7.5, -3.0, float("nan")]  # two wild scores and a NaN
    words = [" ".join(["word"] * int(n)) for n in rng.integers(4, 12, len(scores))]
    words[0] = " ".join(["long"] * 300)  # one caption far longer than the rest
    (tmp_path / "m").mkdir()
    urls = [f"http://h/{i}.jpg" for i in range(len(scores))]
    pq.write_table(pa.table({"URL": urls, "TEXT": words, "similarity": scores}), tmp_path / "m" / "p.parquet")
    cfg = Config(
        workspace=str(tmp_path / "ws"),
        sources=[SourceConfig(name="m", format="laion", paths=[str(tmp_path / "m" / "*")])],
    )
    ingest.run(cfg)
    curate.run(cfg)
    result = report.run(cfg)
    summary = json.loads(Path(result.summary_json).read_text())
    clip = summary["histograms"]["clip_score"]["before"]
    assert (clip["below"]["m"], clip["above"]["m"]) == (1, 1)  # not clamped into the edge bins
    assert sum(clip["counts"]["m"]) == 60 and clip["edges"][0] > -3.0 and clip["edges"][-1] < 1.0
    caption = summary["histograms"]["caption_words"]["before"]
    assert caption["above"]["m"] == 1 and sum(caption["counts"]["m"]) == len(scores) - 1
    page = Path(result.html).read_text()
    # Nothing was downloaded or extracted: each such section is its heading and one line, with no figure.
    for title in (
        "Download outcomes",
        "Failed URLs, examples per reason",
        "Retry rounds",
        "Shards",
        "Downloaded images: short side",
        "Downloaded images: aspect ratio",
        "Features",
    ):
        after = page.split(f"<h2>{title}</h2>\n", 1)[1]
        assert after.startswith('<p class="empty">Nothing') or after.startswith('<p class="empty">No '), title
        assert after.split("\n", 2)[1].startswith(("<h", "</body>")), title  # then the next heading
    assert sorted(Path(f).name for f in result.figures) == ["caption_words.png", "clip_score.png", "funnel.png"]
    # The overflow bins are drawn and labelled: the figure differs from one without them.
    plain = {**summary["histograms"]["clip_score"], "before": {**clip, "below": {}, "above": {}}}
    plot_histogram(str(tmp_path / "plain.png"), "clip score", plain)
    with Image.open(result.figures[1]) as drawn, Image.open(tmp_path / "plain.png") as without:
        assert Path(result.figures[1]).name == "clip_score.png"
        assert drawn.tobytes() != without.tobytes()
