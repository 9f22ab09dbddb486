"""`ibllm serve --ray`: the app as a Ray Serve deployment with 2 replicas on the local Ray, answering concurrently."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pipelines.config import with_settings
from pipelines.infer import stage as infer
from pipelines.runtime.inputs import Request
from pipelines.serve import ray_app
from tests.pipelines.test_infer import trained  # noqa: F401 (the module's fixture)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_answer_concurrent_requests(trained) -> None:  # noqa: F811
    import ray
    from ray import serve

    cfg, _, checkpoint = trained
    cfg = cfg.model_copy(deep=True)
    cfg.serve.replicas, cfg.serve.port, cfg.ray.num_cpus = 2, _free_port(), 2
    prompts = ["Name a colour.", "What shape is it?", "Describe the picture.", "Name a shape."] * 2
    expected = [infer.run(cfg, Request(prompt=p, temperature=0.0, max_new_tokens=5)).answers[0].answer for p in prompts]
    try:
        on = {"infer.checkpoint": checkpoint, "infer.device": "cpu", "infer.dtype": "float32"}
        url = ray_app.start(with_settings(cfg, on))
        status = serve.status().applications[ray_app.APP_NAME].deployments[ray_app.APP_NAME]
        assert status.replica_states.get("RUNNING") == 2
        body = lambda p: {"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 5}  # noqa: E731
        with ThreadPoolExecutor(8) as pool:
            docs = list(
                pool.map(lambda p: httpx.post(f"{url}/v1/chat/completions", json=body(p), timeout=120).json(), prompts)
            )
        assert [d["choices"][0]["message"]["content"] for d in docs] == expected
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
    finally:
        ray_app.stop()
        ray.shutdown()
