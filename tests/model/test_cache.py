"""The cache mixing and modality mixing formulas against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import torch

from model.llm.cache import cache_mix, mix_modalities


def test_cache_mix_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(4, 16)).astype(np.float32) * 0.7  # an unnormalised mixed query
    vals = rng.normal(size=(4, 10, 16)).astype(np.float32)
    vals /= np.linalg.norm(vals, axis=-1, keepdims=True)
    sims = np.einsum("bkd,bd->bk", vals, q)
    t, w = 20.0, 0.5
    e = np.exp(t * sims - (t * sims).max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    proto = np.einsum("bk,bkd->bd", p, vals)
    proto /= np.linalg.norm(proto, axis=1, keepdims=True)
    mixed = (1 - w) * q + w * proto
    expected = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    got = cache_mix(torch.from_numpy(q), torch.from_numpy(sims), torch.from_numpy(vals), t, w)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(
        cache_mix(torch.from_numpy(q), torch.from_numpy(sims), torch.from_numpy(vals), w=0.0),
        torch.nn.functional.normalize(torch.from_numpy(q), dim=-1),
    )


def test_mix_modalities_is_weighted_and_not_renormalised() -> None:
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    out = mix_modalities({"image": a, "audio": b}, {"image": 1.0, "audio": 3.0})
    np.testing.assert_allclose(out.numpy(), [[1 / (4 + 1e-6), 3 / (4 + 1e-6)]], rtol=1e-6)
    assert out.norm() < 1.0
