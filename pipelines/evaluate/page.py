"""A benchmark's HTML report: its table, a bar chart of the subtask scores, and answers it got wrong, with images."""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from pipelines.evaluate.benchmark import EvalRow
    from pipelines.evaluate.questions import Asked, Scored

EXAMPLES = 12  # wrong answers shown
THUMB = 160  # px, the longer side of a shown image
TOTALS = ("perception", "cognition", "all")


def _thumbnail(path: str | None) -> str:
    """An <img> with the picture as a small inline JPEG, or nothing when there is none or it cannot be read."""
    if not path:
        return ""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
    except (OSError, ValueError):
        return f"<span class='note'>(cannot show {html.escape(path)})</span>"
    return f"<img alt='' src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _bars(rows: list[EvalRow], top: float) -> str:
    """An inline SVG bar per subtask (totals left out), scaled to `top`."""
    shown = [r for r in rows if r.subtask not in TOTALS] or rows
    width, bar, gap, label = 520, 18, 6, 190
    height = len(shown) * (bar + gap) + gap
    parts = [f"<svg width='{width}' height='{height}' role='img' aria-label='scores per subtask'>"]
    for i, r in enumerate(shown):
        y = gap + i * (bar + gap)
        w = max(0.0, min(1.0, r.score / top)) * (width - label - 60)
        parts.append(
            f"<text x='{label - 6}' y='{y + 13}' text-anchor='end'>{html.escape(r.subtask)}</text>"
            f"<rect x='{label}' y='{y}' width='{w:.1f}' height='{bar}' fill='#4a7bd0'></rect>"
            f"<text x='{label + w + 4:.1f}' y='{y + 13}'>{r.score:.1f}</text>"
        )
    return "".join(parts) + "</svg>"


def render(name: str, scored: Scored, rows: list[EvalRow], wrong: list[tuple[Asked, dict]]) -> str:
    """The report page of one benchmark evaluation."""
    floor = {"mme": 200.0, "captions": 1.0}.get(name, 100.0)  # MME's maximum; CIDEr-D has none
    top = floor if name == "mme" else max([floor] + [r.score for r in rows])
    head = (
        "<tr><th>subtask</th><th>score</th><th>questions</th><th>accuracy</th><th>accuracy+</th>"
        "<th>unparseable</th><th>BLEU-4</th></tr>"
    )

    def cell(value: float | int | None) -> str:
        if value is None:
            return "<td>-</td>"
        return f"<td>{value}</td>" if isinstance(value, int) else f"<td>{value:.2f}</td>"

    table = "".join(
        f"<tr><td>{html.escape(r.subtask)}</td>{cell(r.score)}{cell(r.questions)}{cell(r.accuracy)}"
        f"{cell(r.accuracy_plus)}{cell(r.unparseable)}{cell(r.bleu4)}</tr>"
        for r in rows
    )
    examples = "".join(
        f"<div class='ex'>{_thumbnail(asked.picture)}<div><b>{html.escape(asked.subtask)}</b> "
        f"<code>{html.escape(asked.qid)}</code><br>Q: {html.escape(asked.request.prompt or '')}<br>"
        f"expected: <b>{html.escape(asked.expected)}</b><br>"
        f"answer: {html.escape(given.get('answer') or '(none: ' + given.get('error', '') + ')')}</div></div>"
        for asked, given in wrong
    )
    checkpoint = html.escape(rows[0].checkpoint) if rows else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ibllm {html.escape(name)} evaluation</title>
<style>body{{font-family:sans-serif;margin:2rem;max-width:60rem}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}} td:first-child{{text-align:left}}
.ex{{display:flex;gap:1rem;margin:.8rem 0}} .note{{color:#777}} svg text{{font-size:12px}}</style></head><body>
<h1>{html.escape(name)}</h1>
<p>{html.escape(scored.summary)}</p><p class="note">checkpoint {checkpoint}; score: {html.escape(scored.score_name)}</p>
<table>{head}{table}</table>
<h2>Scores</h2>{_bars(rows, top)}
<h2>Answers judged wrong (up to {EXAMPLES})</h2>{examples or "<p>none</p>"}
</body></html>
"""
