"""What each benchmark asks the model (MME, a VQA set, COCO-style captions) and how its answers are scored."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model.llm.prompts import CAPTION_INSTRUCTION
from pipelines.errors import InputError
from pipelines.evaluate import captions, mme, vqa
from pipelines.runtime.inputs import Request

MME_MAX_TOKENS = 30  # LLaMA-Adapter's MME script: greedy, at most 30 new tokens
VQA_MAX_TOKENS = 30
CAPTION_MAX_TOKENS = 64


@dataclass(frozen=True)
class Asked:
    """One question of a benchmark: its id, the request asked, and what a report shows of it."""

    qid: str
    request: Request
    subtask: str
    expected: str  # the reference answer (captions: the first reference)
    picture: str | None  # an image the report may show beside the answer


@dataclass(frozen=True)
class Row:
    """One scored line of a benchmark: a subtask (or "all"), its headline score and the figures behind it."""

    subtask: str
    score: float
    questions: int
    accuracy: float | None = None
    accuracy_plus: float | None = None
    unparseable: int | None = None
    bleu4: float | None = None


@dataclass(frozen=True)
class Scored:
    """A benchmark's rows, a one-line summary, and the answers judged wrong (for the report)."""

    rows: list[Row]
    summary: str
    wrong: list[str]  # qids
    score_name: str  # what `score` is: "MME score (max 200)", "accuracy %", "CIDEr-D"


@dataclass(frozen=True)
class Benchmark:
    """A benchmark read from its files: the questions and the scorer of {qid: answer or None (no answer)}."""

    name: str
    questions: list[Asked]
    score: Callable[[dict[str, str | None]], Scored]


def _greedy(**fields: object) -> Request:
    return Request(temperature=0.0, seed=0, **fields)


def read_mme_benchmark(data: str, subtasks: Sequence[str] | None = None) -> Benchmark:
    """MME's released folder: every question asked greedily with its image (`mme.mme_prompt`)."""
    questions = mme.read_mme(data, subtasks)
    by_id = {q.qid: q for q in questions}
    asked = [
        Asked(
            q.qid,
            _greedy(image=[q.image], prompt=mme.mme_prompt(q.question), max_new_tokens=MME_MAX_TOKENS),
            q.subtask,
            q.answer,
            q.image,
        )
        for q in questions
    ]

    def score(answers: dict[str, str | None]) -> Scored:
        parsed = {qid: mme.parse_yes_no(a) if a is not None else None for qid, a in answers.items()}
        result = mme.score_mme((by_id[qid], parsed[qid]) for qid in by_id if qid in answers)
        rows = [
            Row(s.subtask, s.score, s.questions, s.accuracy, s.accuracy_plus, s.unparseable)
            for s in result.subtasks.values()
        ]
        totals = [
            ("perception", result.perception, result.perception_subtasks, mme.PERCEPTION),
            ("cognition", result.cognition, result.cognition_subtasks, mme.COGNITION),
        ]
        for name, value, covered, names in totals:
            if covered:
                n = sum(s.questions for s in result.subtasks.values() if s.subtask in names)
                rows.append(Row(name, value, n))
        wrong = [qid for qid, p in parsed.items() if p != by_id[qid].answer]
        return Scored(rows, result.summary(), wrong, "MME score (accuracy + accuracy+, max 200 a subtask)")

    return Benchmark("mme", asked, score)


def read_vqa_benchmark(data: str) -> Benchmark:
    """A JSONL question set (`vqa.read_vqa`): choices lettered, yes/no and open questions as written."""
    items = vqa.read_vqa(data)
    by_id = {i.qid: i for i in items}
    asked = []
    for item in items:
        prompt = vqa.choice_prompt(item) if item.choices else item.question
        picture = (item.inputs.get("image") or [None])[0]
        asked.append(
            Asked(
                item.qid,
                _greedy(prompt=prompt, max_new_tokens=VQA_MAX_TOKENS, **item.inputs),
                item.kind,
                item.answer,
                picture,
            )
        )

    def score(answers: dict[str, str | None]) -> Scored:
        records = [(by_id[qid], answers[qid] or "") for qid in by_id if qid in answers]
        result = vqa.score_vqa(records)
        rows = [
            Row(kind, r["accuracy"], r["questions"], r["accuracy"], None, r["unparseable"])
            for kind, r in result["by_kind"].items()
        ]
        total = Row("all", result["accuracy"], result["questions"], result["accuracy"], None, result["unparseable"])
        rows.append(total)
        wrong = [item.qid for item, answer in records if not vqa.judge(item, answer)[0]]
        summary = f"VQA accuracy {result['accuracy']:.2f}% of {result['questions']} questions"
        return Scored(rows, summary, wrong, "accuracy %")

    return Benchmark("vqa", asked, score)


def read_captions_benchmark(data: str, images: str | None = None) -> Benchmark:
    """A COCO captions annotation file (`images` with `id` and `file_name`, `annotations` with `image_id` and
    `caption`): each image captioned with the caption instruction, scored by BLEU-1..4 and CIDEr-D. Images are
    found under `images` (default: the annotation file's folder)."""
    references, files = captions.read_coco(data)
    folder = images or os.path.dirname(os.path.abspath(data))
    asked = []
    for image_id in sorted(references, key=lambda i: (len(i), i)):
        if image_id not in files:
            raise InputError(f"{data}: image {image_id} has captions but no entry in `images` (id, file_name)")
        path = os.path.join(folder, files[image_id])
        if not os.path.isfile(path):
            raise InputError(f"{data}: image {image_id}'s file {path} does not exist (--images sets the folder)")
        request = _greedy(image=[path], prompt=CAPTION_INSTRUCTION, max_new_tokens=CAPTION_MAX_TOKENS)
        asked.append(Asked(image_id, request, "all", references[image_id][0], path))

    def score(answers: dict[str, str | None]) -> Scored:
        candidates = {i: answers[i] or "" for i in references if i in answers}
        refs = {i: references[i] for i in candidates}
        if len(candidates) < 2:
            raise InputError(f"{data}: CIDEr-D needs at least 2 captioned images, got {len(candidates)}")
        bleu = captions.bleu(candidates, refs)
        cider, per_image = captions.cider_d(candidates, refs)
        order = sorted(per_image, key=per_image.get)
        rows = [Row("all", cider, len(candidates), bleu4=bleu[3])]
        bleus = ", ".join(f"{b:.3f}" for b in bleu)
        summary = f"captions: CIDEr-D {cider:.3f}, BLEU-1..4 {bleus} on {len(candidates)} images"
        return Scored(rows, summary, order[: max(1, len(order) // 4)], "CIDEr-D")

    return Benchmark("captions", asked, score)
