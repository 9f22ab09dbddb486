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


def test_flows_reach_the_demo_from_two_places() -> None:
    """Flows, tasks and the CLI call stages only: pipelines.demo is imported by the demo hook's one call site
    (flows/demo_hook.py) and the demo flow (flows/pipeline.py), nowhere else in flows/."""
    importers = {str(p.relative_to(ROOT)) for p in sorted((ROOT / "flows").rglob("*.py")) if demo_imports(p)}
    assert importers == set(DEMO_CALLERS)
