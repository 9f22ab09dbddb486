"""The demo's small MME: synthetic pictures with MME-style yes/no questions, in MME's two released folder layouts."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from pipelines.config import Config, with_settings
from pipelines.demo import synthetic_media as media
from pipelines.demo.text import yes_no
from pipelines.evaluate import benchmark
from stores.workspace import Workspace

PICTURES = 8  # per subtask: 16 questions each, 8 answered yes and 8 no


def write(folder: str, seed: int, pictures: int = PICTURES) -> str:
    """Write `color` (pictures with a same-stem .txt beside each) and `existence` (`images/` and
    `questions_answers_YN/`) under `folder`: new random scenes (not the source's), each asked one question whose
    answer is yes and one whose answer is no. Deterministic in `seed`; returns `folder`."""
    rng = np.random.default_rng(seed * 7919 + 17)
    color, existence = os.path.join(folder, "color"), os.path.join(folder, "existence")
    for path in (color, os.path.join(existence, "images"), os.path.join(existence, "questions_answers_YN")):
        os.makedirs(path, exist_ok=True)
    for i in range(pictures):
        scene = media.random_scene(rng)
        img = media.draw_shape(
            (224, 224), scene.shape, scene.color, scene.background, media.SCALES[scene.size], int(rng.integers(1 << 30))
        )
        name = f"{i:03d}"
        img.save(os.path.join(color, f"{name}.png"))
        img.save(os.path.join(existence, "images", f"{name}.png"))
        for where, kind in ((color, 0), (os.path.join(existence, "questions_answers_YN"), 1)):
            lines = []
            for pick in (kind + 4 * i, kind + 2 + 4 * i):  # the true value, then another one
                question, answer = yes_no(scene, pick)
                lines.append(f"{question}\t{answer.rstrip('.')}\n")
            _write_text(os.path.join(where, f"{name}.txt"), "".join(lines))
    return folder


def _write_text(path: str, text: str) -> None:
    """Write only when different (a rerun leaves the files, and their times, as they are)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run(cfg: Config, checkpoint: str) -> benchmark.BenchmarkResult:
    """Write the demo's MME (in the workspace's synthetic/mme, or a temporary folder for a remote workspace) and
    run the MME benchmark on it with `checkpoint` (a rerun finds every answer given and only scores)."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    folder = ws.synthetic("mme") if ws.is_local else os.path.join(tempfile.gettempdir(), f"ibllm-demo-mme-{cfg.seed}")
    write(folder, cfg.seed)
    return benchmark.run(with_settings(cfg, {"infer.checkpoint": checkpoint}), "mme", folder)
