"""Prefect artifacts of the stages: the curation funnel, the report summary, training metrics, evaluations."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipelines.curate.stage import CurateResult
from pipelines.evaluate.benchmark import BenchmarkResult
from pipelines.evaluate.stage import EvalResult
from pipelines.evaluate.zeroshot import ZeroShotResult
from pipelines.report.stage import ReportResult
from pipelines.train.stage import TrainResult

CURVE_POINTS = 50  # rows of the loss-curve table


def funnel(result: CurateResult) -> None:
    """The curation funnel: rows into and out of every filter of every source."""
    rows = [r.model_dump() for s in result.sources for r in s.funnel]
    create_table_artifact(rows, key="curation-funnel", description="Rows into and out of every curation filter")


def report(result: ReportResult) -> None:
    """The report's totals as markdown, with the path of the HTML report."""
    lines = [
        "# Curation report",
        "",
        f"HTML report: `{result.html}`",
        "",
        "| source | metadata rows | curated | attempted | downloaded |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in result.totals:
        lines.append(
            f"| {t['source']} | {t['metadata_rows']} | {t['curated_rows']} | {t['attempted']} | {t['downloaded']} |"
        )
    create_markdown_artifact("\n".join(lines), key="curation-report", description="Curation report summary")


def training(result: TrainResult) -> None:
    """A stage's loss curve (at most CURVE_POINTS rows) and its summary."""
    losses = result.losses
    every = max(1, len(losses) // CURVE_POINTS)
    rows = [{"step": i + 1, "loss": round(loss, 5)} for i, loss in enumerate(losses) if (i + 1) % every == 0]
    create_table_artifact(rows, key=f"training-stage{result.stage}", description=result.summary())
    if result.report:
        create_markdown_artifact(
            f"# Stage {result.stage} run {result.run_id}\n\nTraining report (curves, settings): `{result.report}`\n\n"
            f"`ibllm runs compare {result.run_id} <another run>` puts it beside another run.",
            key=f"training-report-stage{result.stage}",
            description=f"stage {result.stage} run {result.run_id}: {result.status}, report {result.report}",
        )


def evaluation(result: EvalResult) -> None:
    """Held-out loss, perplexity and the shuffled-feature loss of a checkpoint."""
    create_table_artifact(
        [result.model_dump(exclude={"checkpoint"})], key=f"evaluation-stage{result.stage}", description=result.summary()
    )


def benchmark(result: BenchmarkResult | ZeroShotResult) -> None:
    """A benchmark's table (MME: a row per subtask and the totals), and where its report is."""
    name = result.benchmark if isinstance(result, BenchmarkResult) else f"zeroshot-{result.kind}"
    create_markdown_artifact(
        f"# {name}\n\n```\n{result.summary()}\n```",
        key="benchmark",
        description="benchmark scores; the HTML report is in the workspace",
    )
