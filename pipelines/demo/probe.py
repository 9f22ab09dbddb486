"""Fetch URLs as a careful downloader would and count the outcomes (a check of what a source serves)."""

from __future__ import annotations

import http.client
import io
import logging
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from PIL import Image

from pipelines.console import Progress

log = logging.getLogger(__name__)


def classify(url: str, timeout: float, max_redirects: int = 5) -> str:
    """Fetch one URL as a careful downloader would and name the outcome.

    Returns one of: ok, http_<code>, timeout, redirect_loop, not_an_image, undecodable, too_large, opted_out.
    """
    for _ in range(max_redirects + 1):
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.request("GET", parts.path or "/")
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                url = f"{parts.scheme}://{parts.netloc}{resp.getheader('Location')}"
                continue
            body = resp.read()
        except TimeoutError:
            return "timeout"
        finally:
            conn.close()
        if resp.status != 200:
            return f"http_{resp.status}"
        if "noai" in (resp.getheader("X-Robots-Tag") or "").lower():
            return "opted_out"
        if not (resp.getheader("Content-Type") or "").startswith("image/"):
            return "not_an_image"
        return _decode_outcome(body)
    return "redirect_loop"


def _decode_outcome(body: bytes) -> str:
    try:
        with Image.open(io.BytesIO(body)) as img:
            img.load()
    except Image.DecompressionBombError:
        return "too_large"
    except OSError:
        return "undecodable"
    return "ok"


def probe(urls: Iterable[str], timeout: float, threads: int = 16) -> dict[str, int]:
    """Classify every distinct URL concurrently; counts by outcome, plus `duplicate` for repeated URLs."""
    urls = list(urls)
    unique = list(dict.fromkeys(urls))
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        outcomes = pool.map(lambda u: classify(u, timeout), unique)
        progress = Progress(log, "probe urls")
        counts: Counter[str] = Counter()
        for done, outcome in enumerate(outcomes, 1):
            counts[outcome] += 1
            progress.update(done, len(unique), "urls")
    if len(urls) > len(unique):
        counts["duplicate"] = len(urls) - len(unique)
    log.info("probed %d urls in %.1fs", len(unique), time.perf_counter() - start)
    return dict(sorted(counts.items()))
