"""The synthetic source is deterministic and its server answers every good and bad case as specified."""

from __future__ import annotations

import hashlib
import http.client
import io
import time
import wave
from urllib.parse import urlsplit

import av
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import Config, SyntheticConfig
from pipelines.demo import synthetic
from pipelines.demo.probe import classify
from pipelines.demo.synthetic import BAD_KINDS, SyntheticSource
from pipelines.demo.synthetic_media import HUGE_SIZE
from pipelines.demo.synthetic_server import HTML_PAGE, SyntheticServer
from stores.ledger import Ledger, LedgerConflict
from stores.workspace import Workspace


def get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def digest(source: SyntheticSource, seed: int) -> str:
    h = hashlib.sha256()
    for it in source.items:
        h.update(repr(it).encode())
        if it.kind == "good":
            h.update(it.render(seed))
    for data in source.audio().values():
        h.update(data)
    return h.hexdigest()


def test_same_config_same_source(small_synthetic: SyntheticConfig) -> None:
    a, b = SyntheticSource(small_synthetic), SyntheticSource(small_synthetic)
    assert digest(a, small_synthetic.seed) == digest(b, small_synthetic.seed)
    assert a.metadata("http://h:1").equals(b.metadata("http://h:1"))
    other = small_synthetic.model_copy(update={"seed": 4})
    assert digest(SyntheticSource(other), 4) != digest(a, 3)


def test_rows_have_laion_layout_and_realistic_values(small_synthetic: SyntheticConfig) -> None:
    cfg = small_synthetic.model_copy(update={"count": 400, "bad_fraction": 0.1})
    table = SyntheticSource(cfg).metadata("http://127.0.0.1:9")
    assert table.column_names[:8] == [
        "URL",
        "TEXT",
        "similarity",
        "WIDTH",
        "HEIGHT",
        "punsafe",
        "pwatermark",
        "LANGUAGE",
    ]
    rows = table.to_pylist()
    sims = [r["similarity"] for r in rows]
    assert 0.15 <= min(sims) < 0.28 < 0.34 < max(sims) <= 0.45  # a 0.28 threshold keeps some, drops some
    assert sum(r["kind"] != "good" for r in rows) == 40
    assert {r["kind"] for r in rows} == {"good", *BAD_KINDS}
    good = [r for r in rows if r["kind"] == "good"]
    assert len({(r["WIDTH"], r["HEIGHT"]) for r in good}) > 50  # varied sizes and aspect ratios
    assert any(r["WIDTH"] / r["HEIGHT"] >= 3.5 for r in good)  # something for the aspect-ratio filter
    assert {r["URL"].rsplit(".", 1)[1] for r in good} == {"jpg", "png"}
    assert all(r["TEXT"].startswith(("a large ", "a small ")) and r["TEXT"].endswith(" background") for r in rows)
    dups = [r for r in rows if r["kind"] == "duplicate"]
    assert dups and all(sum(x["URL"] == d["URL"] for x in rows) >= 2 for d in dups)


def test_images_show_what_the_caption_says(small_synthetic: SyntheticConfig) -> None:
    item = next(it for it in SyntheticSource(small_synthetic).items if it.kind == "good" and it.shape == "square")
    img = Image.open(io.BytesIO(item.render(small_synthetic.seed))).convert("RGB")
    assert img.size == (item.width, item.height)
    from pipelines.demo.synthetic_media import BACKGROUNDS, COLORS

    center = img.getpixel((img.width // 2, img.height // 2))
    corner = img.getpixel((1, 1))
    assert sum(abs(c - e) for c, e in zip(center, COLORS[item.color], strict=True)) < 60
    assert sum(abs(c - e) for c, e in zip(corner, BACKGROUNDS[item.background], strict=True)) < 60


@pytest.fixture
def served(small_synthetic: SyntheticConfig):
    with SyntheticServer(small_synthetic) as server:
        yield server


def url_of(server: SyntheticServer, kind: str) -> str:
    it = next(it for it in server.source.items if it.kind == kind)
    return server.base_url + it.url_path


def test_server_binds_loopback_on_an_ephemeral_port(served: SyntheticServer) -> None:
    assert served.base_url.startswith("http://127.0.0.1:")
    assert not served.base_url.endswith(":0")


def test_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        SyntheticConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        SyntheticServer(SyntheticConfig.model_construct(**{**SyntheticConfig().model_dump(), "host": "10.1.2.3"}))


def test_good_images_decode(served: SyntheticServer) -> None:
    for it in [it for it in served.source.items if it.kind == "good"][:6]:
        status, headers, body = get(served.base_url + it.url_path)
        assert status == 200 and headers["Content-Type"] == ("image/png" if it.fmt == "png" else "image/jpeg")
        assert Image.open(io.BytesIO(body)).size == (it.width, it.height)
        assert body == it.render(served.source.cfg.seed)


def test_error_codes(served: SyntheticServer) -> None:
    assert get(url_of(served, "404"))[0] == 404
    assert get(url_of(served, "500"))[0] == 500
    assert get(served.base_url + "/no/such/path")[0] == 404


def test_slow_times_out_then_arrives(served: SyntheticServer) -> None:
    url = url_of(served, "slow")
    with pytest.raises(TimeoutError):
        get(url, timeout=0.3)
    start = time.perf_counter()
    status, _, body = get(url, timeout=10)
    assert status == 200 and time.perf_counter() - start >= served.source.cfg.slow_seconds * 0.9
    Image.open(io.BytesIO(body)).load()


def test_truncated_jpeg(served: SyntheticServer) -> None:
    status, headers, body = get(url_of(served, "truncated"))
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()


def test_html_instead_of_image(served: SyntheticServer) -> None:
    status, headers, body = get(url_of(served, "html"))
    assert status == 200 and headers["Content-Type"].startswith("text/html") and body == HTML_PAGE


def test_huge_image_is_a_decompression_bomb(served: SyntheticServer) -> None:
    status, _, body = get(url_of(served, "huge"))
    assert status == 200 and len(body) < 2_000_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))
    Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS
    try:
        assert Image.open(io.BytesIO(body)).size == HUGE_SIZE
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_redirect_loop(served: SyntheticServer) -> None:
    url = url_of(served, "loop")
    status, headers, _ = get(url)
    assert status == 302 and headers["Location"].endswith("/b")
    status, headers, _ = get(served.base_url + headers["Location"])
    assert status == 302 and headers["Location"] == urlsplit(url).path
    assert classify(url, timeout=2) == "redirect_loop"


def test_noai_header(served: SyntheticServer) -> None:
    status, headers, body = get(url_of(served, "noai"))
    assert status == 200 and headers["X-Robots-Tag"] == "noai"
    Image.open(io.BytesIO(body)).load()


def test_audio_and_video_are_served_and_decode(served: SyntheticServer) -> None:
    status, headers, body = get(served.base_url + "/media/audio_01.wav")
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    with wave.open(io.BytesIO(body)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (44_100, 2, 2)
        assert w.getnframes() == int(served.source.cfg.audio_seconds * 44_100)
    status, _, body = get(served.base_url + "/media/video_00.mp4")
    assert status == 200
    with av.open(io.BytesIO(body)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 10 and frames[0].shape == (128, 160, 3)


def test_run_writes_source_and_checks_what_is_served(config: Config) -> None:
    with SyntheticServer(config.synthetic) as server:
        result = synthetic.run(config, server.base_url)
        base_url = server.base_url
    table = pq.read_table(result.metadata_path)
    assert table.num_rows == result.rows == 40
    assert table.column("URL")[0].as_py().startswith(base_url)
    assert result.served == {
        "duplicate": 1,
        "http_404": 2,
        "http_500": 1,
        "not_an_image": 1,
        "ok": 30,
        "opted_out": 1,
        "redirect_loop": 1,
        "timeout": 1,
        "too_large": 1,
        "undecodable": 1,
    }
    assert sum(result.bad.values()) == 10 and result.good == 30
    ws = Workspace(config.workspace)
    assert [p.rsplit("/", 1)[1] for p in ws.glob(ws.synthetic("media", "*"))] == [
        "audio_00.wav",
        "audio_01.wav",
        "audio_02.wav",
        "object.ply",
        "photo.jpg",
        "video_00.mp4",
    ]
    ledger = Ledger(ws, "synthetic", "synthetic", synthetic.settings(config.synthetic))
    assert set(ledger.committed()) == {
        "metadata",
        "audio_00_wav",
        "audio_01_wav",
        "audio_02_wav",
        "video_00_mp4",
        "photo_jpg",
        "object_ply",
    }
    changed = config.model_copy(deep=True)
    changed.synthetic.count = 41
    with pytest.raises(LedgerConflict, match="count: 40 -> 41"):
        synthetic.run(changed, "http://127.0.0.1:1", check=False)
