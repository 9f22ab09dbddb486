"""Shared fixtures: isolated Prefect/Ray settings, a synthetic config, workspaces on disk and on a local S3."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports prefect or ray: no analytics, no home-directory state, no auth token file.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines.config import Config, SyntheticConfig
from stores.workspace import Workspace


@pytest.fixture(scope="session", autouse=True)
def _prefect_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))


@pytest.fixture
def small_synthetic() -> SyntheticConfig:
    """A small synthetic source with every bad kind present once and a short slow delay."""
    return SyntheticConfig(count=40, seed=3, bad_fraction=0.25, slow_seconds=3.0, audio_clips=3, video_seconds=1.0)


@pytest.fixture
def config(tmp_path: Path, small_synthetic: SyntheticConfig) -> Config:
    """The demo config on a temporary workspace with the small synthetic source."""
    cfg = Config.from_yaml(None, [f"workspace={tmp_path / 'ws'}", "download.timeout=1.5"])
    cfg.synthetic = small_synthetic
    return cfg


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback (a real HTTP S3 API, not a mock of the client)."""
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[key] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_workspace(s3_endpoint: str) -> Workspace:
    """A fresh bucket on the local S3 server as a workspace."""
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    bucket = f"ibllm-{uuid.uuid4().hex[:8]}"
    ws = Workspace(f"s3://{bucket}/run", options)
    ws.fs.mkdir(bucket)
    return ws


@pytest.fixture(params=["local", "s3"])
def workspace(request: pytest.FixtureRequest, tmp_path: Path) -> Workspace:
    """The same tests on a local folder and on S3."""
    if request.param == "local":
        return Workspace(str(tmp_path / "ws"))
    return request.getfixturevalue("s3_workspace")


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown() -> Iterator[None]:
    """Stop the local Ray instance a test may have started in this process."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (and database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
