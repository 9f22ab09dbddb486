"""Benchmark: ibllm's download stage vs the bare img2dataset command on the same loopback URL list, images/s.

Usage: python bench/download.py [--images 3000] [--rounds 2]
Both download the same curated url list from the same synthetic server with the same settings; the runs alternate
and the best of each is compared (the pipeline's time includes its ledger commits). Before, the CPU time per image
of the two decoders alone on the same images: ours (PIL, pipelines/download/decode.py) and img2dataset's (OpenCV).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

from pipelines.config import Config, DownloadConfig, SourceConfig, SyntheticConfig
from pipelines.curate import stage as curate
from pipelines.demo import synthetic
from pipelines.demo.synthetic_server import SyntheticServer
from pipelines.download import stage as download
from pipelines.ingest import stage as ingest


def bare_command(cfg: Config, url_list: str, out: str) -> list[str]:
    d = cfg.download
    return [
        os.path.join(os.path.dirname(sys.executable), "img2dataset"),
        f"--url_list={url_list}",
        f"--output_folder={out}",
        "--input_format=parquet",
        "--url_col=url",
        "--caption_col=caption",
        "--output_format=webdataset",
        f"--image_size={d.image_size}",
        f"--resize_mode={d.resize_mode}",
        "--resize_only_if_bigger=True",
        f"--processes_count={d.processes}",
        f"--thread_count={d.threads}",
        f"--number_sample_per_shard={d.samples_per_shard}",
        f"--timeout={d.timeout}",
        "--enable_wandb=False",
        "--save_additional_columns=[uid,source,similarity]",
    ]


def decoder_cost(cfg: Config) -> None:
    """CPU milliseconds per image of our decoder and of img2dataset's resizer, same images, same settings."""
    from img2dataset.resizer import Resizer

    from pipelines.demo.synthetic import SyntheticSource
    from pipelines.download.decode import decoder_for

    images = [it.render(cfg.synthetic.seed) for it in SyntheticSource(cfg.synthetic).items[:500]]
    d = cfg.download
    theirs = Resizer(d.image_size, d.resize_mode, True, encode_quality=95)
    best = {"ibllm": float("inf"), "img2dataset": float("inf")}
    for _ in range(3):
        for name, decode in (("img2dataset", theirs), ("ibllm", decoder_for(cfg, "synthetic"))):
            start = time.process_time()
            for data in images:
                assert decode(io.BytesIO(data))[-1] is None
            best[name] = min(best[name], (time.process_time() - start) / len(images) * 1000)
    print(f"decoder alone: ibllm {best['ibllm']:.2f} ms, img2dataset {best['img2dataset']:.2f} ms CPU per image")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="ibllm-bench-download-")
    cfg = Config(
        workspace=f"{root}/ws",
        synthetic=SyntheticConfig(count=args.images, bad_fraction=0.0, audio_clips=0, video_seconds=0.2),
        sources=[SourceConfig(name="synthetic", format="synthetic")],
        download=DownloadConfig(
            image_size=224, processes=2, threads=16, timeout=10, samples_per_shard=500, allow_private_addresses=True
        ),
    )
    decoder_cost(cfg)
    with SyntheticServer(cfg.synthetic) as server:
        synthetic.run(cfg, server.base_url, check=False)
        ingest.run(cfg)
        url_list = f"{root}/ws/curated/synthetic"
        curate.run(cfg)
        best = {"ibllm": float("inf"), "img2dataset": float("inf")}
        for r in range(args.rounds):
            for name in ("img2dataset", "ibllm"):
                shutil.rmtree(f"{root}/ws/shards", ignore_errors=True)
                shutil.rmtree(f"{root}/ws/ledger/download", ignore_errors=True)
                shutil.rmtree(f"{root}/bare", ignore_errors=True)
                start = time.perf_counter()
                if name == "ibllm":
                    result = download.run(cfg)
                    ok = result.sources[0].succeeded
                else:
                    subprocess.run(bare_command(cfg, url_list, f"{root}/bare"), check=True, capture_output=True)
                    ok = None
                took = time.perf_counter() - start
                best[name] = min(best[name], took)
                print(
                    f"round {r + 1} {name:<12} {took:6.1f} s  {args.images / took:6.0f} images/s"
                    + (f"  ({ok} downloaded)" if ok is not None else "")
                )
    shutil.rmtree(root, ignore_errors=True)
    rate = {k: args.images / v for k, v in best.items()}
    print(
        f"best: ibllm {rate['ibllm']:.0f} images/s, bare img2dataset {rate['img2dataset']:.0f} images/s, "
        f"ratio {rate['ibllm'] / rate['img2dataset']:.2f} (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
