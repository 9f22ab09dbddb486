"""`ibllm runs`: the list of runs, a run's report written however it ends, and two runs compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import with_settings
from pipelines.errors import InputError
from pipelines.runs import stage as runs_stage
from pipelines.train import stage as train
from tests.pipelines.train_fixture import train_config


def test_runs_are_listed_reported_and_compared(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, checkpoint_every_steps=4, epochs=1)
    first = train.run(cfg, 1, local=True)
    stopped = train.run(with_settings(cfg, {"train.stage1.blr": 0.01}), 1, local=True, max_steps=6)
    # each run wrote its report when it ended: its curves and settings
    for result in (first, stopped):
        folder = Path(result.checkpoint).parents[2]
        assert result.report == str(folder / "report.html")
        page = (folder / "report.html").read_text()
        assert f"run {result.run_id}" in page and "curves.png" in page and "blr" not in page  # the job's own lr
        assert (folder / "curves.png").stat().st_size > 10_000
    listed = runs_stage.run(cfg)
    rows = {r.run_id: r for r in listed.runs}  # two runs started in the same second: ordered by their ids' suffix
    assert {(r.run_id, r.status, r.steps, r.planned_steps) for r in listed.runs} == {
        (first.run_id, "complete", first.total_steps, first.total_steps),
        (stopped.run_id, "stopped", 6, first.total_steps),
    }
    assert rows[first.run_id].settings_hash != rows[stopped.run_id].settings_hash
    assert first.run_id in listed.summary() and "6/" in listed.summary()
    compared = runs_stage.run(cfg, ["compare", first.run_id, stopped.run_id[-4:]])  # a unique part of an id does
    assert set(compared.differences) == {"lr", "max_steps"}
    assert compared.differences["max_steps"] == [None, 6]
    assert Path(compared.figure).stat().st_size > 10_000
    assert "settings that differ" in Path(compared.report).read_text()
    with pytest.raises(InputError, match=r"'nope'.*`ibllm runs` lists them"):
        runs_stage.run(cfg, ["compare", first.run_id, "nope"])
    with pytest.raises(InputError, match="two runs or more"):
        runs_stage.run(cfg, ["compare", first.run_id])
