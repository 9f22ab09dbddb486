"""The end-to-end demo flow: every stage that exists, on the embedded default, in one Prefect flow."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipelines,stores,model")

from prefect import flow, get_run_logger, task
from pydantic import BaseModel

from pipelines import synthetic
from pipelines.config import Config, resolve_config
from pipelines.synthetic_server import SyntheticServer


class DemoResult(BaseModel):
    """What each stage of the demo produced, in order."""

    workspace: str
    synthetic: synthetic.SyntheticResult

    def summary(self) -> str:
        """Human lines, one block per stage."""
        blocks = [("synthetic source", self.synthetic.summary())]
        out = [f"workspace: {self.workspace}"]
        for name, text in blocks:
            out.append(f"\n== {name}")
            out.extend("   " + line for line in text.splitlines())
        return "\n".join(out)


@task(name="synthetic", retries=1)
def synthetic_task(cfg: Config, base_url: str, force: bool = False) -> synthetic.SyntheticResult:
    """Write the synthetic source for the running server and check what it serves."""
    return synthetic.run(cfg, base_url, force=force)


@flow(name="ibllm-demo", log_prints=True)
def demo_flow(
    config: Config | str | None = None, overrides: list[str] | None = None, force: bool = False
) -> DemoResult:
    """Make the synthetic source, serve it on loopback, and run every stage on it."""
    logger = get_run_logger()
    cfg = resolve_config(config, overrides)
    with SyntheticServer(cfg.synthetic) as server:
        logger.info("synthetic source served at %s", server.base_url)
        syn = synthetic_task(cfg, server.base_url, force=force)
        logger.info("synthetic: %d rows, served as %s", syn.rows, syn.served)
    return DemoResult(workspace=cfg.workspace, synthetic=syn)
