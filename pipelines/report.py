"""Report: the curation report (funnel, download outcomes, histograms) as HTML with PNG figures and summary.json."""

from __future__ import annotations

import html
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from pydantic import BaseModel

from pipelines.config import Config
from stores.catalog import Catalog
from stores.curation import ASPECT, WORDS
from stores.workspace import Workspace

SHORT_SIDE = "least(original_width, original_height)"
DOWNLOADED = "(SELECT * FROM download_latest WHERE status = 'success')"
CLIP_THRESHOLDS = [0.1, 0.15, 0.2, 0.25, 0.28, 0.3, 0.35]
DOWNLOADED_ASPECT = ASPECT.replace("width", "original_width").replace("height", "original_height")


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


def _range(cat: Catalog, sql: str, default: tuple[float, float]) -> tuple[float, float]:
    lo, hi = cat.query(sql)[0]
    if lo is None or hi is None:
        return default
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)


def histograms(cat: Catalog) -> dict[str, dict[str, Any]]:
    """Before/after histograms of CLIP score and caption words, and of downloaded image sizes and aspect ratios."""
    s_lo, s_hi = _range(cat, "SELECT min(similarity), max(similarity) FROM metadata", (0.0, 1.0))
    w_hi = _range(cat, f"SELECT 0, quantile_cont({WORDS}, 0.99) + 2 FROM metadata", (0, 32))[1]
    side_hi = _range(cat, f"SELECT 0, max({SHORT_SIDE}) FROM {DOWNLOADED}", (0, 512))[1]
    return {
        "clip_score": {
            "before": cat.histogram("metadata", "similarity", s_lo, s_hi, 40),
            "after": cat.histogram("curated", "similarity", s_lo, s_hi, 40),
            "xlabel": "CLIP score (similarity)",
        },
        "caption_words": {
            "before": cat.histogram("metadata", WORDS, 0, round(w_hi), round(w_hi)),
            "after": cat.histogram("curated", WORDS, 0, round(w_hi), round(w_hi)),
            "xlabel": "caption length (words)",
        },
        "image_short_side": {
            "after": cat.histogram(DOWNLOADED, SHORT_SIDE, 0, side_hi, 32),
            "xlabel": "downloaded image: original short side (px)",
        },
        "image_aspect": {
            "after": cat.histogram(DOWNLOADED, DOWNLOADED_ASPECT, 1.0, 5.0, 32),
            "xlabel": "downloaded image: aspect ratio (long / short)",
        },
    }


def _plot_hist(path: str, title: str, spec: dict[str, Any]) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for label, style in (("before", dict(alpha=0.45)), ("after", dict(alpha=0.8))):
        if label not in spec:
            continue
        edges = spec[label]["edges"]
        for source, counts in spec[label]["counts"].items():
            ax.stairs(counts, edges, fill=True, label=f"{source} ({label})", **style)
    ax.set_title(title)
    ax.set_xlabel(spec["xlabel"])
    ax.set_ylabel("samples")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_funnel(path: str, funnel: list[dict[str, Any]]) -> None:
    sources = list(dict.fromkeys(r["source"] for r in funnel))
    fig, axes = plt.subplots(
        len(sources) or 1, 1, figsize=(7, 0.4 + 2.8 * max(1, len(sources))), dpi=100, squeeze=False
    )
    for ax, source in zip(axes[:, 0], sources or ["(none)"], strict=False):
        steps = [r for r in funnel if r["source"] == source]
        labels = ["input"] + [r["step"] for r in steps]
        values = [steps[0]["rows_in"]] + [r["rows_out"] for r in steps] if steps else [0]
        ax.barh(labels[::-1], values[::-1], color="#4878a8")
        ax.set_title(f"{source}: rows kept after each filter")
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v:,}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_reasons(path: str, reasons: list[dict[str, Any]]) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    labels = [f"{r['source']}: {r['reason']}" for r in reasons]
    colors = ["#4c9a55" if r["reason"] == "success" else ("#d49a3a" if r["retryable"] else "#b5473a") for r in reasons]
    ax.barh(labels[::-1], [r["samples"] for r in reasons][::-1], color=colors[::-1])
    ax.set_title("outcome per sample: green success, orange retryable, red final", fontsize=10)
    ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>nothing yet</em></p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ibllm curation report {stamp}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 980px; color: #222; }}
 table {{ border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: 14px; }}
 th, td {{ border: 1px solid #ccc; padding: 3px 10px; text-align: right; }}
 th {{ background: #eef2f6; }} td:first-child, th:first-child {{ text-align: left; }}
 img {{ max-width: 100%; border: 1px solid #ddd; margin: .5rem 0 1rem; }}
 .meta {{ color: #666; font-size: 13px; }}
</style></head><body>
<h1>Curation report</h1>
<p class="meta">workspace {workspace} &middot; generated {stamp}</p>
<h2>Totals</h2>{totals}
<h2>Funnel</h2><img src="funnel.png" alt="funnel">{funnel}
<h2>Download outcomes</h2><img src="download_reasons.png" alt="download outcomes">{reasons}
<h2>CLIP score, before and after filtering</h2><img src="clip_score.png" alt="CLIP score histogram">
<h2>Caption length, before and after filtering</h2><img src="caption_words.png" alt="caption length histogram">
<h2>Downloaded images</h2><img src="image_short_side.png" alt="image size histogram">
<img src="image_aspect.png" alt="aspect ratio histogram">
<h2>Features</h2>{features}<img src="feature_clip_score.png" alt="clip_score histogram">
<h3>Pairs kept by a clip_score threshold (the post-extraction CLIP filter)</h3>{thresholds}
<h3>Samples that could not be featurised</h3>{feature_failures}
<h2>Duplicates removed</h2>{dupes}
<h2>Shards</h2>{shards}
</body></html>
"""


def run(cfg: Config) -> ReportResult:
    """Write `reports/<timestamp>/curation.html`, its figures and `summary.json` (written last)."""
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    cat = Catalog(ws)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    funnel, reasons, totals, shards = cat.funnel(), cat.download_reasons(), cat.totals(), cat.shard_counts()
    dupes = [r for r in funnel if r["step"].startswith("dedup")]
    hists = histograms(cat)
    hists["feature_clip_score"] = {
        "after": cat.histogram("features", "clip_score", -1.0, 1.0, 80),
        "xlabel": "ImageBind clip_score (cosine)",
    }
    feats, feat_fails = cat.feature_counts(), cat.feature_failure_reasons()
    thresholds = cat.clip_thresholds(CLIP_THRESHOLDS)
    figures = ["funnel.png", "download_reasons.png", *(f"{k}.png" for k in hists)]
    with ws.scratch() as scratch:
        _plot_funnel(os.path.join(scratch, "funnel.png"), funnel)
        _plot_reasons(os.path.join(scratch, "download_reasons.png"), reasons)
        for name, spec in hists.items():
            _plot_hist(os.path.join(scratch, f"{name}.png"), name.replace("_", " "), spec)
        page = PAGE.format(
            stamp=stamp,
            workspace=html.escape(ws.url()),
            totals=_table(totals),
            funnel=_table(funnel),
            reasons=_table(reasons),
            dupes=_table(dupes),
            features=_table(feats),
            thresholds=_table(thresholds),
            feature_failures=_table(feat_fails),
            shards=_table(shards),
        )
        with open(os.path.join(scratch, "curation.html"), "w") as f:
            f.write(page)
        summary = {"generated": stamp, "totals": totals, "funnel": funnel, "download_reasons": reasons,
                   "duplicates_removed": dupes, "shards": shards, "features": feats, "clip_thresholds": thresholds,
                   "feature_failures": feat_fails, "histograms": hists}  # fmt: skip
        with open(os.path.join(scratch, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        for name in [*figures, "curation.html", "summary.json"]:  # summary.json last: the report's completion mark
            ws.upload(os.path.join(scratch, name), ws.reports(stamp, name))
    cat.save()
    return ReportResult(
        html=ws.url("reports", stamp, "curation.html"),
        summary_json=ws.url("reports", stamp, "summary.json"),
        figures=[ws.url("reports", stamp, f) for f in figures],
        totals=totals,
        seconds=round(time.perf_counter() - start, 3),
    )
