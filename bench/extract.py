"""Benchmark: the Ray extraction pipeline vs a plain single-process loop vs the encoder alone; memory vs shards.

Usage: python bench/extract.py [--preset base] [--dtype bfloat16] [--per-shard 256] [--shards 2 8]
                               [--speed-shards 8] [--repeat 3] [--batch 8] [--buffer-mb 192]
All three featurise the same webdataset shards with the same model; peak memory is the summed PSS of this process
and every process it started (Ray's workers included, shared pages split between them), sampled every 0.2 s.
About 15 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tarfile
import tempfile
import time

import numpy as np
import torch
from memory import PeakMemory
from PIL import Image

from model.imagebind import image as image_ops
from model.imagebind.encoder import ImageBind
from model.imagebind.tokenizer import Tokenizer, learn_merges, write_vocab
from pipelines import extract, extract_read, ray_runtime
from pipelines.config import Config
from stores import features
from stores.ledger import Ledger
from stores.metadata import make_uid
from stores.workspace import Workspace

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "star", "ring", "small", "large", "on", "a",
         "background", "of", "the"]  # fmt: skip


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
    return Config(workspace=os.path.join(root, "ws"), sources=[{"name": "s", "format": "synthetic"}],
                  model={"imagebind": "tiny", "imagebind_vocab": vocab})  # fmt: skip


def plain_loop(cfg: Config, encoder: ImageBind, out_dir: str, batch: int) -> int:
    """Read each tar, decode, preprocess, encode and write one Parquet per shard, in this process."""
    ws, n = Workspace(cfg.workspace), 0
    tok = Tokenizer(cfg.model.imagebind_vocab)
    for item in extract.shard_items(ws, "s"):
        samples = extract_read.read_tar(ws.read_bytes(item["tar"]))
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
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="base")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--per-shard", type=int, default=256, help="images a shard (img2dataset writes 10,000)")
    p.add_argument("--shards", type=int, nargs="+", default=[2, 8], help="shard counts whose peak memory is compared")
    p.add_argument("--speed-shards", type=int, default=8, help="shards of each timed pipeline / plain loop pair")
    p.add_argument("--repeat", type=int, default=3, help="timed pairs (a shared machine's speed drifts between runs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--buffer-mb", type=int, default=192, help="extract.buffer_mb: about 4 decoded shards of 256")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    print(f"{args.preset} encoder, {args.dtype}, {args.per_shard} images a shard, batch {args.batch}, {cores} cores, "
          f"buffer {args.buffer_mb} MB")  # fmt: skip
    import ray

    # Peak memory first, for every shard count, on a fresh Ray and before this process loads any model: sampling
    # every process's PSS costs CPU, so these runs are not timed.
    for shards in args.shards:
        with tempfile.TemporaryDirectory() as root:
            cfg = configure(make_shards(root, shards, args.per_shard), args, cores)
            ray_runtime.connect(cfg.ray)  # Ray's own start-up is not the pipeline's cost
            with PeakMemory() as mem:
                extract.run(cfg)
            ray.shutdown()
            print(f"{shards} shards ({shards * args.per_shard} images): pipeline peak PSS {mem.peak / 2**20:,.0f} MB",
                  flush=True)  # fmt: skip
    # Then pairs on the same shards, the pipeline and the plain loop back to back: each pair's ratio is measured
    # within a minute or two, so the drift of a shared machine's speed between pairs does not enter it.
    ratios, total = [], args.speed_shards * args.per_shard
    torch.set_num_threads(cores)
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as root:  # the same shards (fixed seed), a fresh workspace each pair
            cfg = configure(make_shards(root, args.speed_shards, args.per_shard), args, cores)
            if i == 0:
                enc_rate = encoder_alone(cfg, args, min(total, 512))
            ray_runtime.connect(cfg.ray)
            start = time.perf_counter()
            steady = extract.run(cfg).steady_images_per_second or 0.0
            ray_s = time.perf_counter() - start
            ray.shutdown()
            start = time.perf_counter()  # the plain loop's job includes loading the model, as the actor's does
            encoder = ImageBind.load(args.preset, vocab=cfg.model.imagebind_vocab, device="cpu", dtype=args.dtype)
            plain_loop(cfg, encoder, root, args.batch)
            plain_s = time.perf_counter() - start
            del encoder
        ratios.append(plain_s / ray_s)
        startup = ray_s - total / steady if steady else float("nan")
        print(f"pair {i + 1}, {total} images: plain loop {total / plain_s:5.2f} images/s; ray pipeline "
              f"{total / ray_s:5.2f} end to end = {plain_s / ray_s:.2f}x the plain loop, "
              f"{total / ray_s / enc_rate:.2f}x the encoder alone; {steady:5.2f} once the first shard is back "
              f"({steady * plain_s / total:.2f}x; start-up {startup:.1f} s)", flush=True)  # fmt: skip
    print(f"encoder alone (image + text, tensors in memory): {enc_rate:5.2f} images/s")
    print(f"pipeline vs plain loop, end to end: median {statistics.median(ratios):.2f}x over {len(ratios)} pairs "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}x)")  # fmt: skip


def encoder_alone(cfg: Config, args: argparse.Namespace, n: int) -> float:
    """Images/s of the encoder by itself (image and text towers, as the pipeline runs them) on tensors in memory."""
    encoder = ImageBind.load(args.preset, vocab=cfg.model.imagebind_vocab, device="cpu", dtype=args.dtype)
    tokens = Tokenizer(cfg.model.imagebind_vocab)([" ".join(WORDS[:8])] * args.batch)
    x = torch.randn(n, 3, 224, 224)
    encoder.encode({"vision": x[: args.batch], "text": tokens})  # warm-up
    start = time.perf_counter()
    for i in range(0, n, args.batch):
        encoder.encode({"vision": x[i : i + args.batch], "text": tokens[: len(x[i : i + args.batch])]})
    return n / (time.perf_counter() - start)


def configure(cfg: Config, args: argparse.Namespace, cores: int) -> Config:
    """The benchmark's pipeline settings: the encoder actor gets every core for torch, readers a slice beside it."""
    cfg.model.imagebind = args.preset
    cfg.ray.num_cpus, cfg.extract.actor_cpus, cfg.extract.task_cpus = cores + 1, float(cores), 0.5
    cfg.extract.batch_size, cfg.extract.dtype, cfg.extract.device = args.batch, args.dtype, "cpu"
    cfg.extract.buffer_mb = args.buffer_mb
    return cfg


if __name__ == "__main__":
    main()
