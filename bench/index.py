"""Benchmark: the cache index on clustered 1024-d features: build time and memory, recall@10, latency, mixing.

Usage: python bench/index.py [--n 200000] [--index-key KEY] [--budget auto] [--rescore 8]
The reference way of mixing is the official code's: a flat inner-product index, `search`, then `reconstruct`
one id at a time in Python, then the mixing in numpy. Ours: the compressed index, exact re-scoring from the
memory-mapped fp16 value store, a vectorised gather and the mixing in torch. Same queries, same data.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import faiss
import numpy as np
import torch
from memory import PeakMemory

from model.llm.cache import cache_mix
from stores import features
from stores.index import BuildSettings, CacheIndex, build, exact_top_k
from stores.workspace import Workspace

DIM = 1024


def clustered(n: int, rng: np.random.Generator, spread: float = 0.5) -> np.ndarray:
    """Unit vectors around n/100 centres (cosine ~0.8 within a cluster), like image features of a web dataset."""
    clusters = max(100, n // 100)
    centres = rng.normal(size=(clusters, DIM)).astype(np.float32)
    out = np.empty((n, DIM), np.float32)
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        x = centres[rng.integers(0, clusters, m)] + spread * rng.normal(size=(m, DIM)).astype(np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_feature_set(root: str, x: np.ndarray, rng: np.random.Generator, parts: int = 10) -> list[str]:
    paths = []
    for p, idx in enumerate(np.array_split(np.arange(len(x)), parts)):
        noisy = x[idx] + 0.5 * rng.normal(size=(len(idx), DIM)).astype(np.float32) / np.sqrt(DIM)
        path = os.path.join(root, f"part-{p:05d}.parquet")
        text = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)  # held-out queries near their images
        features.write_features(
            path,
            {
                "uid": [f"u{i}" for i in idx],
                "source": ["cc3m"] * len(idx),
                "caption": [""] * len(idx),
                "url": [""] * len(idx),
                "image_emb": x[idx],
                "text_emb": text,
                "clip_score": np.zeros(len(idx)),
                "encoder_id": ["bench"] * len(idx),
            },
            DIM,
        )
        paths.append(path)
    return paths


def percentiles(fn, reps: int) -> tuple[float, float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--index-key", default=None, help="a faiss key (default: chosen for N and the budget)")
    p.add_argument("--budget", default="auto", help="autofaiss memory budget; auto = 1/8 of the flat fp32 index")
    p.add_argument("--rescore", type=int, default=8)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    flat_bytes = args.n * DIM * 4
    budget = f"{flat_bytes / 8 / 2**20:.0f}M" if args.budget == "auto" else args.budget
    with tempfile.TemporaryDirectory() as root:
        x = clustered(args.n, rng)
        files = write_feature_set(root, x, rng)
        ws = Workspace(os.path.join(root, "ws"))
        settings = BuildSettings(
            max_index_memory=budget, index_key=args.index_key or None, rescore=args.rescore, holdout=500
        )
        with PeakMemory() as mem:
            meta = build(ws, "cache", files, "bench", DIM, "bench", settings)
        print(
            f"N={args.n:,} dim {DIM}: built {meta['index_key']} in {meta['build_seconds']:.1f} s, peak PSS "
            f"{mem.peak / 2**30:.2f} GB; index {meta['index_bytes'] / 2**20:.1f} MB = 1/"
            f"{flat_bytes / meta['index_bytes']:.0f} of the flat fp32 index ({flat_bytes / 2**20:.0f} MB); "
            f"fp16 value store {meta['values_bytes'] / 2**20:.0f} MB (separate)"
        )
        index = CacheIndex.open(ws, "cache")
        q = x[rng.integers(0, args.n, 64)] + 0.02 * rng.normal(size=(64, DIM)).astype(np.float32)
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        truth = exact_top_k(index.values, q, 10)
        _, ids = index.search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
        print(f"recall@10 vs exact search: {recall:.3f} (meta.json, held-out text queries: {meta['recall_at_10']:.3f})")
        for b in (1, 64):
            p50, p99 = percentiles(lambda b=b: index.search(q[:b], 10), 50)
            print(f"search + exact re-scoring, batch {b:>2}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        flat = faiss.IndexFlatIP(DIM)
        flat.add(x)

        def reference() -> np.ndarray:
            sims, idx = flat.search(q, 10)
            protos = np.stack([np.stack([flat.reconstruct(int(i)) for i in row]) for row in idx])
            e = np.exp(20 * sims - (20 * sims).max(1, keepdims=True))
            proto = np.einsum("bk,bkd->bd", e / e.sum(1, keepdims=True), protos)
            proto /= np.linalg.norm(proto, axis=1, keepdims=True)
            v = 0.5 * q + 0.5 * proto
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        def ours() -> torch.Tensor:
            sims, idx = index.search(q, 10)
            return cache_mix(torch.from_numpy(q), torch.from_numpy(sims), torch.from_numpy(index.gather(idx)))

        ref_ms, ours_ms = percentiles(reference, 5)[0], percentiles(ours, 20)[0]
        agree = torch.nn.functional.cosine_similarity(ours(), torch.from_numpy(reference()), dim=-1).min().item()
        print(
            f"cache mixing, batch 64: reference way {ref_ms:.1f} ms, ours {ours_ms:.1f} ms, "
            f"{ref_ms / ours_ms:.1f}x faster; min cosine between the two results {agree:.4f}"
        )


if __name__ == "__main__":
    main()
