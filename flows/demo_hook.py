"""The one place where flows and the command line reach the demo: its hook around a stage, on the demo only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipelines.config import Config

if TYPE_CHECKING:
    from pipelines.demo.hook import Stage

DEMO_STAGES = ("synthetic", "base")  # the demo's own stages: they reach the hook on any config (and refuse there)


def is_demo(cfg: Config) -> bool:
    """The demo configuration (configs/demo.yaml): a `synthetic`-format source, or `train.stage0` set."""
    return cfg.train.stage0 is not None or any(s.format == "synthetic" for s in cfg.sources)


@contextlib.contextmanager
def prepared(cfg: Config, stage: Stage, **options: Any) -> Iterator[Any]:
    """Run the demo's hook (pipelines/demo/hook.py) around `stage` on the demo configuration and yield what it made;
    on any other configuration nothing runs and no `pipelines.demo` module is imported (yields None).

    Args:
        cfg: the root config.
        stage: the stage about to run (see `pipelines.demo.hook.prepare`).
        **options: the hook's keyword options (force, base_url, train_stage).
    """
    if stage not in DEMO_STAGES and not is_demo(cfg):
        yield None
        return
    from pipelines.demo import hook

    with hook.prepare(cfg, stage, **options) as made:
        yield made
