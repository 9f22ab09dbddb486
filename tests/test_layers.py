"""The layering rules hold: flows -> pipelines -> {model, stores}; ray, prefect, duckdb/faiss each in one layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("flows", "pipelines", "model", "stores")
# layer -> top-level modules it must not import
FORBIDDEN = {
    "flows": {"ray", "duckdb", "faiss", "autofaiss"},
    "pipelines": {"prefect", "flows", "duckdb", "faiss", "autofaiss"},
    "model": {"prefect", "ray", "flows", "pipelines", "stores", "duckdb", "faiss", "autofaiss"},
    "stores": {"prefect", "ray", "flows", "pipelines", "model", "torch"},
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports(layer: str) -> None:
    bad = {
        str(p.relative_to(ROOT)): sorted(imports(p) & FORBIDDEN[layer]) for p in sorted((ROOT / layer).rglob("*.py"))
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_extraction_readers_load_no_torch() -> None:
    """Ray's reader workers import only the reading module: without torch each starts faster and holds less memory."""
    code = "import sys, pipelines.extract.read; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


DEMO_CALLERS = ("flows/demo_hook.py", "flows/pipeline.py")  # the demo hook's one call site, and the demo flow


def demo_imports(path: Path) -> list[str]:
    """The pipelines.demo modules a file imports (at the top or inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return sorted(m for m in found if m == "pipelines.demo" or m.startswith("pipelines.demo."))


def test_no_production_stage_imports_the_demo() -> None:
    """The demo's modules (pipelines/demo/) are called by flows and the CLI, never by a production stage."""
    bad = {}
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        if path.parent.name == "demo":
            continue
        if demo := demo_imports(path):
            bad[str(path.relative_to(ROOT))] = demo
    assert bad == {}


def pipeline_imports(path: Path) -> set[str]:
    """The `pipelines.*` modules a file imports (absolute imports, at any depth of the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {
        f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module for a in n.names
    }
    return {m for m in found if m.startswith("pipelines.")}


def importers(package: str, banned: tuple[str, ...]) -> dict[str, list[str]]:
    """Files of `package` importing any of the `banned` packages."""
    bad = {}
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        hits = sorted(m for m in pipeline_imports(path) if any(m == b or m.startswith(b + ".") for b in banned))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_generation_and_the_applications_do_not_import_each_other() -> None:
    """generate/chat (pipelines/infer) and imagine/ground (pipelines/apps) meet only in the runtime."""
    assert importers("pipelines.infer", ("pipelines.apps",)) == {}
    assert importers("pipelines.apps", ("pipelines.infer",)) == {}


def test_entry_points_reach_the_model_through_the_runtime() -> None:
    """serve, evaluate and the applications load a trained model through pipelines/runtime, never through generate."""
    for package in ("pipelines.serve", "pipelines.evaluate", "pipelines.apps", "pipelines.retrain"):
        assert importers(package, ("pipelines.infer",)) == {}, package
    entry_points = ("pipelines.infer", "pipelines.apps", "pipelines.serve", "pipelines.evaluate", "pipelines.demo")
    assert importers("pipelines.runtime", entry_points) == {}


def test_the_config_imports_no_stage() -> None:
    """pipelines/config reads and checks settings only: from pipelines it imports itself, paths and errors."""
    allowed = ("pipelines.config", "pipelines.paths", "pipelines.errors")
    bad = {}
    for path in sorted((ROOT / "pipelines" / "config").rglob("*.py")):
        hits = sorted(m for m in pipeline_imports(path) if not any(m == a or m.startswith(a + ".") for a in allowed))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    assert bad == {}


def test_flows_reach_the_demo_from_two_places() -> None:
    """Flows, tasks and the CLI call stages only: pipelines.demo is imported by the demo hook's one call site
    (flows/demo_hook.py) and the demo flow (flows/pipeline.py), nowhere else in flows/."""
    callers = {str(p.relative_to(ROOT)) for p in sorted((ROOT / "flows").rglob("*.py")) if demo_imports(p)}
    assert callers == set(DEMO_CALLERS)
