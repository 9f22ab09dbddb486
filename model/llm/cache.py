"""ImageBind-LLM's modality mixing and training-free visual cache, batched and exact (pure torch)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

CACHE_K = 10  # neighbours mixed in
CACHE_T = 20.0  # softmax temperature on their similarities
CACHE_W = 0.5  # weight of the cache prototype against the query


def mix_modalities(embeddings: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum of L2-normalised modality embeddings, weights divided by (their sum + 1e-6).

    The result is NOT re-normalised (its norm is below 1 when the modalities disagree), as in the reference.

    Args:
        embeddings: modality -> (B, D).
        weights: modality -> weight (missing modalities weigh 1).
    """
    total = sum(float(weights.get(m, 1.0)) for m in embeddings) + 1e-6
    return sum(F.normalize(x.float(), dim=-1) * (float(weights.get(m, 1.0)) / total) for m, x in embeddings.items())


def cache_mix(
    query: torch.Tensor, sims: torch.Tensor, values: torch.Tensor, t: float = CACHE_T, w: float = CACHE_W
) -> torch.Tensor:
    """Mix a query with its nearest cached features.

    Args:
        query: (B, D), the (possibly unnormalised) mixed embedding that was searched with.
        sims: (B, k) its inner products with the neighbours.
        values: (B, k, D) the neighbours' features.
        t: softmax temperature; w: the prototype's weight.

    Returns:
        (B, D) normalised: normalise((1 - w) * query + w * normalise(softmax(t * sims) @ values)).
    """
    p = torch.softmax(sims.float() * t, dim=-1)  # (B, k)
    proto = F.normalize(torch.einsum("bk,bkd->bd", p, values.float()), dim=-1)  # (B, D)
    return F.normalize((1 - w) * query.float() + w * proto, dim=-1)
