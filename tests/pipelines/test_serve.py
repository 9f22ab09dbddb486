"""`ibllm serve` on loopback: every content type, streaming, concurrent clients, the queue limit, bad inputs."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from pipelines.config import Config, with_settings
from pipelines.infer import stage as infer
from pipelines.runtime import loader
from pipelines.runtime.inputs import Request
from pipelines.serve import stage as serve
from pipelines.serve.scheduler import QueueFull, Scheduler, Ticket
from tests.pipelines.test_infer import trained  # noqa: F401 (the module's fixture)

QUESTION = "What colour is the shape?"


def _data_url(path: str, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _ask(parts: list[dict], **options) -> dict:
    return {
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}],
        "temperature": 0,
        "max_tokens": 6,
    } | options


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Config, dict[str, str]]]:  # noqa: F811
    """The stage-1 model served on a free loopback port, media under a media root, 2 slots, a queue of 4."""
    cfg, f, _ = trained
    cfg = cfg.model_copy(deep=True)
    cfg.serve.media_root = str(Path(f["jpg"]).parent)
    cfg.serve.slots, cfg.serve.max_queue, cfg.serve.max_body_mb = 2, 4, 1.0
    served = serve.build(with_settings(cfg, {"infer.device": "cpu", "infer.dtype": "float32"}))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(served.app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(100):
        if uv.started:
            break
        time.sleep(0.05)
    yield url, cfg, f
    uv.should_exit = True
    thread.join(10)
    served.close()


def _expected(cfg: Config, **request) -> str:
    return infer.run(cfg, Request(prompt=QUESTION, temperature=0.0, max_new_tokens=6, **request)).answers[0].answer


def test_health_models_metrics_and_the_page(server) -> None:
    url, _, _ = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    (model,) = httpx.get(f"{url}/v1/models").json()["data"]
    assert model["object"] == "model" and model["id"].startswith("stage1/")
    page = httpx.get(url)
    assert page.status_code == 200 and "ibllm chat" in page.text and "/v1/chat/completions" in page.text
    metrics = httpx.get(f"{url}/metrics").text
    assert 'ibllm_requests_total{outcome="ok"}' in metrics and "ibllm_tokens_per_second" in metrics


def test_every_content_type_answers_as_generate(server) -> None:
    url, cfg, f = server
    cloud = Path(f["jpg"]).parent / "cloud.npy"  # under the media root
    np.save(cloud, np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32))
    inline = {"data": base64.b64encode(cloud.read_bytes()).decode(), "format": "npy"}
    cases = [
        ([{"type": "point_cloud", "point_cloud": inline}], {"point": [str(cloud)]}),
        ([{"type": "point_cloud_url", "point_cloud_url": {"url": "cloud.npy"}}], {"point": [str(cloud)]}),
        ([{"type": "image_url", "image_url": {"url": _data_url(f["jpg"], "image/jpeg")}}], {"image": [f["jpg"]]}),
        ([{"type": "image_url", "image_url": {"url": "shape.png"}}], {"image": [f["png"]]}),  # under the media root
        (
            [
                {
                    "type": "input_audio",
                    "input_audio": {"data": base64.b64encode(Path(f["wav"]).read_bytes()).decode(), "format": "wav"},
                }
            ],
            {"audio": [f["wav"]]},
        ),
        ([{"type": "video_url", "video_url": {"url": _data_url(f["mp4"], "video/mp4")}}], {"video": [f["mp4"]]}),
        ([], {}),
    ]
    for parts, request in cases:
        doc = httpx.post(f"{url}/v1/chat/completions", json=_ask(parts), timeout=60).json()
        assert doc["object"] == "chat.completion", doc
        assert doc["choices"][0]["message"]["content"] == _expected(cfg, **request), parts
        assert doc["usage"]["completion_tokens"] > 0 and doc["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_gives_the_same_answer_piece_by_piece(server) -> None:
    url, cfg, f = server
    body = _ask([{"type": "image_url", "image_url": {"url": _data_url(f["jpg"], "image/jpeg")}}], stream=True)
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) >= 2, chunks  # it really streamed
    assert text.strip() == _expected(cfg, image=[f["jpg"]])


def test_a_conversation_and_concurrent_clients_equal_sequential_answers(server) -> None:
    url, cfg, f = server
    image = {"type": "image_url", "image_url": {"url": _data_url(f["jpg"], "image/jpeg")}}
    turns = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [image, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "The shape is red."},
        {"role": "user", "content": "What shape is it?"},
    ]
    talk = {"messages": turns, "temperature": 0, "max_tokens": 6}
    said = httpx.post(f"{url}/v1/chat/completions", json=talk, timeout=60).json()["choices"][0]["message"]["content"]
    history = [(QUESTION, "The shape is red.")]
    alone = (
        infer.run(
            cfg,
            Request(image=[f["jpg"]], prompt="What shape is it?", history=history, temperature=0.0, max_new_tokens=6),
        )
        .answers[0]
        .answer
    )
    assert said == alone
    bodies = [_ask([]), _ask([image]), talk, _ask([image], max_tokens=3)]
    sequential = [httpx.post(f"{url}/v1/chat/completions", json=b, timeout=60).json() for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: httpx.post(f"{url}/v1/chat/completions", json=b, timeout=60).json(), bodies))
    assert [d["choices"][0]["message"]["content"] for d in together] == [
        d["choices"][0]["message"]["content"] for d in sequential
    ]


def test_the_queue_limit_answers_429_and_the_server_stays_healthy(server) -> None:
    url, _, _ = server
    body = _ask([{"type": "image_url", "image_url": {"url": "shape.jpg"}}], max_tokens=40, temperature=1.0)
    with ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(lambda _: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code, range(16))
        )
    assert set(codes) == {200, 429} and codes.count(200) >= 4
    assert httpx.get(f"{url}/health").json()["held"] == 0
    assert 'ibllm_requests_total{outcome="rejected"}' in httpx.get(f"{url}/metrics").text


def test_the_scheduler_holds_at_most_max_queue(trained) -> None:  # noqa: F811
    cfg, _, checkpoint = trained
    settings = {"infer.checkpoint": checkpoint, "infer.device": "cpu", "infer.dtype": "float32"}
    answerer = loader.load(with_settings(cfg, settings), need_encoder=False, slots=1).answerer
    scheduler = Scheduler(answerer, max_queue=2)
    done = threading.Event()
    finished = []

    def ticket() -> Ticket:
        return Ticket(
            Request(prompt="Name a colour.", max_new_tokens=20, temperature=0.0),
            None,
            None,
            lambda finish, e: (finished.append((finish, e)), len(finished) == 2 and done.set()),
        )

    scheduler.submit(ticket())
    scheduler.submit(ticket())
    with pytest.raises(QueueFull, match=r"serve\.max_queue 2"):
        scheduler.submit(ticket())
    assert done.wait(60) and all(e is None for _, e in finished) and scheduler.held == 0
    scheduler.close()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (_ask([{"type": "smell", "smell": "roses"}]), 400, "unknown content part type 'smell'"),
        (
            _ask(
                [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk" * 50).decode()},
                    }
                ]
            ),
            400,
            "unreadable image",
        ),
        (
            _ask([{"type": "image_url", "image_url": {"url": "data:audio/wav;base64,AAAA"}}]),
            400,
            "media type 'audio/wav'",
        ),
        (_ask([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]), 400, "not valid base64"),
        (
            _ask([{"type": "image_url", "image_url": {"url": "../../../etc/passwd"}}]),
            403,
            "outside the server's media root",
        ),
        (_ask([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]), 403, "outside the server's"),
        (_ask([{"type": "point_cloud", "point_cloud": {"data": "AAAA", "format": "stl"}}]), 400, "known: npy, pt"),
        (_ask([{"type": "point_cloud_url", "point_cloud_url": {"url": "data:x;base64,AA"}}]), 400, "point_cloud part"),
        (_ask([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]), 400, "fetches nothing"),
        (_ask([{"type": "image_url", "image_url": {"url": "missing.png"}}]), 400, "image file not found"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": []}, 400, "messages"),
        (_ask([], n=2), 400, "n: only one choice"),
        (_ask([], weights={"audio": 1.0}), 400, "weights: audio given"),
        (_ask([], temperature=-1), 400, "temperature"),
        (_ask([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 1_200_000}}]), 413, "limit"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(server, body: dict, status: int, message: str) -> None:
    url, _, _ = server
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_body_that_is_not_json(server) -> None:
    url, _, _ = server
    response = httpx.post(f"{url}/v1/chat/completions", content=b"{nope", timeout=10)
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]
