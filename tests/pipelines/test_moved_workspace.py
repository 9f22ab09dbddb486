"""A moved or copied workspace: its records name their files relative to the root, so every stage reuses its work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipelines.curate import stage as curate
from pipelines.ingest import stage as ingest
from stores.registry import Decision, Lineage, last_decision, read_lineage, record_decision, write_lineage
from stores.runs import Runs
from stores.workspace import Workspace
from tests.pipelines.test_curate import make_cfg


def job(ws: Workspace, run_id: str, outside: str) -> dict:
    return {
        "stage": 2,
        "run_id": run_id,
        "workspace": ws.root,
        "encoder_id": "imagebind-tiny-init0",
        "base_llama": outside,  # a user's model outside the workspace stays as it is
        "tokenizer": ws.path("checkpoints", "stage0", "base", "tokenizer.json"),
        "feature_files": [ws.path("features", "enc", "src", f"part-{i:05d}.parquet") for i in range(2)],
        "lr": 0.01,
    }


def test_a_run_record_names_workspace_files_relative_and_a_copy_reuses_the_run(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "a"))
    outside = str(tmp_path / "models" / "llama")
    Runs.of_stage(ws, 2).start("r1", job(ws, "r1", outside))
    raw = json.loads((tmp_path / "a" / "checkpoints" / "stage2" / "r1" / "run.json").read_text())["job"]
    assert raw["tokenizer"] == "checkpoints/stage0/base/tokenizer.json"
    assert raw["feature_files"][1] == "features/enc/src/part-00001.parquet"
    assert raw["base_llama"] == outside and raw["encoder_id"] == "imagebind-tiny-init0"
    assert raw["workspace"] == "." and str(tmp_path) not in json.dumps(raw["feature_files"])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = Workspace(str(tmp_path / "b"))
    runs = Runs.of_stage(copy, 2)
    rec = runs.record("r1")
    assert rec is not None and rec.get("tokenizer") == copy.path("checkpoints", "stage0", "base", "tokenizer.json")
    assert rec.get("workspace") == copy.root
    assert runs.same_inputs(job(copy, "new", outside)) == ("r1", "running")  # the same inputs, in their new place
    assert runs.same_inputs(job(copy, "new", outside) | {"lr": 0.02}) is None
    runs.end("r1", "stopped")  # rewriting the record keeps it relative
    assert json.loads((tmp_path / "b" / "checkpoints" / "stage2" / "r1" / "run.json").read_text())["job"] == raw


def test_an_older_run_record_of_full_paths_is_found_again_in_a_copy(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "a"))
    outside = str(tmp_path / "models" / "llama")
    folder = tmp_path / "a" / "checkpoints" / "stage2" / "r1"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": "complete", "attempts": 1, "job": job(ws, "r1", outside)}))
    for f in job(ws, "r1", outside)["feature_files"]:  # an older record's files are found again where they exist
        Path(f).parent.mkdir(parents=True, exist_ok=True)
        Path(f).write_bytes(b"parquet")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = Workspace(str(tmp_path / "b"))
    runs = Runs.of_stage(copy, 2)
    assert runs.record("r1").get("feature_files") == job(copy, "r1", outside)["feature_files"]
    # its tokenizer has no copy in b: named as recorded; everything else matches, so the run is of the same inputs
    assert runs.record("r1").get("base_llama") == outside
    same = job(copy, "new", outside) | {"tokenizer": job(ws, "r1", outside)["tokenizer"]}
    assert runs.same_inputs(same) == ("r1", "complete")


def test_a_lineage_names_its_checkpoints_relative_to_the_workspace(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "a"))
    ckpt = ws.path("checkpoints", "stage2", "r2", "attempt-1", "step-00000090", "model")
    lineage = Lineage.model_validate(
        {
            "stage2_run_id": "r2",
            "stage1_run_id": "r1",
            "created_at": "2026-12-08T00:00:00+00:00",
            "data": {},
            "features": {"encoder_id": "enc", "parts": {}, "fingerprints": {}},
            "instructions": [ws.path("instructions", "synthetic.json")],
            "stage1_checkpoint": ws.path("checkpoints", "stage1", "r1", "model"),
            "stage2_checkpoint": ckpt,
            "config": "",
            "config_digest": "",
        }
    )
    written = Path(write_lineage(ws, lineage))
    assert json.loads(written.read_text())["instructions"] == ["instructions/synthetic.json"]
    ref = {k: getattr(lineage, k) for k in ("stage1_run_id", "stage1_checkpoint", "stage2_run_id", "stage2_checkpoint")}
    decision = Decision.model_validate(
        {
            "stamp": "s1",
            "decided_at": "now",
            "promoted": True,
            "reason": "first",
            "candidate": ref,
            "heldout_digest": "d",
            "heldout_examples": 2,
            "new_shards": 0,
            "lineage": str(written),
        }
    )
    assert str(tmp_path) not in Path(record_decision(ws, decision)).read_text()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = Workspace(str(tmp_path / "b"))
    found = read_lineage(copy, "r2")
    assert found.stage2_checkpoint == copy.path("checkpoints", "stage2", "r2", "attempt-1", "step-00000090", "model")
    assert found.instructions == [copy.path("instructions", "synthetic.json")]
    assert last_decision(copy).candidate.stage2_checkpoint == found.stage2_checkpoint
    assert last_decision(copy).lineage == copy.path("registry", "lineage", "r2.json")


def test_ingest_of_a_source_inside_a_moved_workspace_is_unchanged(tmp_path: Path) -> None:
    """The synthetic source lives in the workspace: moved with it, it is the same input, not a second file."""
    cfg = make_cfg(tmp_path, {"a": [{} for _ in range(5)]})
    inside = Path(cfg.workspace) / "incoming"
    inside.mkdir(parents=True)
    shutil.move(tmp_path / "a" / "part-0.parquet", inside / "part-0.parquet")
    cfg.sources[0].paths = [str(inside / "*.parquet")]
    first = ingest.run(cfg).sources[0]
    assert (first.written, first.rows) == (1, 5)
    curate.run(cfg)
    shutil.copytree(cfg.workspace, tmp_path / "moved")  # cp -a: the files keep their times
    shutil.rmtree(cfg.workspace)
    moved = cfg.model_copy(update={"workspace": str(tmp_path / "moved")}, deep=True)
    moved.sources[0].paths = [str(tmp_path / "moved" / "incoming" / "*.parquet")]
    again = ingest.run(moved).sources[0]
    assert (again.written, again.skipped, again.rows) == (0, 1, 5)
    assert len(list((tmp_path / "moved" / "sources" / "a").glob("*.parquet"))) == 1
    assert curate.run(moved).sources[0].skipped  # nothing downstream sees a change
