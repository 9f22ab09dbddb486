"""Benchmark: the Ray extraction pipeline vs a plain single-process loop vs the encoder alone; memory vs shards.

Usage: python bench/extract.py [--device auto] [--preset base] [--dtype bfloat16] [--per-shard 256] [--shards 2 8]
                               [--speed-shards 8] [--repeat 3] [--batch 8] [--buffer-mb 192]
All three featurise the same webdataset shards with the same model; peak memory is the summed PSS of this process
and every process it started (Ray's workers included, shared pages split between them), sampled every 0.2 s.
About 15 minutes on 2 cores with the defaults. On a CUDA machine the defaults become huge in bf16, 32 shards of 1,024
and batches of 256, and the pipeline is also set against the H200's FLOP bound; then the actor by itself against the
two towers alone (`extract_gpu.py`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time

import numpy as np
import torch
from encoders import H200_BF16_TFLOPS, HUGE_GFLOPS_PER_IMAGE
from memory import PeakMemory
from PIL import Image

from model.imagebind import image as image_ops
from model.imagebind.encoder import ImageBind
from model.imagebind.tokenizer import Tokenizer, learn_merges, write_vocab
from pipelines import ray_runtime
from pipelines.config import Config
from pipelines.extract import read as extract_read
from pipelines.extract import stage as extract
from stores import features
from stores.ledger import Ledger
from stores.metadata import make_uid
from stores.workspace import Workspace

WORDS = [
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "star",
    "ring",
    "small",
    "large",
    "on",
    "a",
    "background",
    "of",
    "the",
]


def make_shards(root: str, shards: int, per_shard: int) -> Config:
    """Photo-like JPEG shards (img2dataset layout) committed in the download ledger."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "ws", "shards", "s")
    os.makedirs(folder)
    ws = Workspace(os.path.join(root, "ws"))
    ledger = Ledger(ws, "download", "s", {"bench": 1})
    for s in range(shards):
        tar_path = os.path.join(folder, f"{s:05d}.tar")
        with tarfile.open(tar_path, "w") as tf:
            for i in range(per_shard):
                url = f"http://h/{s}/{i}.jpg"
                caption = " ".join(rng.choice(WORDS, 8))
                buf = io.BytesIO()
                small = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
                Image.fromarray(small).resize((384, 288), Image.BICUBIC).save(buf, "JPEG", quality=90)
                meta = {"uid": make_uid("s", url), "url": url, "caption": caption}
                files = {"jpg": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        ledger.record_existing(f"{s:05d}", [tar_path], rows=per_shard)
    vocab = os.path.join(root, "vocab.txt.gz")
    write_vocab(vocab, learn_merges([" ".join(WORDS)] * 5, 100))
    return Config(
        workspace=os.path.join(root, "ws"),
        sources=[{"name": "s", "format": "synthetic"}],
        model={"imagebind": "tiny", "imagebind_vocab": vocab},
    )


def plain_loop(cfg: Config, encoder: ImageBind, out_dir: str, batch: int) -> int:
    """Read each tar, decode, preprocess, encode and write one Parquet per shard, in this process."""
    ws, n = Workspace(cfg.workspace), 0
    tok = Tokenizer(cfg.model.imagebind_vocab)
    for item in extract.shard_items(ws, "s"):
        samples = extract_read.read_tar(ws.read_bytes(item["tar"])).parts
        keys = sorted(samples)
        rows: dict[str, list] = {
            k: [] for k in ("uid", "source", "caption", "url", "image_emb", "text_emb", "clip_score")
        }
        for i in range(0, len(keys), batch):
            chunk = [samples[k] for k in keys[i : i + batch]]
            pixels = torch.stack([image_ops.preprocess_image(image_ops.load_image(c["jpg"])) for c in chunk])
            captions = [c["txt"].decode() for c in chunk]
            emb = encoder.encode({"vision": pixels, "text": tok(captions)})
            metas = [json.loads(c["json"]) for c in chunk]
            rows["uid"] += [m["uid"] for m in metas]
            rows["url"] += [m["url"] for m in metas]
            rows["source"] += ["s"] * len(chunk)
            rows["caption"] += captions
            rows["image_emb"].append(emb["vision"].numpy())
            rows["text_emb"].append(emb["text"].numpy())
            rows["clip_score"] += (emb["vision"] * emb["text"]).sum(-1).tolist()
        rows["image_emb"], rows["text_emb"] = np.concatenate(rows["image_emb"]), np.concatenate(rows["text_emb"])
        rows["encoder_id"] = [encoder.encoder_id] * len(keys)
        n += features.write_features(os.path.join(out_dir, f"{item['shard']}.parquet"), rows, encoder.dim)
    return n


def main() -> None:
    args = parse_args()
    gpu, cores = args.device == "cuda", os.cpu_count() or 1
    print(
        f"{args.preset} encoder, {args.dtype}, on {args.device}, {args.per_shard} images a shard, "
        f"batch {args.batch}, {cores} cores, buffer {args.buffer_mb} MB"
    )
    import ray

    with tempfile.TemporaryDirectory() as root:
        # Peak memory first, for every shard count, on a fresh Ray and before this process loads any model: sampling
        # every process's PSS costs CPU, so these runs are not timed.
        for shards in args.shards:
            cfg = configure(make_shards(os.path.join(root, f"mem{shards}"), shards, args.per_shard), args, cores)
            ray_runtime.connect(cfg.ray)  # Ray's own start-up is not the pipeline's cost
            with PeakMemory() as mem:
                extract.run(cfg)
            ray.shutdown()
            print(
                f"{shards} shards ({shards * args.per_shard} images): pipeline peak PSS {mem.peak / 2**20:,.0f} MB",
                flush=True,
            )
        # Then pairs on the same shards, the pipeline and the plain loop back to back: each pair's ratio is measured
        # within a minute or two, so the drift of a shared machine's speed between pairs does not enter it.
        template = make_shards(os.path.join(root, "speed"), args.speed_shards, args.per_shard)
        total = args.speed_shards * args.per_shard
        torch.set_num_threads(cores)
        enc_rate = encoder_alone(template, args, min(total, 4096 if gpu else 512))
        vs_plain, rates = [], []
        for i in range(args.repeat):
            cfg = configure(fresh_copy(template, os.path.join(root, f"pair{i}")), args, cores)
            ray_runtime.connect(cfg.ray)
            start = time.perf_counter()
            steady = extract.run(cfg).steady_images_per_second or 0.0
            ray_s = time.perf_counter() - start
            ray.shutdown()
            start = time.perf_counter()  # the plain loop's job includes loading the model, as the actor's does
            encoder = ImageBind.load(args.preset, vocab=cfg.model.imagebind_vocab, device=args.device, dtype=args.dtype)
            os.makedirs(plain_out := os.path.join(root, f"plain{i}"))
            plain_loop(cfg, encoder, plain_out, args.batch)
            plain_s = time.perf_counter() - start
            del encoder
            vs_plain.append(plain_s / ray_s)
            rates.append(total / ray_s)
            startup = ray_s - total / steady if steady else float("nan")
            print(
                f"pair {i + 1}, {total} images: plain loop {total / plain_s:7.2f} images/s; ray pipeline "
                f"{total / ray_s:7.2f} end to end = {plain_s / ray_s:.2f}x the plain loop, "
                f"{rates[-1] / enc_rate:.2f}x the encoder alone; {steady:7.2f} once the first shard is back "
                f"({steady * plain_s / total:.2f}x; start-up {startup:.1f} s)",
                flush=True,
            )
    print(f"encoder alone (image + text, tensors {'on the GPU' if gpu else 'in memory'}): {enc_rate:7.2f} images/s")
    for name, ratios in (("plain loop", vs_plain), ("encoder alone", [r / enc_rate for r in rates])):
        print(
            f"pipeline vs {name}, end to end: median {statistics.median(ratios):.2f}x over {len(ratios)} pairs "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}x)"
        )
    if gpu and args.preset == "huge" and args.dtype == "bfloat16":
        bound = H200_BF16_TFLOPS * 1e3 / HUGE_GFLOPS_PER_IMAGE
        print(
            f"huge bf16 on {torch.cuda.get_device_name()}: pipeline {statistics.median(rates):,.0f} images/s, "
            f"encoder alone {enc_rate:,.0f}, against the ~{bound:,.0f} images/s FLOP bound of an H200 (the image "
            "tower alone)"
        )
    if gpu:  # the actor by itself against the towers alone, bf16 weights against autocast, FP8 where it runs
        from extract_gpu import report

        report(args.preset, args.batch, 10.0, "cuda", args.dtype)
    else:
        print("actor vs towers on a GPU: skipped (no CUDA here; bench/extract_gpu.py measures it on a CUDA machine)")


def parse_args() -> argparse.Namespace:
    """Command line; sizes default per device (a 2-core CPU machine or a GPU machine)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is one")
    p.add_argument("--preset", help="default: base on the CPU, huge on a GPU")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--per-shard", type=int, help="images a shard (img2dataset writes 10,000); CPU 256, GPU 1024")
    p.add_argument("--shards", type=int, nargs="+", default=[2, 8], help="shard counts whose peak memory is compared")
    p.add_argument("--speed-shards", type=int, help="shards of each timed pair; CPU 8, GPU 32")
    p.add_argument("--repeat", type=int, default=3, help="timed pairs (a shared machine's speed drifts between runs)")
    p.add_argument("--batch", type=int, help="samples an encoder call; CPU 8, GPU 256")
    p.add_argument("--buffer-mb", type=int, help="extract.buffer_mb; CPU 192 (about 4 decoded shards), GPU 4096")
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    defaults = {
        "preset": ("base", "huge"),
        "per_shard": (256, 1024),
        "speed_shards": (8, 32),
        "batch": (8, 256),
        "buffer_mb": (192, 4096),
    }
    for name, (cpu_value, gpu_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu_value if gpu else cpu_value)
    return args


def fresh_copy(template: Config, root: str) -> Config:
    """A copy of the benchmark workspace (its download ledger points at the template's tars): a new feature set."""
    shutil.copytree(template.workspace, os.path.join(root, "ws"))
    return template.model_copy(update={"workspace": os.path.join(root, "ws")}, deep=True)


def encoder_alone(cfg: Config, args: argparse.Namespace, n: int) -> float:
    """Images/s of the encoder by itself (image and text towers, as the pipeline runs them) on tensors already where
    it runs (memory on the CPU, the GPU's memory on a GPU)."""
    encoder = ImageBind.load(args.preset, vocab=cfg.model.imagebind_vocab, device=args.device, dtype=args.dtype)
    tokens = Tokenizer(cfg.model.imagebind_vocab)([" ".join(WORDS[:8])] * args.batch)
    x = torch.randn(n, 3, 224, 224, device=encoder.device)
    encoder.encode({"vision": x[: args.batch], "text": tokens})  # warm-up (encode returns on the CPU: synchronised)
    start = time.perf_counter()
    for i in range(0, n, args.batch):
        encoder.encode({"vision": x[i : i + args.batch], "text": tokens[: len(x[i : i + args.batch])]})
    rate = n / (time.perf_counter() - start)
    del encoder, x
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rate


def configure(cfg: Config, args: argparse.Namespace, cores: int) -> Config:
    """The benchmark's pipeline settings. CPU: the encoder actor gets every core for torch, readers a slice beside it.
    GPU: the actor keeps two host threads, readers (one core each) get the rest."""
    cfg.model.imagebind = args.preset
    if args.device == "cuda":
        cfg.ray.num_cpus, cfg.extract.actor_cpus, cfg.extract.task_cpus = cores, 2.0, 1.0
    else:
        cfg.ray.num_cpus, cfg.extract.actor_cpus, cfg.extract.task_cpus = cores + 1, float(cores), 0.5
    cfg.extract.batch_size, cfg.extract.dtype, cfg.extract.device = args.batch, args.dtype, args.device
    cfg.extract.buffer_mb = args.buffer_mb
    return cfg


if __name__ == "__main__":
    main()
