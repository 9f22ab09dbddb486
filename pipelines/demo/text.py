"""The synthetic source's language: its caption grammar, the demo's questions, stage 0's corpus, stage 2's data."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from model.llm.prompts import CAPTION_INSTRUCTION, format_prompt
from pipelines.demo.synthetic_media import COLORS, SHAPES, Scene, parse_caption, random_scene

# (instruction, answer) of the demo's instruction data; the first is the one `ibllm demo` asks
QUESTIONS: tuple[tuple[str, Callable[[Scene], str]], ...] = (
    ("What colour is the shape?", lambda s: f"The shape is {s.color}."),
    ("What shape is it?", lambda s: f"It is a {s.shape}."),
    ("Is the shape large or small?", lambda s: f"It is {s.size}."),
    ("What colour is the background?", lambda s: f"The background is {s.background}."),
    (CAPTION_INSTRUCTION, lambda s: s.caption),
)


YES_OR_NO = "Please answer yes or no."  # MME's suffix: the demo's yes/no questions are asked as MME asks


def yes_no(scene: Scene, pick: int) -> tuple[str, str]:
    """An MME-style yes/no question about a scene and its answer: its colour (`pick` even) or whether a shape is
    there (odd), asked of the true value or of another one in turn (so half the answers are no)."""
    truthful = (pick // 2) % 2 == 0
    if pick % 2 == 0:
        colour = scene.color if truthful else _other(tuple(COLORS), scene.color, pick)
        return f"Is the shape {colour}? {YES_OR_NO}", "Yes." if truthful else "No."
    shape = scene.shape if truthful else _other(SHAPES, scene.shape, pick)
    return f"Is there a {shape} in the image? {YES_OR_NO}", "Yes." if truthful else "No."


def _other(names: tuple[str, ...], name: str, pick: int) -> str:
    """A name other than `name`, chosen by `pick`."""
    rest = [n for n in names if n != name]
    return rest[pick // 4 % len(rest)]


def corpus(n: int, seed: int) -> list[str]:
    """Stage 0's text: `n` prompts with their answers about random scenes (half captions, half questions, some of
    them yes/no)."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        scene = random_scene(rng)
        if rng.random() < 0.5:
            texts.append(format_prompt(CAPTION_INSTRUCTION) + scene.caption)
            continue
        k = int(rng.integers(len(QUESTIONS)))  # the last: a yes/no question in place of the caption instruction
        question, answer = yes_no(scene, int(rng.integers(4))) if k == len(QUESTIONS) - 1 else QUESTIONS[k]
        texts.append(format_prompt(question) + (answer if isinstance(answer, str) else answer(scene)))
    return texts


def conversations(rows: Iterable[tuple[str, str]]) -> list[dict]:
    """LLaVA-Instruct records for (image name, caption) rows: one multi-turn conversation per image.

    The questions are QUESTIONS with one yes/no question (`yes_no`, the kinds in turn) before the caption. Rows whose
    caption is not a synthetic one are skipped.
    """
    records = []
    for image, caption in rows:
        scene = parse_caption(caption)
        if scene is None:
            continue
        said = [(q, a(scene)) for q, a in QUESTIONS]
        said.insert(len(said) - 1, yes_no(scene, len(records)))
        turns = []
        for i, (question, answer) in enumerate(said):
            turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
            turns.append({"from": "gpt", "value": answer})
        records.append({"id": image, "image": image, "conversations": turns})
    return records
