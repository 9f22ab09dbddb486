"""Evaluate a checkpoint on the held-out captions: loss, perplexity, and the loss with features shuffled."""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Iterator, Sequence

import torch
from pydantic import BaseModel, Field

from model.imagebind.encoder import encoder_id_for
from model.llm.model import ImageBindLLM
from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.runtime import checkpoints
from pipelines.train.data import CAPTION_PROMPT, Example, ExampleSource, FeatureCaptions, micro_batch
from pipelines.train.setup import stage1_features
from stores.features import read_pairs
from stores.runs import EXTERNAL, Runs
from stores.workspace import Workspace

log = logging.getLogger(__name__)


class EvalResult(BaseModel):
    """Held-out metrics of one checkpoint; `grounding_gap` > 0 says the visual path carries information."""

    benchmark: str = "heldout"  # the catalog's `evaluations` view also holds benchmark rows (mme, vqa, ...)
    stage: int
    run_id: str
    checkpoint: str
    examples: int
    tokens: int
    loss: float
    perplexity: float
    shuffled_loss: float
    grounding_gap: float
    evaluated_at: str
    seconds: float
    heldout: str = Field("split", description="'split' (train.holdout's uid hash) or 'uids' (a given uid list)")

    def summary(self) -> str:
        return (
            f"evaluate stage {self.stage} run {self.run_id}: {self.examples} held-out captions, loss "
            f"{self.loss:.4f} (perplexity {self.perplexity:.2f}), with shuffled features {self.shuffled_loss:.4f} "
            f"(gap {self.grounding_gap:+.4f})"
        )


@torch.no_grad()
def held_out_losses(model: ImageBindLLM, batches: list, device: torch.device) -> tuple[float, float, int]:
    """(loss, loss with features shuffled across the held-out set, answer tokens) as token means."""
    model.eval().to(device)
    features = torch.cat([m.features for m in batches])
    shuffled = features.roll(1, dims=0)  # every sample gets another sample's feature
    true_sum = fake_sum = 0.0
    tokens, at = 0, 0
    for m in batches:
        ids, labels = m.input_ids.to(device), m.labels.to(device)
        n = len(ids)
        true_sum += float(model(ids, m.features.to(device), labels=labels, sum_loss=True).loss)
        fake_sum += float(model(ids, shuffled[at : at + n].to(device), labels=labels, sum_loss=True).loss)
        tokens += m.tokens
        at += n
    if tokens == 0:
        raise InputError("the held-out captions have no answer tokens within max_words")
    return true_sum / tokens, fake_sum / tokens, tokens


class UidCaptions:
    """The (feature, caption) rows of a fixed uid list, in the list's order (a yardstick that new data never moves)."""

    def __init__(self, ws: Workspace, files: Sequence[str], uids: Sequence[str]) -> None:
        wanted = {u: i for i, u in enumerate(uids)}
        found: dict[str, Example] = {}
        for path in files:
            part_uids, captions, emb = read_pairs(ws, path)
            for uid, caption, feature in zip(part_uids, captions, emb, strict=True):
                if uid in wanted and uid not in found:
                    found[uid] = Example(feature, CAPTION_PROMPT, str(caption), uid)
        if len(found) < len(wanted):
            log.warning(
                "%d of %d held-out uids are not in the features: evaluating on the other %d",
                len(wanted) - len(found),
                len(wanted),
                len(found),
            )
        self.examples = sorted(found.values(), key=lambda e: wanted[e.key])
        self.size = len(self.examples)

    def iterate(self, epoch: int) -> Iterator[Example]:
        return iter(self.examples)


def run(
    cfg: Config,
    stage: int = 1,
    batch_size: int = 32,
    uids: Sequence[str] | None = None,
) -> EvalResult:
    """Evaluate `infer.checkpoint` (default: the newest complete run of `stage`) on the held-out split of stage 1's
    features (`train.holdout`), or on the rows of the given `uids` only, and record the metrics beside the run
    (the catalog's `evaluations` view)."""
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    given = cfg.infer.checkpoint
    checkpoint = checkpoints.resolve(ws, given) if given else Runs.of_stage(ws, stage).newest_complete()
    if checkpoint is None:
        raise InputError(f"no complete stage-{stage} run to evaluate: run `ibllm train --stage {stage}` first")
    log.info("evaluating %s (%s)", checkpoint, f"given: {given}" if given else f"the newest complete stage-{stage} run")
    trained = checkpoints.inspect(cfg, ws, checkpoint)
    model, tokenizer = checkpoints.load(cfg, ws, trained)
    made_by = trained.made_by
    stage = int(made_by.get("stage") or stage)  # the training run that wrote it: its stage and run id, not the caller's
    m = cfg.model
    feature_files = stage1_features(cfg, ws, encoder_id_for(m.imagebind, m.imagebind_checkpoint, cfg.seed))
    holdout, max_words = cfg.train.holdout, cfg.train.stage1.max_words
    source: ExampleSource
    if uids is not None:
        source = UidCaptions(ws, feature_files, uids)
        if source.size < 2:
            raise InputError(f"{source.size} of the {len(uids)} held-out uids are in the features: too few to evaluate")
    else:
        source = FeatureCaptions(ws, feature_files, cfg.seed, holdout=holdout, split="heldout")
        if source.size < 2:
            raise InputError(f"{source.size} held-out captions: raise train.holdout ({holdout}) to evaluate")
    examples = list(source.iterate(0))  # every held-out sample, the last partial batch too
    pad = model.config.pad_id
    batches = [
        micro_batch(examples[i : i + batch_size], tokenizer, max_words, pad)
        for i in range(0, len(examples), batch_size)
    ]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss, shuffled, tokens = held_out_losses(model, batches, device)
    run_id = str(made_by.get("run_id") or os.path.basename(checkpoint.rstrip("/")))
    result = EvalResult(
        stage=stage,
        run_id=run_id,
        checkpoint=checkpoint,
        examples=sum(len(m.input_ids) for m in batches),
        tokens=tokens,
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        shuffled_loss=shuffled,
        grounding_gap=shuffled - loss,
        evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        seconds=time.perf_counter() - start,
        heldout="split" if uids is None else "uids",
    )
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"  # two evaluations in a second: two records
    runs = Runs.of_stage(ws, stage if made_by.get("run_id") else EXTERNAL)  # external: no run of this workspace
    recorded = result.model_copy(update={"checkpoint": ws.to_record(checkpoint)})  # a moved workspace: still right
    runs.record_evaluation(run_id, stamp, recorded.model_dump_json(indent=1).encode())
    return result
