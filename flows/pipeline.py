"""The end-to-end `pipeline` flow: every stage in order; on the demo config, with the demo's own steps and checks."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows import artifacts
from flows.stages import CurationResult, curate_flow, evaluate_flow, extract_flow, index_flow, report_flow, train_flow
from flows.tasks import HOUR, stage_task
from pipelines.config import Config, resolve_config
from pipelines.demo import ask as demo_ask
from pipelines.demo import base_lm
from pipelines.demo import check as demo_check
from pipelines.demo import data as demo_data
from pipelines.demo import mme as demo_mme
from pipelines.evaluate import stage as evaluate
from pipelines.evaluate.benchmark import BenchmarkResult
from pipelines.extract import stage as extract
from pipelines.index import stage as index
from pipelines.report import stage as report
from pipelines.train import stage as train


class PipelineResult(BaseModel):
    """What each stage produced, in order (stage 0, generated instructions and the check only on the demo)."""

    workspace: str
    curation: CurationResult
    extract: extract.ExtractResult
    index: index.IndexResult
    report: report.ReportResult
    base: base_lm.BaseLMResult | None
    stage1: train.TrainResult
    instructions: demo_data.InstructionsResult | None
    stage2: train.TrainResult
    evaluation: evaluate.EvalResult
    check: demo_check.DemoCheck | None
    answers: demo_ask.DemoAnswers | None
    mme: BenchmarkResult | None = None

    def summary(self) -> str:
        """Human lines, one block per stage."""
        c = self.curation
        blocks = [
            ("synthetic source", c.synthetic.summary() if c.synthetic else None),
            ("ingest", c.ingest.summary()),
            ("curate: the funnel", c.curate.summary()),
            ("download", c.download.summary()),
            ("extract", self.extract.summary()),
            ("visual cache index", self.index.summary()),
            ("report", self.report.summary()),
            ("stage 0: the demo's base LLaMA", self.base.summary() if self.base else None),
            ("stage 1: bind network, gates, prefix", self.stage1.summary()),
            ("stage 2 data", self.instructions.summary() if self.instructions else None),
            ("stage 2: LoRA, biases, norms", self.stage2.summary()),
            ("evaluate", self.evaluation.summary()),
            ("what the model says about held-out images", self.check.summary() if self.check else None),
            (
                "ibllm generate on a held-out picture and an audio clip",
                self.answers.summary() if self.answers else None,
            ),
            (
                "MME benchmark on synthetic pictures (ibllm evaluate --benchmark mme)",
                self.mme.summary() if self.mme else None,
            ),
            ("summary", self.table()),
        ]
        out = [f"workspace: {self.workspace}"]
        for name, text in blocks:
            if text is not None:
                out.append(f"\n== {name}")
                out.extend("   " + line for line in text.splitlines())
        return "\n".join(out)

    def table(self) -> str:
        """One line per stage: its main figure."""
        c, x, s1, s2, ev = self.curation, self.extract, self.stage1, self.stage2, self.evaluation
        kept = f"{sum(s.rows_in for s in c.curate.sources)} rows -> {sum(s.rows_out for s in c.curate.sources)}"
        images = sum(s.succeeded for s in c.download.sources)
        rows = [
            ("curate", kept),
            ("download", f"{images} images in {sum(s.shards for s in c.download.sources)} shards"),
            ("extract", f"{sum(s.rows for s in x.sources)} features ({x.encoder_id})"),
            ("index", f"{self.index.count} vectors, recall@10 {self.index.recall_at_10:.3f}"),
            ("stage 1", f"{s1.steps} steps, loss {s1.first_loss:.3f} -> {s1.final_loss:.3f}"),
            ("stage 2", f"{s2.steps} steps, loss {s2.first_loss:.3f} -> {s2.final_loss:.3f}"),
            ("evaluate", f"held-out loss {ev.loss:.3f}, grounding gap {ev.grounding_gap:+.3f}"),
        ]
        if self.check:
            rows.append(
                (
                    "check",
                    f"colour right {self.check.colour_accuracy:.0%} (shuffled "
                    f"{self.check.shuffled_accuracy:.0%}), answers {self.check.answer_accuracy:.0%}, "
                    f"second turn on topic {self.check.followup_on_topic:.0%}",
                )
            )
        if self.mme:
            scores = ", ".join(f"{r.subtask} {r.score:.0f}" for r in self.mme.rows if r.subtask != "perception")
            rows.append(("mme", f"{scores} of 200 each (chance ~75)"))
        return "\n".join(f"{name:<10} {text}" for name, text in rows)


@stage_task(name="base-llama", retries=1, timeout_seconds=6 * HOUR)
def base_task(cfg: Config, force: bool = False) -> base_lm.BaseLMResult:
    """Stage 0 (demo only): the base language model and tokenizer."""
    return base_lm.run(cfg, force=force)


@stage_task(name="instructions", timeout_seconds=2 * HOUR)
def instructions_task(cfg: Config) -> demo_data.InstructionsResult:
    """Generate the demo's stage-2 conversations about the training images."""
    return demo_data.run(cfg)


@stage_task(name="demo-mme", timeout_seconds=2 * HOUR)
def demo_mme_task(cfg: Config, checkpoint: str) -> BenchmarkResult:
    """The demo's small MME (synthetic pictures, yes/no questions) asked of the stage-2 model."""
    return demo_mme.run(cfg, checkpoint)


@stage_task(name="demo-check", timeout_seconds=2 * HOUR)
def check_task(cfg: Config, stage1: str, stage2: str) -> demo_check.DemoCheck:
    """Caption held-out images and answer the colour question about them."""
    return demo_check.run(cfg, stage1, stage2)


@stage_task(name="demo-ask", timeout_seconds=HOUR)
def ask_task(cfg: Config, checkpoint: str) -> demo_ask.DemoAnswers:
    """Ask about a held-out picture and an audio clip, with and without the visual cache."""
    return demo_ask.run(cfg, checkpoint)


def check_artifact(result: demo_check.DemoCheck) -> None:
    """What the model said about held-out images, as markdown."""
    create_markdown_artifact(
        "# Held-out images\n\n```\n" + result.summary() + "\n```",
        key="demo-check",
        description="Colour named in held-out captions, true vs shuffled features",
    )


@flow(name="ibllm-pipeline", log_prints=True)
def pipeline_flow(
    config: Config | str | None = None, overrides: list[str] | None = None, force: bool = False
) -> PipelineResult:
    """Curate, download, extract, index, report, train stage 1 and 2, evaluate (stage 0 and a check on the demo)."""
    cfg = resolve_config(config, overrides)
    demo = cfg.train.stage0 is not None
    cur = curate_flow(cfg, force=force)
    ext = extract_flow(cfg, force=force)
    idx = index_flow(cfg, force=force)
    rep = report_flow(cfg)
    base = base_task(cfg, force=force) if demo else None
    s1 = train_flow(cfg, stage=1)  # its demo hook finds stage 0 made above
    ins = instructions_task(cfg) if demo and not cfg.train.stage2.data else None
    s2 = train_flow(cfg, stage=2, init=s1.checkpoint)  # and these conversations
    ev = evaluate_flow(cfg, stage=1, checkpoint=s1.checkpoint)
    check = answers = mme = None
    if demo:
        check = check_task(cfg, s1.checkpoint, s2.checkpoint)
        check_artifact(check)  # the check's examples and the answers: in the result (and its summary)
        answers = ask_task(cfg, s2.checkpoint)
        mme = demo_mme_task(cfg, s2.checkpoint)
        artifacts.benchmark(mme)
    return PipelineResult(
        workspace=cfg.workspace,
        curation=cur,
        extract=ext,
        index=idx,
        report=rep,
        base=base,
        stage1=s1,
        instructions=ins,
        stage2=s2,
        evaluation=ev,
        check=check,
        answers=answers,
        mme=mme,
    )
