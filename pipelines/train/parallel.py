"""How workers share the model: FSDP2 sharding, gradient sync per micro-batch, and the optimizer state gathered whole
(to save) or cut back into this rank's shards (to load)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from model.llm.model import ImageBindLLM
from pipelines.errors import InputError


def shard_model(model: ImageBindLLM, device: torch.device, world: int) -> ImageBindLLM:
    """FSDP2 over the `world` ranks of the default process group, in place: one unit per LLaMA decoder layer (its
    weights are gathered for its own forward and backward only), then the root (embeddings, head, final norm, bind
    network, prefix queries, gates). Every parameter, frozen or not, becomes a DTensor sharded on dim 0 and lives
    on `device`. Gradients are reduce-scattered as the mean over the world, as DDP averages them.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded by FSDP (its parameters are DTensors)."""
    return isinstance(model, FSDPModule)


def grad_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Where one micro-batch's forward runs: gradients are synchronised after the `last` micro-batch of a step only
    (FSDP: they accumulate unsharded on each rank and are reduce-scattered then; DDP: `no_sync` before it)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last)  # type: ignore[operator]
    elif not last and hasattr(model, "no_sync"):
        return model.no_sync()  # type: ignore[operator]
    return contextlib.nullcontext()


def gathered(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The full tensor on the CPU (an all-gather when `t` is a DTensor: every rank must call); None unless `keep`."""
    full = t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()
    return full.to("cpu", copy=True).contiguous() if keep else None


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any] | None:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole (every rank calls; None unless `keep`).

    Parameters are keyed by their position in the param groups (`decay_groups` of the phase's parameters, in
    model order), the same whatever the world size or ddp/fsdp, so the state loads under either.
    """
    sd = optimizer.state_dict()
    state = {
        i: {k: gathered(v, keep) if torch.is_tensor(v) else v for k, v in sorted(sd["state"][i].items())}
        for i in sorted(sd["state"])
    }
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def shard_like_params(sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state (from `full_optimizer_state`) cut to this rank's shard of each sharded parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = sum(len(g["params"]) for g in sd["param_groups"])
    if len(params) != saved:
        raise InputError(
            f"the checkpoint's optimizer state covers {saved} parameters, this run trains "
            f"{len(params)}: not the same phase or model"
        )
    state = {}
    for i, entries in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: _shard_like(v, p) for k, v in entries.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _shard_like(v: Any, p: torch.Tensor) -> Any:
    """`v` cut as `p` is sharded, where `p` is a DTensor and `v` a tensor of its shape (Adam's moments); else `v`."""
    if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape and v.ndim:
        return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return v
