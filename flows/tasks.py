"""Prefect tasks over the pipeline stages: retries where a retry resumes, timeouts sized to each stage's scale."""

from __future__ import annotations

import functools
from typing import Any

from prefect import task
from pydantic import BaseModel

from flows.demo_hook import prepared
from pipelines.apps import imagine
from pipelines.apps.ground import Grounder, GroundOptions
from pipelines.config import Config, ConfigError
from pipelines.config.names import ZERO_SHOT
from pipelines.curate import stage as curate
from pipelines.download import stage as download
from pipelines.errors import Diverged, InputError
from pipelines.evaluate import benchmark as bench
from pipelines.evaluate import stage as evaluate
from pipelines.evaluate import zeroshot_stage
from pipelines.extract import stage as extract
from pipelines.index import stage as index
from pipelines.infer import stage as infer
from pipelines.ingest import stage as ingest
from pipelines.report import stage as report
from pipelines.runtime.inputs import Request
from pipelines.train import stage as train
from stores.ledger import LedgerConflict
from stores.sources import SourceFileError
from stores.workspace import Workspace

HOUR = 3600
DAY = 24 * HOUR
# the same input fails the same way again (a diverged run diverges again: its operator lowers the learning rate)
NOT_RETRIED = (InputError, ConfigError, LedgerConflict, SourceFileError, Diverged)


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry what may pass another time, not a refusal of the user's input."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the result cannot be read back: retry, as without a condition
        return True
    return not isinstance(error, NOT_RETRIED)


stage_task = functools.partial(task, retry_condition_fn=worth_retrying)  # a task that never retries a bad input


@stage_task(name="synthetic", retries=1, timeout_seconds=HOUR)
def synthetic_task(cfg: Config, base_url: str, force: bool = False) -> BaseModel:
    """Write the demo's synthetic source for the running server and check what it serves."""
    with prepared(cfg, "synthetic", base_url=base_url, force=force) as result:
        return result


@stage_task(name="ingest", retries=1, timeout_seconds=6 * HOUR)
def ingest_task(cfg: Config, force: bool = False) -> ingest.IngestResult:
    """Normalise every source's metadata."""
    return ingest.run(cfg, force=force)


@stage_task(name="curate", retries=1, timeout_seconds=6 * HOUR)
def curate_task(cfg: Config, force: bool = False) -> curate.CurateResult:
    """Filter every source into url lists."""
    return curate.run(cfg, force=force)


@stage_task(
    name="download-source",
    task_run_name="download-{source}",
    retries=2,
    retry_delay_seconds=10,
    timeout_seconds=7 * DAY,
)
def download_source_task(cfg: Config, source: str, force: bool = False) -> download.SourceDownload:
    """Download one source's url lists; a retry resumes from its committed shards."""
    return download.download_source(cfg, Workspace(cfg.workspace, cfg.storage_options), source, force)


@stage_task(name="extract", retries=2, retry_delay_seconds=10, timeout_seconds=14 * DAY)
def extract_task(cfg: Config, force: bool = False) -> extract.ExtractResult:
    """ImageBind features of every downloaded shard; a retry redoes only the shards not yet committed."""
    with prepared(cfg, "extract"):  # the demo's vocabulary, when none is configured
        return extract.run(cfg, force=force)


@stage_task(name="index", retries=1, timeout_seconds=DAY)
def index_task(cfg: Config, force: bool = False) -> index.IndexResult:
    """Build the visual cache (only when its source's features changed)."""
    return index.run(cfg, force=force)


@stage_task(name="report", retries=1, retry_delay_seconds=5, timeout_seconds=2 * HOUR)
def report_task(cfg: Config) -> report.ReportResult:
    """Write the curation report."""
    return report.run(cfg)


@stage_task(
    name="train", task_run_name="train-stage{stage}", retries=1, retry_delay_seconds=10, timeout_seconds=30 * DAY
)
def train_task(cfg: Config, stage: int, init: str | None = None, resume: bool = False) -> train.TrainResult:
    """Train a stage; a run of the same inputs and settings is reused when complete and continued when not."""
    return train.run(cfg, stage, resume=resume, reuse=not resume, init=init)


@stage_task(name="evaluate", task_run_name="evaluate-stage{stage}", retries=1, timeout_seconds=DAY)
def evaluate_task(cfg: Config, stage: int) -> evaluate.EvalResult:
    """Held-out loss, perplexity and the shuffled-feature loss of `infer.checkpoint` (default: the stage's newest)."""
    return evaluate.run(cfg, stage)


@stage_task(name="benchmark", task_run_name="benchmark-{benchmark}", retries=1, timeout_seconds=DAY)
def benchmark_task(
    cfg: Config,
    benchmark: str,
    data: str,
    limit: int | None = None,
    subtasks: list[str] | None = None,
    images: str | None = None,
) -> BaseModel:
    """A benchmark (mme, vqa, captions: answered by the model of `infer.*`, resumable; zeroshot-*: the encoders)
    with its report."""
    if benchmark in ZERO_SHOT:
        return zeroshot_stage.run(cfg, ZERO_SHOT[benchmark], data, limit=limit)
    return bench.run(cfg, benchmark, data, limit=limit, subtasks=subtasks, images=images)


@stage_task(name="imagine", retries=1, timeout_seconds=DAY)
def imagine_task(
    cfg: Config,
    request: Request | None = None,
    out: str = "imagined.png",
    requests_file: str | None = None,
    force: bool = False,
) -> imagine.ImagineResult:
    """Draw images from the (cache-mixed: `infer.use_cache`) ImageBind embedding of a request or of each line of a
    requests file."""
    return imagine.run(cfg, request, out=out, requests_file=requests_file, force=force)


@stage_task(name="ground", retries=1, timeout_seconds=HOUR)
def ground_task(
    cfg: Config, image: str, prompt: str | None = None, threshold: float = 0.1, out: str | None = None
) -> infer.GenerateResult:
    """Answer a prompt about an image with the model of `infer.*` and find the answer's noun phrases in it
    (`generate --ground`)."""
    grounder = Grounder(cfg, GroundOptions(threshold=threshold, out=out), cfg.infer.device)
    return infer.run(cfg, Request(image=[image], prompt=prompt), annotate=grounder.ground)
