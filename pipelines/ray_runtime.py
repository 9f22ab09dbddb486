"""Ray connection: a local instance by default, an existing cluster when `ray.address` is set."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from pipelines.config import Config
from pipelines.console import verbose

log = logging.getLogger(__name__)


def storage_env(cfg: Config) -> dict[str, str]:
    """The workspace's fsspec options as fsspec's own environment defaults (`FSSPEC_<PROTOCOL>`), for code that opens
    workspace URLs without them: img2dataset's writers, in Ray workers and spawned processes."""
    if "://" not in cfg.workspace or not cfg.storage_options:
        return {}
    protocol = cfg.workspace.partition("://")[0]
    return {f"FSSPEC_{protocol.upper()}": json.dumps(dict(cfg.storage_options))}


def share_storage_options(cfg: Config) -> None:
    """Make the workspace's fsspec options the defaults of its protocol in this process and the processes it starts."""
    import fsspec.config

    for key, value in storage_env(cfg).items():
        os.environ[key] = value
        fsspec.config.conf.setdefault(key.removeprefix("FSSPEC_").lower(), {}).update(json.loads(value))


def connect(cfg: Config) -> None:
    """Connect to (or start) Ray once per process; later calls are no-ops. Every Ray worker of the job gets the
    workspace's storage options as fsspec defaults (`storage_env`)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes ~/.ray/auth_token on every start
    import ray

    if ray.is_initialized():
        return
    share_storage_options(cfg)
    level = logging.INFO if verbose() else logging.WARNING  # Ray's own lines: we say what was started
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": level}
    env = storage_env(cfg)
    if env:
        common["runtime_env"] = {"env_vars": env}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **common)
        log.info("connected to the Ray cluster at %s", cfg.ray.address)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **common)
        log.info("started a local Ray instance (%s CPUs)", cfg.ray.num_cpus or "all")
