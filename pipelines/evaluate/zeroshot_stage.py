"""`ibllm evaluate --benchmark zeroshot-*`: the configured encoder classifies a labelled set; results and record."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time

from pipelines import assets
from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.evaluate.benchmark import EVALUATIONS, RECORD, EvalRow, evaluation_key
from pipelines.evaluate.zeroshot import ZeroShotResult, classify, read_labelled
from pipelines.runtime.encoders import configured_encoder
from stores.workspace import Workspace

log = logging.getLogger(__name__)


def run(cfg: Config, kind: str, data: str, limit: int | None = None) -> ZeroShotResult:
    """Classify `data` (ImageNet layout for images, ESC-50 for audio, ModelNet40 for point clouds) with the
    configured ImageBind (`model.imagebind_checkpoint`, `model.point_checkpoint`, `model.imagebind_vocab`) by text
    prompts, `infer.batch` samples at a time on `infer.device`; writes results.json and the catalog rows (top-1 as
    the score) under evaluations/zeroshot-<kind>/."""
    if not os.path.exists(data):
        raise InputError(f"--data {data} does not exist")
    labelled = read_labelled(kind, data)
    ws = Workspace(cfg.workspace, cfg.storage_options)
    vocab = assets.clip_vocab_file(cfg, ws)
    if vocab is None:
        raise InputError(
            "zero-shot checks embed class prompts: set model.imagebind_vocab (bpe_simple_vocab_16e6.txt.gz)"
        )
    m = cfg.model
    encoder = configured_encoder(cfg, ws, cfg.infer.device, cfg.infer.dtype)
    last = [time.time()]

    def progress(done: int, total: int) -> None:
        if done == total or time.time() - last[0] > 10:
            last[0] = time.time()
            log.info("zero-shot %s: %d of %d samples", kind, done, total)

    batch = cfg.infer.batch
    result = classify(
        encoder,
        labelled,
        batch_size=batch,
        limit=limit,
        max_pixels=m.max_image_pixels,
        seed=cfg.seed,
        progress=progress,
    )
    name = f"zeroshot-{kind}"
    recorded_data = ws.to_record(os.path.abspath(data))
    folder = ws.path(EVALUATIONS, name, evaluation_key(encoder.encoder_id, recorded_data, False, limit, None))
    ws.write_bytes(posixpath.join(folder, "results.json"), result.model_dump_json(indent=1).encode())
    row = EvalRow(
        benchmark=name,
        subtask="all",
        checkpoint=encoder.encoder_id,
        score=result.top1,
        questions=result.samples,
        accuracy=result.top1,
        top5=result.top5,
        data=recorded_data,
        evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    ws.write_bytes(posixpath.join(folder, RECORD), json.dumps([row.model_dump()], indent=1).encode())
    return result
