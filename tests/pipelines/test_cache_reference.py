"""Cache mixing of several modalities equals the reference's formula on unnormalised inner products (issue 20)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.llm.cache import cache_mix, mix_modalities
from pipelines.runtime.encoders import cache_lookup
from stores.index import BuildSettings, CacheIndex, build, stage_features
from stores.workspace import Workspace
from tests.stores.test_index import DIM, ENC, write_parts

WEIGHTS = {"vision": 1.0, "audio": 3.0}


def reference(
    embeddings: dict[str, np.ndarray],
    weights: dict[str, float],
    stored: np.ndarray,
    k: int = 10,
    t: float = 20.0,
    w: float = 0.5,
) -> np.ndarray:
    """forward_visual of the official code in float64: an exact inner-product search with the unnormalised mix."""
    total = sum(weights[m] for m in embeddings) + 1e-6
    v = sum(weights[m] / total * x / np.linalg.norm(x, axis=1, keepdims=True) for m, x in embeddings.items())
    out = []
    for q in v:
        sims = stored @ q
        top = np.argsort(-sims)[:k]
        p = np.exp(t * (sims[top] - sims[top].max()))
        proto = (p / p.sum()) @ stored[top]
        mixed = (1 - w) * q + w * proto / np.linalg.norm(proto)
        out.append(mixed / np.linalg.norm(mixed))
    return np.stack(out)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, list[str], np.ndarray]:
    tmp = tmp_path_factory.mktemp("cache")
    parts = write_parts(tmp, n=600, parts=2)
    stage_features(parts, Workspace(str(tmp)), ENC, DIM, str(tmp / "staged"), BuildSettings(values="float32"))
    stored = np.fromfile(tmp / "staged" / "values.f32", np.float32).reshape(-1, DIM).astype(np.float64)
    return Workspace(str(tmp / "ws")), parts, stored


def mixed_queries(stored: np.ndarray, b: int = 6) -> dict[str, np.ndarray]:
    """Image and audio embeddings near stored features but pointing elsewhere, of norms other than 1."""
    rng = np.random.default_rng(5)
    image = stored[rng.integers(0, len(stored), b)] + 0.2 * rng.normal(size=(b, DIM))
    audio = stored[rng.integers(0, len(stored), b)] + 0.2 * rng.normal(size=(b, DIM))
    return {"vision": 3.0 * image, "audio": 0.5 * audio}


@pytest.mark.parametrize(("values", "tol"), [("float32", 1e-6), ("float16", 2e-3)])
def test_image_and_audio_with_the_cache_equal_the_reference(
    features: tuple[Workspace, list[str], np.ndarray], values: str, tol: float
) -> None:
    ws, parts, stored = features
    build(ws, f"c-{values}", parts, ENC, DIM, "fp", BuildSettings(index_key="Flat", values=values, holdout=50))
    index = CacheIndex.open(ws, f"c-{values}", encoder_id=ENC, dim=DIM)
    assert index.meta["values"] == values and index.values.dtype == np.dtype(values)
    embeddings = mixed_queries(stored)
    mixed = mix_modalities({m: torch.from_numpy(x).float() for m, x in embeddings.items()}, WEIGHTS)
    assert 0.3 < float(mixed.norm(dim=-1).max()) < 0.95  # two modalities that disagree: the mix is not a unit vector
    sims, neighbours = cache_lookup(index, 10)(mixed)
    np.testing.assert_allclose(
        sims.numpy(), np.sort(stored @ mixed.double().numpy().T, axis=0)[::-1][:10].T, atol=tol
    )  # the reference's inner products, not cosines
    got = cache_mix(mixed, sims, neighbours).numpy()
    want = reference(embeddings, WEIGHTS, stored)
    assert np.abs(got - want).max() < tol
    # the ranking is the same whether the query is normalised or not; only the softmax's inputs differ
    _, ids_unit = index.search(torch.nn.functional.normalize(mixed, dim=-1).numpy(), 10)
    _, ids = index.search(mixed.numpy(), 10)
    assert (ids == ids_unit).all()


def test_the_float32_store_is_exact_and_twice_the_size(features: tuple[Workspace, list[str], np.ndarray]) -> None:
    ws, parts, stored = features
    metas = {
        v: build(ws, f"s-{v}", parts, ENC, DIM, "fp", BuildSettings(index_key="Flat", values=v, holdout=50))
        for v in ("float16", "float32")
    }
    assert metas["float32"]["values_bytes"] == 2 * metas["float16"]["values_bytes"] == 600 * DIM * 4
    exact = CacheIndex.open(ws, "s-float32").gather(np.arange(600))
    assert np.array_equal(exact, stored.astype(np.float32))
    rounded = CacheIndex.open(ws, "s-float16").gather(np.arange(600))
    assert 0 < np.abs(rounded - exact).max() < 1e-3
