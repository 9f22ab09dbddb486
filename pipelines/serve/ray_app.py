"""The same app as a Ray Serve deployment: `serve.replicas` replicas, each with `serve.gpus_per_replica` GPUs."""

from __future__ import annotations

import logging
from typing import Any

from pipelines.config import Config
from pipelines.ray_runtime import connect

log = logging.getLogger(__name__)
APP_NAME = "ibllm"


def application(cfg: Config) -> Any:
    """The Serve application: each replica builds the app of `pipelines.serve.stage.build` (its own model and
    engine thread); Serve's proxy spreads the requests over the replicas."""
    from ray import serve

    from pipelines.runtime import checkpoints, loader

    chosen = checkpoints.choose(loader.workspace(cfg), cfg.infer.checkpoint)  # every replica serves the same one
    settings = cfg.model_dump(mode="json")
    settings["infer"]["checkpoint"] = chosen

    def build_app() -> Any:
        from pipelines.serve import stage

        return stage.build(Config.model_validate(settings)).app

    options = {"num_cpus": 0 if cfg.serve.gpus_per_replica else 1, "num_gpus": cfg.serve.gpus_per_replica}
    deployment = serve.deployment(
        serve.ingress(build_app)(),
        name=APP_NAME,
        num_replicas=cfg.serve.replicas,
        ray_actor_options=options,
        max_ongoing_requests=cfg.serve.max_queue,
    )
    return deployment.bind()


def start(cfg: Config) -> str:
    """Connect to Ray (ray.address, else a local instance), run the application on serve.host:serve.port and
    return its URL once every replica is up."""
    from ray import serve

    connect(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(application(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    log.info("Ray Serve: %d replica(s) of %s at %s", cfg.serve.replicas, APP_NAME, url)
    return url


def stop() -> None:
    """Take the application down and stop Serve (the Ray instance stays)."""
    from ray import serve

    serve.shutdown()
