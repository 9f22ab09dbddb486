"""The curves of one or more runs on the same axes: loss, learning rate, gradient norm and throughput by step."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow as pa

PANELS = (
    ("loss", "loss (held-out: points)", True),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm before clipping", True),
    ("tokens_per_s", "tokens/s", False),
)


def plot_curves(path: str, histories: dict[str, pa.Table], heldout: dict[str, list[tuple[int, float]]]) -> None:
    """A 2 x 2 figure, one line a run (its label) in each panel; `heldout` adds a run's held-out losses by step."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), dpi=100)
    for ax, (column, title, log_scale) in zip(axes.flat, PANELS, strict=True):
        drawn = False
        for label, table in histories.items():
            steps = table.column("step").to_pylist()
            values = table.column(column).to_pylist()
            points = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None and math.isfinite(v)]
            if points:
                ax.plot(*zip(*points, strict=True), label=label, linewidth=1)
                drawn = True
            if column == "loss" and heldout.get(label):
                ax.scatter(*zip(*heldout[label], strict=True), s=18, marker="o")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        if log_scale and drawn:
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
