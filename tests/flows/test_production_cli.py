"""A production configuration through the command line's stages: no module of the demo (pipelines.demo) is loaded."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from model.imagebind.tokenizer import learn_merges, write_vocab

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
STAGES = ("ingest", "curate", "download", "extract")
SCRIPT = """
import json, sys
from flows.cli import main
for stage in sys.argv[2:]:
    code = main([stage, "-c", sys.argv[1]])
    if code:
        sys.exit(f"{stage} exited with {code}")
print("demo modules: " + json.dumps(sorted(m for m in sys.modules if m.startswith("pipelines.demo"))))
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def image_site(tmp_path: Path) -> Iterator[str]:
    """A loopback HTTP server over a folder of small seeded pictures; yields its base URL."""
    site = tmp_path / "site"
    site.mkdir()
    rng = np.random.default_rng(7)
    for i, (name, rgb) in enumerate(sorted(COLOURS.items()) * 3):
        pixels = np.clip(np.array(rgb) + rng.integers(-20, 20, (64, 80, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(site / f"{name}-{i}.png")
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def production_config(tmp_path: Path, image_site: str) -> Path:
    """A generic csv source on the loopback site, tiny ImageBind with its own vocabulary, no synthetic source and no
    stage 0: nothing of the demo is asked for."""
    site = tmp_path / "site"
    rows = [f"{image_site}/{p.name},a {p.name.split('-')[0]} picture of noise" for p in sorted(site.glob("*.png"))]
    (tmp_path / "meta.csv").write_text("url,caption\n" + "\n".join(rows) + "\n")
    vocab = tmp_path / "vocab.txt.gz"
    write_vocab(vocab, learn_merges([r.split(",", 1)[1] for r in rows] * 4, 60))
    cfg = {
        "workspace": str(tmp_path / "ws"),
        "sources": [{"name": "web", "format": "generic", "paths": [str(tmp_path / "meta.csv")]}],
        "download": {
            "image_size": 64,
            "processes": 1,
            "threads": 4,
            "timeout": 5.0,
            "retries": 0,
            "samples_per_shard": 8,
            "allow_private_addresses": True,
        },
        "extract": {"batch_size": 8, "actors": 1, "dtype": "float32"},
        "model": {"imagebind": "tiny", "llama": "tiny", "imagebind_vocab": str(vocab)},
    }
    path = tmp_path / "production.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_production_stages_never_load_the_demo(production_config: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(production_config), *STAGES],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ.copy(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "ws" / "features").rglob("part-*.parquet"))  # every stage did its work
    line = next(x for x in proc.stdout.splitlines() if x.startswith("demo modules: "))
    assert json.loads(line.removeprefix("demo modules: ")) == []
