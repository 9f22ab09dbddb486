"""A Prefect flow per stage: curation (synthetic, ingest, curate, download), extract, index, report, train, evaluate."""

from __future__ import annotations

import os
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipelines,stores,model")

from prefect import flow, get_run_logger
from pydantic import BaseModel, SerializeAsAny

from flows import artifacts
from flows.demo_hook import prepared
from flows.tasks import (
    benchmark_task,
    curate_task,
    download_source_task,
    evaluate_task,
    extract_task,
    index_task,
    ingest_task,
    report_task,
    synthetic_task,
    train_task,
)
from pipelines.config import Config, resolve_config, with_settings
from pipelines.curate import stage as curate
from pipelines.download import stage as download
from pipelines.evaluate import stage as evaluate
from pipelines.extract import stage as extract
from pipelines.index import stage as index
from pipelines.ingest import stage as ingest
from pipelines.report import stage as report
from pipelines.train import stage as train

ConfigParam = Config | str | None


class CurationResult(BaseModel):
    """The data stages up to webdataset shards."""

    synthetic: SerializeAsAny[BaseModel] | None  # the demo's synthetic source (its SyntheticResult)
    ingest: ingest.IngestResult
    curate: curate.CurateResult
    download: download.DownloadResult


@flow(name="ibllm-curate", log_prints=True)
def curate_flow(config: ConfigParam = None, overrides: list[str] | None = None, force: bool = False) -> CurationResult:
    """Ingest, curate and download every source (the synthetic one is generated and served on loopback first)."""
    logger = get_run_logger()
    cfg = resolve_config(config, overrides)
    with prepared(cfg, "curation") as server:  # the demo's server, for the synthetic source written below
        syn = None
        if server is not None:
            syn = synthetic_task(cfg, server.base_url, force=force)
        ing = ingest_task(cfg, force=force)
        cur = curate_task(cfg, force=force)
        artifacts.funnel(cur)
        kept = ", ".join(f"{s.source} {s.rows_in} -> {s.rows_out} rows" for s in cur.sources)
        logger.info("curated: %s (every filter's count: the curation-funnel artifact)", kept)
        start = time.perf_counter()
        sources = [download_source_task(cfg, s.name, force=force) for s in cfg.sources]
    dl = download.DownloadResult(sources=sources, seconds=round(time.perf_counter() - start, 3))
    logger.info("download:\n%s", dl.summary())
    return CurationResult(synthetic=syn, ingest=ing, curate=cur, download=dl)


@flow(name="ibllm-extract", log_prints=True)
def extract_flow(
    config: ConfigParam = None, overrides: list[str] | None = None, force: bool = False
) -> extract.ExtractResult:
    """ImageBind features of every downloaded shard not yet in the feature set (resumable at shard level)."""
    result = extract_task(resolve_config(config, overrides), force=force)
    get_run_logger().info("extract:\n%s", result.summary())
    return result


@flow(name="ibllm-index", log_prints=True)
def index_flow(
    config: ConfigParam = None, overrides: list[str] | None = None, force: bool = False
) -> index.IndexResult:
    """The visual cache index over `index.source`'s features (rebuilt only when they changed)."""
    result = index_task(resolve_config(config, overrides), force=force)
    get_run_logger().info("index:\n%s", result.summary())
    return result


@flow(name="ibllm-report", log_prints=True)
def report_flow(config: ConfigParam = None, overrides: list[str] | None = None) -> report.ReportResult:
    """The curation report (HTML and JSON) from the catalog."""
    result = report_task(resolve_config(config, overrides))
    artifacts.report(result)
    get_run_logger().info("report: %s", result.html)
    return result


@flow(name="ibllm-train", flow_run_name="ibllm-train-stage{stage}", log_prints=True)
def train_flow(
    config: ConfigParam = None,
    overrides: list[str] | None = None,
    stage: int = 1,
    init: str | None = None,
    resume: bool = False,
) -> train.TrainResult:
    """Train stage 1 or 2 (stage 2 from `init`, default the newest stage-1 run); the loss curve as an artifact."""
    cfg = resolve_config(config, overrides)
    with prepared(cfg, "train", train_stage=stage):  # the demo's stage 0 and conversations, when missing
        result = train_task(cfg, stage, init=init, resume=resume)
    artifacts.training(result)
    get_run_logger().info("%s", result.summary())
    return result


@flow(name="ibllm-benchmark", flow_run_name="ibllm-benchmark-{benchmark}", log_prints=True)
def benchmark_flow(
    config: ConfigParam = None,
    overrides: list[str] | None = None,
    benchmark: str = "mme",
    data: str = "",
    checkpoint: str | None = None,
    cache: bool = False,
    limit: int | None = None,
    subtasks: list[str] | None = None,
    images: str | None = None,
    batch: int | None = None,
) -> BaseModel:
    """A benchmark of a checkpoint (default: the promoted model, else the newest run) or of the encoders: its
    results JSON and HTML report in the workspace, its rows in the catalog, its table as an artifact. `checkpoint`,
    `cache` and `batch` stand for `infer.checkpoint`, `infer.use_cache` and `infer.batch`."""
    cfg = with_settings(
        resolve_config(config, overrides), _given(checkpoint=checkpoint, use_cache=cache or None, batch=batch)
    )
    result = benchmark_task(cfg, benchmark, data, limit, subtasks, images)
    artifacts.benchmark(result)
    get_run_logger().info("%s", result.summary())
    return result


@flow(name="ibllm-evaluate", flow_run_name="ibllm-evaluate-stage{stage}", log_prints=True)
def evaluate_flow(
    config: ConfigParam = None, overrides: list[str] | None = None, stage: int = 1, checkpoint: str | None = None
) -> evaluate.EvalResult:
    """Held-out metrics of a checkpoint (`infer.checkpoint`; default: the stage's newest complete run), into the
    catalog."""
    result = evaluate_task(with_settings(resolve_config(config, overrides), _given(checkpoint=checkpoint)), stage)
    artifacts.evaluation(result)
    get_run_logger().info("%s", result.summary())
    return result


def _given(**infer: object) -> dict[str, object]:
    """The `infer.*` settings a flow's parameters give (None: not given)."""
    return {f"infer.{k}": v for k, v in infer.items() if v is not None}
