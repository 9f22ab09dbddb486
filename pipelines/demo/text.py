"""The synthetic source's language: its caption grammar, the demo's questions, stage 0's corpus, stage 2's data."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from model.llm.prompts import CAPTION_INSTRUCTION, format_prompt
from pipelines.demo.synthetic_media import Scene, parse_caption, random_scene

# (instruction, answer) of the demo's instruction data; the first is the one `ibllm demo` asks
QUESTIONS: tuple[tuple[str, Callable[[Scene], str]], ...] = (
    ("What colour is the shape?", lambda s: f"The shape is {s.color}."),
    ("What shape is it?", lambda s: f"It is a {s.shape}."),
    ("Is the shape large or small?", lambda s: f"It is {s.size}."),
    ("What colour is the background?", lambda s: f"The background is {s.background}."),
    (CAPTION_INSTRUCTION, lambda s: s.caption),
)


def corpus(n: int, seed: int) -> list[str]:
    """Stage 0's text: `n` prompts with their answers about random scenes (half captions, half questions)."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        scene = random_scene(rng)
        if rng.random() < 0.5:
            texts.append(format_prompt(CAPTION_INSTRUCTION) + scene.caption)
        else:
            question, answer = QUESTIONS[int(rng.integers(len(QUESTIONS) - 1))]
            texts.append(format_prompt(question) + answer(scene))
    return texts


def conversations(rows: Iterable[tuple[str, str]]) -> list[dict]:
    """LLaVA-Instruct records for (image name, caption) rows: one multi-turn conversation per image.

    Rows whose caption is not a synthetic one are skipped.
    """
    records = []
    for image, caption in rows:
        scene = parse_caption(caption)
        if scene is None:
            continue
        turns = []
        for i, (question, answer) in enumerate(QUESTIONS):
            turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
            turns.append({"from": "gpt", "value": answer(scene)})
        records.append({"id": image, "image": image, "conversations": turns})
    return records
