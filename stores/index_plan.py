"""The cache index's shape: its faiss key for a size and memory budget, and search settings tuned for recall."""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import faiss
import numpy as np

AUTOFAISS_UP_TO = 100_000  # vectors: smaller sets whose flat index fits the budget keep autofaiss's choice
MAX_CANDIDATES = 1024  # re-scored candidates per query at most, whatever the tuning asks


class Searchable(Protocol):
    """What tuning needs of an opened index (stores.index.CacheIndex)."""

    index: faiss.Index
    count: int
    rescore: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def choose_key(n: int, dim: int, budget_bytes: float) -> tuple[str | None, str | None]:
    """(faiss index key, first search parameters) for `n` vectors of `dim`, or (None, None): autofaiss chooses.

    Up to AUTOFAISS_UP_TO vectors, when the flat index fits the budget, autofaiss's exact or graph index is kept.
    Beyond, an inverted file with 4-bit fast-scan product quantisation, `IVF{nlist},PQ{m}x4fs`: nlist a power of
    two near 4 sqrt(n) (with 39 training points per list at least), m = dim/4 sub-quantisers (1 bit a dimension),
    halved until codes, ids and centroids fit the budget. Its SIMD scan is several times faster than 8-bit PQ; its
    coarser distances only pick the candidates, which are re-scored exactly from the value store.
    """
    if (n <= AUTOFAISS_UP_TO and n * dim * 4 <= budget_bytes) or dim % 4:
        return None, None
    nlist = max(16, min(2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(max(16, n / 39))), 2**16))
    m = dim // 4
    while m >= 8 and dim % m == 0:
        if n * (m / 2 + 8) + nlist * dim * 4 <= budget_bytes:
            return f"IVF{nlist},PQ{m}x4fs", f"nprobe={min(nlist, 16)}"
        m //= 2
    return None, None


def metric_for(key: str | None, dim: int) -> str:
    """autofaiss's metric for `key`: inner product, or L2 for keys autofaiss builds only with L2 (such as fast-scan).

    The staged vectors have unit norm, so |q - x|^2 = |q|^2 + 1 - 2 q.x ranks candidates exactly as q.x does,
    for any query; the similarities returned are exact inner products from the value store either way.
    """
    if key is None:
        return "ip"
    from autofaiss.indices.index_factory import index_factory

    try:
        index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except ValueError as e:  # "Be careful, faiss might not create what you expect ... inner product"
        if "inner product" not in str(e):
            raise
        return "l2"
    return "ip"


def _ivf(index: faiss.Index) -> Any | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an inverted file (flat, HNSW): no nprobe
        return None


def tune_search(
    index: Searchable, queries: np.ndarray, truth: np.ndarray, target: float, max_query_ms: float = float("inf")
) -> tuple[str | None, int, float]:
    """Raise nprobe (inverted files) and the re-scored candidates until recall@k reaches `target`.

    autofaiss tunes for speed only. Each round doubles whichever of the two gains more recall, as long as a query
    (in a batch of the held-out queries) stays within `max_query_ms`, and stops when neither gains. Leaves the
    index set up as chosen; returns its nprobe parameter (None if not an inverted file), the re-score factor and
    the recall reached.
    """
    k = truth.shape[1]
    ivf = _ivf(index.index)

    def measure() -> tuple[float, float]:
        start = time.perf_counter()
        _, found = index.search(queries, k)
        ms = (time.perf_counter() - start) * 1e3 / len(queries)
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])), ms

    def setting(name: str, value: int | None = None) -> int:
        target_obj = ivf if name == "nprobe" else index
        old = int(getattr(target_obj, name))
        if value is not None:
            setattr(target_obj, name, value)
        return old

    recall, _ = measure()
    while recall < target:
        moves = []
        if ivf is not None and ivf.nprobe < ivf.nlist:
            moves.append(("nprobe", min(ivf.nlist, ivf.nprobe * 2)))
        if k * index.rescore * 2 <= min(index.count, MAX_CANDIDATES):
            moves.append(("rescore", index.rescore * 2))
        best: tuple[str, int, float] | None = None
        for name, value in moves:
            old = setting(name, value)
            got, ms = measure()
            setting(name, old)
            if ms <= max_query_ms and (best is None or got > best[2]):
                best = (name, value, got)
        if best is None or best[2] <= recall:
            break
        setting(best[0], best[1])
        recall = best[2]
    return (f"nprobe={ivf.nprobe}" if ivf is not None else None), index.rescore, recall
