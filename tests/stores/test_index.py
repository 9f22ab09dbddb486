"""The cache index on clustered vectors: recall, exact re-scoring, ids -> rows, mismatches, atomic rebuilds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stores import features
from stores.index import BuildSettings, CacheIndex, IndexMismatch, build, current_version, exact_top_k
from stores.workspace import Workspace

DIM, ENC = 64, "imagebind-test-init0"


def clustered(n: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_parts(tmp_path: Path, n: int = 3000, parts: int = 3, encoder_id: str = ENC, dim: int = DIM) -> list[str]:
    img, txt = clustered(n), clustered(n, seed=1)
    txt = (img + 0.3 * txt) / np.linalg.norm(img + 0.3 * txt, axis=1, keepdims=True)  # captions near their images
    paths = []
    for p, idx in enumerate(np.array_split(np.arange(n), parts)):
        path = str(tmp_path / f"part-{p:05d}.parquet")
        features.write_features(
            path,
            {
                "uid": [f"u{i}" for i in idx],
                "source": ["s"] * len(idx),
                "caption": [f"caption {i}" for i in idx],
                "url": [f"http://x/{i}" for i in idx],
                "image_emb": img[idx][:, :dim],
                "text_emb": txt[idx][:, :dim],
                "clip_score": np.zeros(len(idx)),
                "encoder_id": [encoder_id] * len(idx),
            },
            dim,
        )
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, list[str]]:
    tmp = tmp_path_factory.mktemp("index")
    ws = Workspace(str(tmp / "ws"))
    parts = write_parts(tmp)
    build(
        ws, "cache", parts, ENC, DIM, "fp1", BuildSettings(index_key="Pad64,IVF16_HNSW16,PQ8", rescore=8, holdout=200)
    )
    return ws, parts


def test_recall_and_exact_rescoring(compressed: tuple[Workspace, list[str]]) -> None:
    ws, _ = compressed
    index = CacheIndex.open(ws, "cache", encoder_id=ENC, dim=DIM)
    assert index.meta["index_key"] == "Pad64,IVF16_HNSW16,PQ8" and index.meta["count"] == 3000
    assert index.meta["recall_at_10"] >= 0.9  # PQ alone is far lower; re-scoring 80 candidates recovers it
    rng = np.random.default_rng(7)
    near = index.gather(rng.integers(0, 3000, 50)) + 0.03 * rng.normal(size=(50, DIM))  # queries among the data
    queries = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)
    sims, ids = index.search(queries, 10)
    exact = np.einsum("bkd,bd->bk", index.gather(ids), queries)
    np.testing.assert_allclose(sims, exact, rtol=1e-5, atol=1e-6)  # the similarities are exact, not PQ estimates
    assert (np.diff(sims, axis=1) <= 1e-7).all()
    truth = exact_top_k(index.values, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= 0.9
    assert (
        index.index.ntotal == 3000
        and os.path.getsize(Path(ws.index("cache", current_version(ws, "cache"), "values.f16"))) == 3000 * DIM * 2
    )


def test_ids_map_to_their_rows(compressed: tuple[Workspace, list[str]]) -> None:
    ws, _ = compressed
    index = CacheIndex.open(ws, "cache")
    probe = np.array([5, 1234, 2999])
    sims, ids = index.search(index.gather(probe), 1)
    assert ids[:, 0].tolist() == probe.tolist() and np.allclose(sims[:, 0], 1.0, atol=2e-3)
    rows = [r[0] for r in index.lookup(ids)]
    assert [r["uid"] for r in rows] == ["u5", "u1234", "u2999"] and rows[1]["caption"] == "caption 1234"


def test_mismatches_are_refused(compressed: tuple[Workspace, list[str]], tmp_path: Path) -> None:
    ws, _ = compressed
    with pytest.raises(IndexMismatch, match="holds features of imagebind-test-init0, not of other"):
        CacheIndex.open(ws, "cache", encoder_id="other")
    with pytest.raises(IndexMismatch, match="dimension 64, the encoder gives 1024"):
        CacheIndex.open(ws, "cache", dim=1024)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mixed = write_parts(tmp_path / "a", parts=1)
    mixed += write_parts(tmp_path / "b", parts=1, encoder_id="imagebind-other")
    with pytest.raises(IndexMismatch, match="features of encoder"):
        build(Workspace(str(tmp_path / "ws")), "x", mixed, ENC, DIM, "fp", BuildSettings())
    with pytest.raises(IndexMismatch, match="image_emb has 64 dimensions, the encoder gives 32"):
        build(Workspace(str(tmp_path / "ws")), "x", mixed[:1], ENC, 32, "fp", BuildSettings())
    with pytest.raises(FileNotFoundError, match="run `ibllm index`"):
        CacheIndex.open(Workspace(str(tmp_path / "empty")), "cache")


def test_a_failed_rebuild_leaves_the_previous_index_in_service(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "ws"))
    parts = write_parts(tmp_path, n=600, parts=2)
    build(ws, "cache", parts, ENC, DIM, "fp1", BuildSettings(holdout=50))
    before = current_version(ws, "cache")
    q = clustered(5, seed=3)
    expected = CacheIndex.open(ws, "cache").search(q, 5)
    with pytest.raises((ValueError, RuntimeError)):  # an impossible index key: the build fails midway
        build(ws, "cache", parts, ENC, DIM, "fp2", BuildSettings(index_key="NotAnIndex,Nonsense", holdout=50))
    assert current_version(ws, "cache") == before
    got = CacheIndex.open(ws, "cache").search(q, 5)
    np.testing.assert_array_equal(got[1], expected[1])
    build(ws, "cache", parts[:1], ENC, DIM, "fp3", BuildSettings(holdout=50))  # a good rebuild replaces it
    assert current_version(ws, "cache") != before and CacheIndex.open(ws, "cache").count == 300
    assert not list((Path(ws.index("cache")) / before).glob("*"))  # the old version's files are gone


def test_search_parameters_are_tuned_for_recall(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path / "ws"))
    parts = write_parts(tmp_path, n=3000, parts=2)
    key = "Pad64,IVF64_HNSW16,PQ16"
    low = build(ws, "low", parts, ENC, DIM, "fp", BuildSettings(index_key=key, holdout=200, target_recall=0.0))
    high = build(ws, "high", parts, ENC, DIM, "fp", BuildSettings(index_key=key, holdout=200, target_recall=0.99))
    assert high["recall_at_10"] >= 0.99 and high["recall_at_10"] > low["recall_at_10"]
    nprobe = {m["name"]: int(m["index_param"].split("nprobe=")[1].split(",")[0]) for m in (low, high)}
    assert nprobe["high"] > nprobe["low"]
    import faiss

    assert faiss.extract_index_ivf(CacheIndex.open(ws, "high").index).nprobe == nprobe["high"]  # kept on reopening


def test_the_key_is_chosen_for_the_size_and_budget() -> None:
    from stores.index_plan import choose_key

    mb = 2**20
    assert choose_key(1_000_000, 1024, 512 * mb) == ("IVF4096,PQ256x4fs", "nprobe=16")  # 1/8 of flat fp32
    assert choose_key(3_300_000, 1024, 1024 * mb) == ("IVF8192,PQ256x4fs", "nprobe=16")  # CC3M
    assert choose_key(3_300_000, 1024, 400 * mb)[0] == "IVF8192,PQ128x4fs"  # codes halved to fit
    assert choose_key(3_300_000, 1024, 50 * mb) == (None, None)  # nothing fits: autofaiss says so
    assert choose_key(50_000, 1024, 512 * mb) == (None, None)  # small and flat fits: autofaiss's exact/graph index
    assert choose_key(3000, 64, 500 * 1024)[0] == "IVF64,PQ16x4fs"  # small but over budget: 39 points per list


def test_default_index_over_budget_is_fast_scan_and_tuned(tmp_path: Path) -> None:
    """Over the budget the default is IVF + 4-bit fast-scan PQ (built with L2 on unit vectors); similarities are the
    exact inner products, and tuning raises the re-scored candidates when they, not nprobe, limit recall."""
    ws = Workspace(str(tmp_path / "ws"))
    parts = write_parts(tmp_path, n=3000, parts=2)
    meta = build(ws, "fs", parts, ENC, DIM, "fp", BuildSettings(max_index_memory="500K", holdout=200))
    assert meta["index_key"] == "IVF64,PQ16x4fs" and meta["metric"] == "l2" and meta["recall_at_10"] >= 0.95
    index = CacheIndex.open(ws, "fs")
    q = clustered(20, seed=5)
    sims, ids = index.search(q, 10)
    np.testing.assert_allclose(sims, np.einsum("bkd,bd->bk", index.gather(ids), q), rtol=1e-5, atol=1e-6)
    coarse = BuildSettings(
        index_key="IVF16,PQ4x4fs", index_param="nprobe=16", rescore=1, holdout=200, target_recall=0.99
    )
    tuned = build(ws, "coarse", parts, ENC, DIM, "fp", coarse)  # all lists probed: only candidates can help
    assert tuned["rescore"] > 1 and tuned["recall_at_10"] >= 0.99
    assert CacheIndex.open(ws, "coarse").rescore == tuned["rescore"]  # kept on reopening
