"""`ibllm evaluate --benchmark`: a benchmark's questions answered through the engine, resumable, scored, reported."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Sequence
from dataclasses import asdict

from pydantic import BaseModel

from pipelines.config import Config
from pipelines.config.names import BENCHMARKS, ZERO_SHOT
from pipelines.errors import InputError
from pipelines.evaluate import page
from pipelines.evaluate.questions import (
    Benchmark,
    Scored,
    read_captions_benchmark,
    read_mme_benchmark,
    read_vqa_benchmark,
)
from pipelines.runtime import checkpoints, loader
from stores.workspace import Workspace

log = logging.getLogger(__name__)
EVALUATIONS = "evaluations"  # workspace folder: <benchmark>/<key>/{spec.json, answers/part-*.jsonl, results...}
RECORD = "record.json"  # the catalog's rows of one benchmark evaluation (written last)


class EvalRow(BaseModel):
    """A row of the catalog's `evaluations` view: one benchmark, subtask and checkpoint."""

    benchmark: str
    subtask: str
    checkpoint: str
    stage: int | None = None
    run_id: str | None = None
    score: float
    questions: int
    accuracy: float | None = None
    accuracy_plus: float | None = None
    unparseable: int | None = None
    bleu4: float | None = None
    top5: float | None = None
    data: str
    cache: bool = False
    evaluated_at: str


class BenchmarkResult(BaseModel):
    """What a benchmark evaluation asked, how much of it was already answered, its rows and its files."""

    benchmark: str
    data: str
    checkpoint: str
    questions: int
    asked_now: int
    resumed: int
    errors: int  # questions whose inputs could not be read: scored as unanswered
    score_name: str
    headline: str
    rows: list[EvalRow]
    results: str
    report: str
    seconds: float

    def summary(self) -> str:
        header = f"{'subtask':<24} {'score':>9} {'questions':>9} {'accuracy':>9} {'acc+':>7} {'unparsed':>8}"
        lines = [f"{self.benchmark} on {self.data}: {self.headline}", header]
        for r in self.rows:
            acc, plus = _num(r.accuracy, 9), _num(r.accuracy_plus, 7)
            lines.append(f"{r.subtask:<24} {r.score:9.2f} {r.questions:9d} {acc} {plus} {_num(r.unparseable, 8)}")
        lines.append(
            f"({self.score_name}; {self.asked_now} asked now, {self.resumed} resumed, {self.errors} "
            f"unreadable; report {self.report})"
        )
        return "\n".join(lines)


def _num(value: float | None, width: int) -> str:
    if value is None:
        return " " * (width - 1) + "-"
    return f"{value:{width}d}" if isinstance(value, int) else f"{value:{width}.2f}"


def read_benchmark(name: str, data: str, images: str | None = None, subtasks: Sequence[str] | None = None) -> Benchmark:
    """A benchmark's questions and scorer from its files; InputError naming the path when they cannot be read."""
    if name == "mme":
        return read_mme_benchmark(data, subtasks)
    if subtasks:
        raise InputError(f"--subtasks is for mme; {name} has none")
    if name == "vqa":
        return read_vqa_benchmark(data)
    if name == "captions":
        return read_captions_benchmark(data, images)
    raise InputError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")


def evaluation_key(checkpoint: str, data: str, cache: bool, limit: int | None, subtasks: Sequence[str] | None) -> str:
    """Names one evaluation's folder: the same checkpoint, data and options (locations as records keep them)
    resume into the same answers."""
    spec = json.dumps([checkpoint, data, cache, limit, sorted(subtasks or [])])
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


class Answers:
    """The answers given so far, one JSON-lines part file per chunk (written atomically), so a killed run resumes."""

    def __init__(self, ws: Workspace, folder: str) -> None:
        self.ws, self.folder = ws, folder
        self.given: dict[str, dict] = {}
        parts = ws.glob(posixpath.join(folder, "answers", "part-*.jsonl"))
        for path in parts:
            for line in ws.read_bytes(path).decode().splitlines():
                doc = json.loads(line)
                self.given[doc["qid"]] = doc
        self.parts = len(parts)

    def add(self, docs: list[dict]) -> None:
        """Commit a chunk of answers: {"qid", "answer"} or {"qid", "error"}."""
        body = "".join(json.dumps(d) + "\n" for d in docs).encode()
        self.ws.write_bytes(posixpath.join(self.folder, "answers", f"part-{self.parts:06d}.jsonl"), body)
        self.parts += 1
        self.given.update({d["qid"]: d for d in docs})


def run(
    cfg: Config,
    benchmark: str,
    data: str,
    limit: int | None = None,
    subtasks: Sequence[str] | None = None,
    images: str | None = None,
) -> BenchmarkResult:
    """Answer every question of `benchmark` (its first `limit`) with the model of the runtime (`infer.checkpoint`,
    default: the promoted model, else the newest run; `infer.use_cache`), greedily and `infer.batch` at a time
    through the engine; answers are committed chunk by chunk, so a
    rerun asks only what is left. Writes the results JSON, the HTML report and the catalog record (last)."""
    start = time.perf_counter()
    if benchmark in ZERO_SHOT:
        raise InputError(
            f"{benchmark} checks the encoder: run it with `ibllm evaluate --benchmark {benchmark}` "
            "(pipelines.evaluate.zeroshot)"
        )
    if not os.path.exists(data):
        raise InputError(f"--data {data} does not exist")
    bench = read_benchmark(benchmark, data, images, subtasks)
    questions = bench.questions[:limit] if limit else bench.questions
    if not questions:
        raise InputError(f"{data}: no questions")
    ws = Workspace(cfg.workspace, cfg.storage_options)
    chosen = checkpoints.choose(ws, cfg.infer.checkpoint)
    cache, batch = cfg.infer.use_cache, cfg.infer.batch
    # the records name workspace files relative to its root: a moved or copied workspace finds its evaluations
    recorded, recorded_data = ws.to_record(chosen), ws.to_record(os.path.abspath(data))
    folder = ws.path(EVALUATIONS, benchmark, evaluation_key(recorded, recorded_data, cache, limit, subtasks))
    spec = {
        "benchmark": benchmark,
        "data": recorded_data,
        "checkpoint": recorded,
        "cache": cache,
        "limit": limit,
        "subtasks": list(subtasks or []),
        "questions": len(questions),
    }
    ws.write_bytes(posixpath.join(folder, "spec.json"), json.dumps(spec, indent=1).encode())
    answers = Answers(ws, folder)
    todo = [q for q in questions if q.qid not in answers.given]
    resumed = len(questions) - len(todo)
    if resumed:
        log.info(
            "%s: %d of %d questions answered before; asking the other %d", benchmark, resumed, len(questions), len(todo)
        )
    if todo:
        loaded = loader.load(cfg, need_encoder=True, slots=min(batch, len(todo)), chosen=chosen)
        answerer, trained = loaded.answerer, loaded.trained
        chunk = 4 * batch
        for at in range(0, len(todo), chunk):
            part = todo[at : at + chunk]
            given = answerer.answer_all([q.request for q in part])
            answers.add(
                [
                    {"qid": q.qid, "error": str(a)} if isinstance(a, InputError) else {"qid": q.qid, "answer": a.text}
                    for q, a in zip(part, given, strict=True)
                ]
            )
            log.info("%s: %d of %d questions answered", benchmark, resumed + at + len(part), len(questions))
    given = {q.qid: answers.given[q.qid].get("answer") for q in questions}
    errors = sum("error" in answers.given[q.qid] for q in questions)
    scored = bench.score(given)
    made_by = (trained if todo else checkpoints.inspect(cfg, ws, chosen)).made_by
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = [
        EvalRow(
            **asdict(r),
            benchmark=benchmark,
            checkpoint=recorded,
            stage=made_by.get("stage"),
            run_id=made_by.get("run_id"),
            data=recorded_data,
            cache=cache,
            evaluated_at=stamp,
        )
        for r in scored.rows
    ]
    results, report = _write(ws, folder, bench, questions, answers.given, scored, rows)
    return BenchmarkResult(
        benchmark=benchmark,
        data=data,
        checkpoint=chosen,
        questions=len(questions),
        asked_now=len(todo),
        resumed=resumed,
        errors=errors,
        score_name=scored.score_name,
        headline=scored.summary,
        rows=rows,
        results=results,
        report=report,
        seconds=round(time.perf_counter() - start, 3),
    )


def _write(
    ws: Workspace,
    folder: str,
    bench: Benchmark,
    questions: list,
    given: dict[str, dict],
    scored: Scored,
    rows: list[EvalRow],
) -> tuple[str, str]:
    """results.json (rows and every answer), report.html, then the catalog record, last."""
    answers = [
        {
            "qid": q.qid,
            "subtask": q.subtask,
            "prompt": q.request.prompt,
            "expected": q.expected,
            **{k: v for k, v in given[q.qid].items() if k != "qid"},
        }
        for q in questions
    ]
    doc = {"rows": [r.model_dump() for r in rows], "summary": scored.summary, "answers": answers}
    results = posixpath.join(folder, "results.json")
    ws.write_bytes(results, json.dumps(doc, indent=1).encode())
    by_id = {q.qid: q for q in questions}
    wrong = [by_id[qid] for qid in scored.wrong if qid in by_id][: page.EXAMPLES]
    html = page.render(bench.name, scored, rows, [(q, given[q.qid]) for q in wrong])
    report = posixpath.join(folder, "report.html")
    ws.write_bytes(report, html.encode())
    ws.write_bytes(posixpath.join(folder, RECORD), json.dumps([r.model_dump() for r in rows], indent=1).encode())
    return ws.as_url(results), ws.as_url(report)
