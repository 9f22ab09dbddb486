"""The end-to-end demo flow: every stage that exists, on the embedded default, in one Prefect flow."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipelines,stores,model")

from prefect import flow, get_run_logger, task
from pydantic import BaseModel

from pipelines import (
    base_lm,
    curate,
    demo_check,
    demo_data,
    download,
    evaluate,
    extract,
    index,
    ingest,
    report,
    synthetic,
    train,
)
from pipelines.config import Config, resolve_config
from pipelines.synthetic_server import server_for


class DemoResult(BaseModel):
    """What each stage of the demo produced, in order."""

    workspace: str
    synthetic: synthetic.SyntheticResult
    ingest: ingest.IngestResult
    curate: curate.CurateResult
    download: download.DownloadResult
    extract: extract.ExtractResult
    index: index.IndexResult
    report: report.ReportResult
    base: base_lm.BaseLMResult
    stage1: train.TrainResult
    instructions: demo_data.InstructionsResult
    stage2: train.TrainResult
    evaluation: evaluate.EvalResult
    check: demo_check.DemoCheck

    def summary(self) -> str:
        """Human lines, one block per stage."""
        blocks = [
            ("synthetic source", self.synthetic.summary()),
            ("ingest", self.ingest.summary()),
            ("curate: the funnel", self.curate.summary()),
            ("download", self.download.summary()),
            ("extract", self.extract.summary()),
            ("visual cache index", self.index.summary()),
            ("report", self.report.summary()),
            ("stage 0: the demo's base LLaMA", self.base.summary()),
            ("stage 1: bind network, gates, prefix", self.stage1.summary()),
            ("stage 2 data", self.instructions.summary()),
            ("stage 2: LoRA, biases, norms", self.stage2.summary()),
            ("evaluate", self.evaluation.summary()),
            ("what the model says about held-out images", self.check.summary()),
        ]
        out = [f"workspace: {self.workspace}"]
        for name, text in blocks:
            out.append(f"\n== {name}")
            out.extend("   " + line for line in text.splitlines())
        return "\n".join(out)


@task(name="synthetic", retries=1)
def synthetic_task(cfg: Config, base_url: str, force: bool = False) -> synthetic.SyntheticResult:
    """Write the synthetic source for the running server and check what it serves."""
    return synthetic.run(cfg, base_url, force=force)


@task(name="ingest", retries=1)
def ingest_task(cfg: Config, force: bool = False) -> ingest.IngestResult:
    """Normalise every source's metadata."""
    return ingest.run(cfg, force=force)


@task(name="curate", retries=1)
def curate_task(cfg: Config, force: bool = False) -> curate.CurateResult:
    """Filter every source into url lists."""
    return curate.run(cfg, force=force)


@task(name="download", retries=1, retry_delay_seconds=5)
def download_task(cfg: Config, force: bool = False) -> download.DownloadResult:
    """Download the url lists into webdataset shards (a retry resumes from the completed shards)."""
    return download.run(cfg, force=force)


@task(name="extract", retries=1, retry_delay_seconds=5)
def extract_task(cfg: Config, force: bool = False) -> extract.ExtractResult:
    """ImageBind features of the downloaded shards (a retry continues from the committed shards)."""
    return extract.run(cfg, force=force)


@task(name="index", retries=1)
def index_task(cfg: Config, force: bool = False) -> index.IndexResult:
    """Build the visual cache over the demo's features."""
    return index.run(cfg, force=force)


@task(name="report")
def report_task(cfg: Config) -> report.ReportResult:
    """Write the curation report."""
    return report.run(cfg)


@task(name="base-llama", retries=1)
def base_task(cfg: Config, force: bool = False) -> base_lm.BaseLMResult:
    """Stage 0: the demo's base language model and tokenizer."""
    return base_lm.run(cfg, force=force)


@task(name="train", retries=1, retry_delay_seconds=5)
def train_task(cfg: Config, stage: int, init: str | None = None) -> train.TrainResult:
    """Train a stage; a run of the same inputs and settings is reused when complete, continued when not."""
    return train.run(cfg, stage, reuse=True, init=init)


@task(name="instructions")
def instructions_task(cfg: Config) -> demo_data.InstructionsResult:
    """Generate the stage-2 conversations about the training images."""
    return demo_data.run(cfg)


@task(name="evaluate")
def evaluate_task(cfg: Config, stage: int, checkpoint: str) -> evaluate.EvalResult:
    """Held-out loss, perplexity and the shuffled-feature loss of a checkpoint."""
    return evaluate.run(cfg, stage, checkpoint)


@task(name="demo-check")
def check_task(cfg: Config, stage1: str, stage2: str) -> demo_check.DemoCheck:
    """Caption held-out images and answer the colour question about them."""
    return demo_check.run(cfg, stage1, stage2)


@flow(name="ibllm-demo", log_prints=True)
def demo_flow(
    config: Config | str | None = None, overrides: list[str] | None = None, force: bool = False
) -> DemoResult:
    """Make the synthetic source, serve it on loopback, and run every stage on it."""
    logger = get_run_logger()
    cfg = resolve_config(config, overrides)
    with server_for(cfg) as server:
        logger.info("synthetic source served at %s", server.base_url)
        syn = synthetic_task(cfg, server.base_url, force=force)
        ing = ingest_task(cfg, force=force)
        cur = curate_task(cfg, force=force)
        logger.info("curation funnel:\n%s", cur.summary())
        dl = download_task(cfg, force=force)
    ext = extract_task(cfg, force=force)
    idx = index_task(cfg, force=force)
    rep = report_task(cfg)
    logger.info("report: %s", rep.html)
    base = base_task(cfg, force=force)
    s1 = train_task(cfg, 1)
    ins = instructions_task(cfg)
    s2 = train_task(cfg, 2, init=s1.checkpoint)
    ev = evaluate_task(cfg, 1, s1.checkpoint)
    check = check_task(cfg, s1.checkpoint, s2.checkpoint)
    logger.info("held-out images:\n%s", check.summary())
    return DemoResult(
        workspace=cfg.workspace,
        synthetic=syn,
        ingest=ing,
        curate=cur,
        download=dl,
        extract=ext,
        index=idx,
        report=rep,
        base=base,
        stage1=s1,
        instructions=ins,
        stage2=s2,
        evaluation=ev,
        check=check,
    )
