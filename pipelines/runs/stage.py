"""`ibllm runs`: the list of training runs, one run's report, or a comparison of runs."""

from __future__ import annotations

from pydantic import BaseModel

from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.runs.listing import find, listing
from pipelines.runs.report import compare, write_run_report
from stores.workspace import Workspace


class RunReport(BaseModel):
    """Where one run's report was written."""

    stage: int
    run_id: str
    report: str

    def summary(self) -> str:
        return f"stage {self.stage} run {self.run_id}: report {self.report}"


def run(cfg: Config, what: list[str] | None = None) -> BaseModel:
    """No arguments: every run; `RUN`: write that run's report; `compare A B ...`: the runs side by side."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    what = list(what or [])
    if not what:
        return listing(ws)
    if what[0] == "compare":
        return compare(ws, what[1:])
    if len(what) > 1:
        raise InputError(f"`ibllm runs` takes one run, or `compare` and runs: got {' '.join(what)}")
    stage, run_id, _ = find(ws, what[0])
    return RunReport(stage=stage, run_id=run_id, report=write_run_report(ws, stage, run_id))
