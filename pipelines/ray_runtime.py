"""Ray connection: a local instance by default, an existing cluster when `ray.address` is set."""

from __future__ import annotations

import logging
import os

from pipelines.config import RayConfig
from pipelines.console import verbose

log = logging.getLogger(__name__)


def connect(cfg: RayConfig) -> None:
    """Connect to (or start) Ray once per process; later calls are no-ops."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes ~/.ray/auth_token on every start
    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if verbose() else logging.WARNING  # Ray's own lines: we say what was started
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=False, logging_level=level)
        log.info("connected to the Ray cluster at %s", cfg.address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False, logging_level=level)
        log.info("started a local Ray instance (%s CPUs)", cfg.num_cpus or "all")
