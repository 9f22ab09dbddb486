"""The demo's one hook: what the demo configuration needs made or served around a production stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from pipelines.config import Config

Stage = Literal["synthetic", "curation", "download", "extract", "base", "train", "retrain"]


@contextlib.contextmanager
def prepare(
    cfg: Config, stage: Stage, *, force: bool = False, base_url: str | None = None, train_stage: int = 1
) -> Iterator[Any]:
    """Make or serve what the demo needs around `stage`, and yield what it made (else None).

    It is switched on by the demo configuration (configs/demo.yaml): a config with a `synthetic`-format source or
    with `train.stage0` set. The flows and the command line call it from one place, `flows/demo_hook.py`, and only
    on such a config (the demo's own stages, `synthetic` and `base`, on any config), so that a production run never
    imports `pipelines.demo`. Each stage imports only the demo modules it uses. Per stage:

    - synthetic: write the synthetic source (`force`) for the server at `base_url`, or else for a server of its own
      that keeps serving it while the caller's block runs (`ibllm synthetic --serve`); yields its SyntheticResult.
    - curation: the curate flow's server for the synthetic source, started (the flow writes the source for its
      address, then ingests, curates and downloads while it serves); None without a synthetic source.
    - download: serve the synthetic source written before, on the port its metadata names; None without one.
    - extract: learn the CLIP vocabulary from the curated captions on a small preset without
      `model.imagebind_vocab` (pipelines/demo/vocab.py).
    - base: stage 0 itself, the demo's base LLaMA and tokenizer (`force`); yields its BaseLMResult.
    - train: before `train_stage`, stage 0's base and (stage 2 without `train.stage2.data`) the generated
      conversations, each only when missing or out of date (pipelines/demo/setup.py).
    - retrain: the base and the conversations regenerated for the new images; yields RetrainInputs.

    Args:
        cfg: the root config.
        stage: the production stage (or the demo's own) about to run.
        force: synthetic and base: redo an output made with other settings.
        base_url: synthetic: the address of a server that already runs.
        train_stage: train: the training stage (1 or 2).
    """
    if stage == "synthetic":
        with _synthetic(cfg, base_url, force) as result:
            yield result
    elif stage == "curation":
        from pipelines.demo.synthetic_server import server_for

        if not any(s.format == "synthetic" for s in cfg.sources):
            yield None
            return
        with server_for(cfg) as server:
            yield server
    elif stage == "download":
        from pipelines.demo.synthetic_server import serving

        with serving(cfg) as server:
            yield server
    elif stage == "extract":
        from pipelines.demo import vocab

        vocab.learn(cfg)
        yield None
    elif stage == "base":
        from pipelines.demo import base_lm

        yield base_lm.run(cfg, force=force)
    elif stage == "train":
        from pipelines.demo import setup

        setup.prepare_training(cfg, train_stage)
        yield None
    elif stage == "retrain":
        from pipelines.demo import setup

        yield setup.retrain_inputs(cfg)
    else:
        yield None


@contextlib.contextmanager
def _synthetic(cfg: Config, base_url: str | None, force: bool) -> Iterator[Any]:
    """The synthetic source written for `base_url`, or for a server of its own serving it while the block runs."""
    from pipelines.demo import synthetic
    from pipelines.demo.synthetic_server import server_for

    if base_url is not None:
        yield synthetic.run(cfg, base_url, force=force)
        return
    with server_for(cfg) as server:
        yield synthetic.run(cfg, server.base_url, force=force)
