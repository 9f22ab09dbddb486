"""Benchmark: how fast the loopback synthetic server answers images, so it never bounds a download benchmark."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from pipelines.config import SyntheticConfig
from pipelines.demo.probe import classify
from pipelines.demo.synthetic_server import SyntheticServer

COUNT = int(os.environ.get("BENCH_IMAGES", "600"))


def main() -> None:
    cfg = SyntheticConfig(count=COUNT, bad_fraction=0.0, audio_clips=0, video_seconds=0.2)
    with SyntheticServer(cfg) as server:
        urls = [server.base_url + it.url_path for it in server.source.items]
        for threads in (1, 8, 32):
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                outcomes = list(pool.map(lambda u: classify(u, timeout=30), urls))
            took = time.perf_counter() - start
            server._server.image.cache_clear()  # every round renders again
            ok = outcomes.count("ok")
            print(f"{threads:>3} client threads: {len(urls) / took:7.0f} images/s ({ok}/{len(urls)} ok, fetch+decode)")


if __name__ == "__main__":
    main()
