"""A run's training report (`report.html` and `curves.png` in its folder) and comparisons of runs."""

from __future__ import annotations

import hashlib
import html
import logging
import os
import posixpath
from typing import Any

from pydantic import BaseModel

from pipelines.errors import InputError
from pipelines.runs import figures
from pipelines.runs.listing import RunRow, all_runs, find, flat_settings, heldout_losses, row
from stores.metrics import MetricLog
from stores.runs import REPORT_FILE, Runs
from stores.workspace import Workspace

log = logging.getLogger(__name__)
CURVES = "curves.png"
STYLE = "body{font-family:sans-serif;margin:2em;max-width:70em}td,th{padding:2px 8px;text-align:left}"


class Comparison(BaseModel):
    """Runs side by side: the settings that differ, and their curves on the same axes."""

    runs: list[RunRow]
    differences: dict[str, list[Any]]
    figure: str
    report: str

    def summary(self) -> str:
        ids = [r.run_id for r in self.runs]
        lines = [f"{len(ids)} runs: {', '.join(ids)}"]
        if not self.differences:
            lines.append("the same settings and inputs")
        for key, values in self.differences.items():
            lines.append(f"  {key}: " + " | ".join(_short(v) for v in values))
        lines += ["  final loss: " + " | ".join(_short(r.final_loss) for r in self.runs)]
        lines.append(f"curves {self.figure}; report {self.report}")
        return "\n".join(lines)


def _short(value: Any, limit: int = 60) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    if isinstance(value, list):
        text = f"{len(value)} item(s)" if len(text) > limit else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _at_steps(heldout: list[tuple[int | None, float]], last_step: int) -> list[tuple[int, float]]:
    """Held-out losses to plot, each at its checkpoint's step (the run's last, when unknown)."""
    return sorted((last_step if step is None else step, loss) for step, loss in heldout)


def write_run_report(ws: Workspace, stage: int, run_id: str) -> str:
    """Write a run's report (status, curves, settings, parent) into its folder; returns its location."""
    runs = Runs.of_stage(ws, stage)
    record, folder = runs.record(run_id), runs.run_folder(run_id)
    if record is None:
        raise InputError(f"stage {stage} has no run {run_id!r}")
    history = MetricLog(ws, folder).read()
    heldout = heldout_losses(ws, stage, run_id)
    r = row(ws, stage, run_id, record, heldout)
    last = max(history.column("step").to_pylist(), default=0)
    with ws.scratch() as scratch:
        local = os.path.join(scratch, CURVES)
        figures.plot_curves(local, {run_id: history}, {run_id: _at_steps(heldout, last)})
        ws.upload(local, posixpath.join(folder, CURVES))
    settings = flat_settings(record, ws)
    body = (
        f"<h1>stage {stage} run {html.escape(run_id)}</h1>"
        + _table([r.model_dump()])
        + f'<h2>curves</h2><img src="{CURVES}" alt="loss, learning rate, gradient norm and tokens/s by step">'
        + "<h2>settings</h2>"
        + _table([{"setting": k, "value": _short(v, 200)} for k, v in settings.items()])
    )
    target = posixpath.join(folder, REPORT_FILE)
    ws.write_bytes(target, _page(f"stage {stage} run {run_id}", body).encode())
    return ws.as_url(target)


def compare(ws: Workspace, given: list[str]) -> Comparison:
    """Compare runs (ids or unique parts of them): a report under `reports/runs/<key>/`."""
    if len(given) < 2:
        raise InputError("`ibllm runs compare` takes two runs or more (`ibllm runs` lists them)")
    every = all_runs(ws)
    found = [find(ws, g, every) for g in given]
    measured = {run_id: heldout_losses(ws, stage, run_id) for stage, run_id, _ in found}
    rows = [row(ws, stage, run_id, rec, measured[run_id]) for stage, run_id, rec in found]
    flats = [flat_settings(rec, ws) for _, _, rec in found]
    keys = sorted(set().union(*flats))
    differences = {k: [f.get(k) for f in flats] for k in keys if len({repr(f.get(k)) for f in flats}) > 1}
    histories, heldout = {}, {}
    for stage, run_id, _ in found:
        history = MetricLog(ws, Runs.of_stage(ws, stage).run_folder(run_id)).read()
        histories[run_id] = history
        heldout[run_id] = _at_steps(measured[run_id], max(history.column("step").to_pylist(), default=0))
    key = hashlib.sha256(" ".join(r.run_id for r in rows).encode()).hexdigest()[:12]
    folder = ws.path("reports", "runs", key)
    with ws.scratch() as scratch:
        local = os.path.join(scratch, CURVES)
        figures.plot_curves(local, histories, heldout)
        ws.upload(local, posixpath.join(folder, CURVES))
    body = (
        "<h1>runs compared</h1>"
        + _table([r.model_dump() for r in rows])
        + f'<h2>curves</h2><img src="{CURVES}" alt="the runs\' curves on the same axes">'
        + "<h2>settings that differ</h2>"
        + (
            _table(
                [
                    {"setting": k, **{r.run_id: _short(v, 120) for r, v in zip(rows, vs, strict=True)}}
                    for k, vs in differences.items()
                ]
            )
            if differences
            else "<p>none: the same settings and inputs</p>"
        )
    )
    target = posixpath.join(folder, "compare.html")
    ws.write_bytes(target, _page("runs compared", body).encode())
    return Comparison(
        runs=rows,
        differences=differences,
        figure=ws.as_url(posixpath.join(folder, CURVES)),
        report=ws.as_url(target),
    )


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    cells = lambda r: "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r.values())  # noqa: E731
    return f"<table><tr>{head}</tr>" + "".join(f"<tr>{cells(r)}</tr>" for r in rows) + "</table>"


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )
