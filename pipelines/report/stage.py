"""Report: the curation report (funnel, download outcomes, retries, histograms) as HTML, PNG figures, summary.json."""

from __future__ import annotations

import html
import json
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from pipelines.config import Config
from pipelines.report.figures import has_data, plot_funnel, plot_histogram, plot_outcomes
from stores import outcomes
from stores.catalog import Catalog
from stores.curation import ASPECT, WORDS
from stores.workspace import Workspace

SHORT_SIDE = "least(original_width, original_height)"
DOWNLOADED = "(SELECT * FROM download_latest WHERE status = 'success')"
CLIP_THRESHOLDS = [0.1, 0.15, 0.2, 0.25, 0.28, 0.3, 0.35]
DOWNLOADED_ASPECT = ASPECT.replace("width", "original_width").replace("height", "original_height")
EXAMPLES_PER_REASON = 5
ERROR_CHARS = 240  # of an error message in the examples table


class ReportResult(BaseModel):
    """What the report stage produced."""

    html: str
    summary_json: str
    figures: list[str]
    totals: list[dict[str, Any]]
    seconds: float

    def summary(self) -> str:
        """Human lines."""
        lines = [f"report: {self.html}"]
        for t in self.totals:
            lines.append(
                f"{t['source']}: {t['metadata_rows']} rows -> {t['curated_rows']} curated -> "
                f"{t['downloaded']}/{t['attempted']} downloaded"
            )
        return "\n".join(lines)


def _robust_range(cat: Catalog, view: str, expr: str, lo: float | None) -> tuple[float, float] | None:
    """A histogram's range: a few wild values fall outside it, into the overflow bins, instead of squashing the rest.

    Tukey's far-out fences (quartiles -/+ 3 x the interquartile range; `lo` when given), within the data's
    extremes; None when there is no finite value.
    """
    sql = (
        f"SELECT min(v), quantile_cont(v, 0.25), quantile_cont(v, 0.75), max(v) FROM "
        f"(SELECT ({expr})::DOUBLE AS v FROM {view}) WHERE v IS NOT NULL AND isfinite(v)"
    )
    low, q1, q3, high = cat.query(sql)[0]
    if low is None:
        return None
    start = lo if lo is not None else max(low, q1 - 3 * (q3 - q1))
    end = min(high, q3 + 3 * (q3 - q1))
    return (start, end) if end > start else (start, start + 1.0)


def histograms(cat: Catalog) -> dict[str, dict[str, Any]]:
    """Before/after histograms of CLIP score and caption words, and of downloaded image sizes and aspect ratios."""
    score = _robust_range(cat, "metadata", "similarity", None) or (0.0, 1.0)
    words = round((_robust_range(cat, "metadata", WORDS, 0.0) or (0, 32))[1]) + 1
    side = _robust_range(cat, DOWNLOADED, SHORT_SIDE, 0.0) or (0.0, 512.0)
    return {
        "clip_score": {
            "before": cat.histogram("metadata", "similarity", *score, 40),
            "after": cat.histogram("curated", "similarity", *score, 40),
            "xlabel": "CLIP score (similarity)",
        },
        "caption_words": {
            "before": cat.histogram("metadata", WORDS, 0, words, words),
            "after": cat.histogram("curated", WORDS, 0, words, words),
            "xlabel": "caption length (words)",
        },
        "image_short_side": {
            "after": cat.histogram(DOWNLOADED, SHORT_SIDE, *side, 32),
            "xlabel": "downloaded image: original short side (px)",
        },
        "image_aspect": {
            "after": cat.histogram(DOWNLOADED, DOWNLOADED_ASPECT, 1.0, 5.0, 32),
            "xlabel": "downloaded image: aspect ratio (long / short)",
        },
        "feature_clip_score": {
            "after": cat.histogram("features", "clip_score", -1.0, 1.0, 80),
            "xlabel": "ImageBind clip_score (cosine)",
        },
    }


def _cell(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return ""
    text = f"{v:,}" if isinstance(v, int) else str(v)
    if key == "error":
        text = text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + "..."
    escaped = html.escape(text)
    if key == "url" and re.match(r"^https?://", text):  # never a link to another scheme
        return f'<a href="{escaped}" rel="nofollow noopener noreferrer">{escaped}</a>'
    return escaped


def _table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(k, v)}</td>" for k, v in r.items()) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Page:
    """The report's sections in order, and the figures to draw for those that have data."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.figures: dict[str, Callable[[str], None]] = {}

    def section(
        self,
        title: str,
        empty: str,
        rows: list[dict[str, Any]] | None = None,
        level: int = 2,
        figure: tuple[str, Callable[[str], None]] | None = None,
        note: str = "",
    ) -> None:
        """A heading, then the figure and the table, or one line (`empty`) when there is no data."""
        self.parts.append(f"<h{level}>{html.escape(title)}</h{level}>")
        if not rows and figure is None:
            self.parts.append(f'<p class="empty">{html.escape(empty)}</p>')
            return
        if note:
            self.parts.append(f'<p class="meta">{html.escape(note)}</p>')
        if figure is not None:
            name, draw = figure
            self.figures[name] = draw
            self.parts.append(f'<img src="{name}" alt="{html.escape(title)}">')
        if rows:
            self.parts.append(_table(rows))

    def histogram(self, title: str, empty: str, name: str, spec: dict[str, Any]) -> None:
        """A histogram section: its figure when any value was counted."""
        figure = (f"{name}.png", lambda path: plot_histogram(path, name.replace("_", " "), spec))
        self.section(title, empty, figure=figure if has_data(spec) else None)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ibllm curation report {stamp}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 980px; color: #222; }}
 table {{ border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: 14px; }}
 th, td {{ border: 1px solid #ccc; padding: 3px 10px; text-align: right; }}
 th {{ background: #eef2f6; }} td:first-child, th:first-child {{ text-align: left; }}
 td a {{ word-break: break-all; }}
 img {{ max-width: 100%; border: 1px solid #ddd; margin: .5rem 0 1rem; }}
 .meta, .empty {{ color: #666; font-size: 13px; }}
</style></head><body>
<h1>Curation report</h1>
<p class="meta">workspace {workspace} &middot; generated {stamp}</p>
{body}
</body></html>
"""

NOT_INGESTED = "No source has been ingested yet (ibllm ingest)."
NOT_CURATED = "No source has been curated yet (ibllm curate)."
NOT_DOWNLOADED = "Nothing has been downloaded yet (ibllm download)."
NOT_EXTRACTED = "No features have been extracted yet (ibllm extract)."


def build(cat: Catalog, examples: int) -> tuple[Page, dict[str, Any]]:
    """Every section of the report from the catalog, and the same numbers for summary.json."""
    data: dict[str, Any] = {
        "totals": cat.totals(),
        "funnel": cat.funnel(),
        "download_reasons": cat.download_reasons(),
        "failure_examples": outcomes.failure_examples(cat, examples),
        "retry_rounds": outcomes.retry_rounds(cat),
        "retries_by_reason": outcomes.retries_by_reason(cat),
        "shards": cat.shard_counts(),
        "features": cat.feature_counts(),
        "clip_thresholds": cat.clip_thresholds(CLIP_THRESHOLDS),
        "feature_failures": cat.feature_failure_reasons(),
        "histograms": histograms(cat),
    }
    data["duplicates_removed"] = [r for r in data["funnel"] if r["step"].startswith("dedup")]
    funnel, reasons, hists = data["funnel"], data["download_reasons"], data["histograms"]
    page = Page()
    page.section("Totals", NOT_INGESTED, data["totals"])
    page.section(
        "Funnel", NOT_CURATED, funnel, figure=("funnel.png", lambda p: plot_funnel(p, funnel)) if funnel else None
    )
    page.section(
        "Download outcomes",
        NOT_DOWNLOADED,
        reasons,
        figure=("download_reasons.png", lambda p: plot_outcomes(p, reasons)) if reasons else None,
        note="The last attempt of every sample. retryable: `--retry-failed` would try it again; retried: samples "
        "that went through a retry round already.",
    )
    page.section(
        "Failed URLs, examples per reason",
        "No download failed." if reasons else NOT_DOWNLOADED,
        data["failure_examples"],
        note=f"Up to {examples} samples per source and reason (of any attempt), with the error text, the attempts "
        "made and how the sample ended.",
    )
    retried = any(r["round"] > 0 for r in data["retry_rounds"])
    waiting = sum(r["samples"] for r in reasons if r["retryable"])
    no_round = (
        f"No retry round yet: `ibllm download --retry-failed` would retry {waiting:,} sample(s)."
        if waiting
        else "No retry round: no sample failed for a retryable reason."
    )
    page.section(
        "Retry rounds",
        no_round if reasons else NOT_DOWNLOADED,
        data["retry_rounds"] if retried else None,
        note="Round 0 is the first download.",
    )
    if retried:
        page.section("Retries per reason of the first failure", "", data["retries_by_reason"], level=3)
    page.histogram(
        "CLIP score, before and after filtering", "No CLIP scores in the metadata.", "clip_score", hists["clip_score"]
    )
    page.histogram("Caption length, before and after filtering", NOT_INGESTED, "caption_words", hists["caption_words"])
    page.histogram("Downloaded images: short side", NOT_DOWNLOADED, "image_short_side", hists["image_short_side"])
    page.histogram("Downloaded images: aspect ratio", NOT_DOWNLOADED, "image_aspect", hists["image_aspect"])
    spec = hists["feature_clip_score"]
    figure = ("feature_clip_score.png", lambda p: plot_histogram(p, "feature clip score", spec))
    page.section("Features", NOT_EXTRACTED, data["features"], figure=figure if has_data(spec) else None)
    page.section(
        "Pairs kept by a clip_score threshold (the post-extraction CLIP filter)",
        NOT_EXTRACTED,
        data["clip_thresholds"],
        level=3,
    )
    page.section(
        "Samples that could not be featurised",
        "None." if data["features"] else NOT_EXTRACTED,
        data["feature_failures"],
        level=3,
    )
    page.section("Duplicates removed", NOT_CURATED, data["duplicates_removed"])
    page.section("Shards", NOT_DOWNLOADED, data["shards"])
    return page, data


def run(cfg: Config, examples: int = EXAMPLES_PER_REASON) -> ReportResult:
    """Write `reports/<timestamp>/curation.html`, its figures and `summary.json` (written last).

    Args:
        cfg: the config (its workspace is reported).
        examples: failed URLs shown per source and failure reason.
    """
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    cat = Catalog(ws)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    page, data = build(cat, examples)
    with ws.scratch() as scratch:
        for name, draw in page.figures.items():
            draw(os.path.join(scratch, name))
        with open(os.path.join(scratch, "curation.html"), "w") as f:
            f.write(PAGE.format(stamp=stamp, workspace=html.escape(ws.url()), body="\n".join(page.parts)))
        with open(os.path.join(scratch, "summary.json"), "w") as f:
            json.dump({"generated": stamp, **data}, f, indent=1, default=str)
        for name in [*page.figures, "curation.html", "summary.json"]:  # summary.json last: the completion mark
            ws.upload(os.path.join(scratch, name), ws.reports(stamp, name))
    cat.save()
    return ReportResult(
        html=ws.url("reports", stamp, "curation.html"),
        summary_json=ws.url("reports", stamp, "summary.json"),
        figures=[ws.url("reports", stamp, f) for f in page.figures],
        totals=data["totals"],
        seconds=round(time.perf_counter() - start, 3),
    )
