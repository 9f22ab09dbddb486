"""The curation report's figures: the funnel, download outcomes, and histograms with labelled overflow bins."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLES = (("before", {"alpha": 0.45}), ("after", {"alpha": 0.8}))


def has_data(spec: dict[str, Any]) -> bool:
    """True when a histogram spec counts at least one value, in range or not."""
    return any(
        sum(counts) + spec[label]["below"].get(src, 0) + spec[label]["above"].get(src, 0) > 0
        for label, _ in STYLES
        if label in spec
        for src, counts in spec[label]["counts"].items()
    )


def plot_histogram(path: str, title: str, spec: dict[str, Any]) -> None:
    """Before/after histograms per source; values out of range stand in hatched bins beyond each edge, labelled."""
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    lo = hi = gap = 0.0
    for label, style in STYLES:
        if label not in spec:
            continue
        hist = spec[label]
        edges = hist["edges"]
        lo, hi = edges[0], edges[-1]
        gap = (hi - lo) / 20  # an overflow bin is this wide, this far from the range
        for source, counts in hist["counts"].items():
            color = ax.stairs(counts, edges, fill=True, label=f"{source} ({label})", **style).get_facecolor()
            for side, x, text in (("below", lo - 1.5 * gap, f"< {lo:.3g}"), ("above", hi + 0.5 * gap, f"> {hi:.3g}")):
                n = hist[side].get(source, 0)
                if n:
                    ax.bar(x, n, width=gap, align="edge", color=color, hatch="//", edgecolor="#333", **style)
                    ax.annotate(f"{text}: {n:,}", (x + gap / 2, n), ha="center", va="bottom", fontsize=8)
    if gap:
        ax.set_xlim(lo - 2 * gap, hi + 2 * gap)
    ax.set_title(title)
    ax.set_xlabel(spec["xlabel"])
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_funnel(path: str, funnel: list[dict[str, Any]]) -> None:
    """Rows kept after each filter, one panel per source."""
    sources = list(dict.fromkeys(r["source"] for r in funnel))
    fig, axes = plt.subplots(len(sources), 1, figsize=(7, 0.4 + 2.8 * len(sources)), dpi=100, squeeze=False)
    for ax, source in zip(axes[:, 0], sources, strict=True):
        steps = [r for r in funnel if r["source"] == source]
        labels = ["input"] + [r["step"] for r in steps]
        values = [steps[0]["rows_in"]] + [r["rows_out"] for r in steps]
        ax.barh(labels[::-1], values[::-1], color="#4878a8")
        ax.set_title(f"{source}: rows kept after each filter")
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v:,}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_outcomes(path: str, reasons: list[dict[str, Any]]) -> None:
    """Samples per final outcome: green success, orange retryable, red final."""
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.3 * len(reasons)), dpi=100)
    labels = [f"{r['source']}: {r['reason']}" for r in reasons]
    colors = ["#4c9a55" if r["reason"] == "success" else ("#d49a3a" if r["retryable"] else "#b5473a") for r in reasons]
    ax.barh(labels[::-1], [r["samples"] for r in reasons][::-1], color=colors[::-1])
    ax.set_title("outcome per sample: green success, orange retryable, red final", fontsize=10)
    ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
