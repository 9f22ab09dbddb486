"""The download's fetch on loopback: drips end as timeouts at the deadline, in parallel, while the rest arrives."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipelines.download.fetch import OPT_OUT, fetch
from tests.pipelines.hostile_server import HostileServer

DIRECTIVES = {"noai", "noimageai", "noindex", "noimageindex"}


@pytest.fixture(scope="module")
def server() -> HostileServer:
    with HostileServer(seed=4) as srv:
        yield srv


def get(server: HostileServer, name: str, deadline: float = 30.0, retries: int = 0) -> tuple[bytes | None, str | None]:
    _, stream, error = fetch(
        (0, server.url(name)), 1.0, retries, None, DIRECTIVES, deadline, allow_private_addresses=True
    )
    return (stream.getvalue() if stream else None), error


def test_drips_end_at_the_deadline_without_holding_the_others(server: HostileServer) -> None:
    body = {c.name: c.body for c in server.cases}
    names = ["drip_body", "drip_headers"] * 3 + ["jpeg", "moved", "animated_gif", "png16_rgb"] * 3
    deadline = 1.5  # a byte every 0.25 s never trips the 1 s read timeout: only the deadline ends a drip

    def timed(name: str) -> tuple[str, bytes | None, str | None, float]:
        start = time.perf_counter()
        data, error = get(server, name, deadline)
        return name, data, error, time.perf_counter() - start

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(timed, names))
    for name, data, error, took in results:
        if name.startswith("drip"):
            assert data is None and error.startswith("timed out") and "deadline of 1.5 s" in error, (name, error)
            assert deadline <= took < deadline + 1.0, (name, took)
        else:
            assert error is None and data == body["jpeg" if name == "moved" else name], name
            assert took < deadline, (name, took)


def test_errors_keep_their_messages_and_retries_stay_inside_the_deadline(server: HostileServer) -> None:
    assert get(server, "missing")[1] == "HTTP Error 404: Not Found"
    assert get(server, "noai")[1] == OPT_OUT
    assert get(server, "flaky", retries=1)[0] == next(c.body for c in server.cases if c.name == "flaky")
    big = next(c.body for c in server.cases if c.name == "big_jpeg")
    for limit, want in ((len(big), None), (len(big) - 1, f"response too large: {len(big)} bytes announced")):
        _, stream, error = fetch(
            (0, server.url("big_jpeg")), 1.0, 0, None, None, 9.0, limit, allow_private_addresses=True
        )
        assert error == want and (stream is None) == (want is not None)
    endless = server.url("jpeg").replace("/case/jpeg", "/endless")
    _, stream, error = fetch((0, endless), 1.0, 0, None, None, 30.0, 1 << 20, allow_private_addresses=True)
    assert stream is None and error == f"response too large: over {1 << 20} bytes"
    start = time.perf_counter()
    data, error = get(server, "drip_body", deadline=1.0, retries=3)  # four attempts would take minutes
    assert data is None and "deadline of 1 s" in error and time.perf_counter() - start < 2.0
