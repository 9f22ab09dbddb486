"""ImageBind-LLM: a transformers LLaMA with a bind network, per-layer prefix queries and zero-init gated injection."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.llm.bind import BindNetwork
from model.llm.cache import CACHE_T, CACHE_W, cache_mix, mix_modalities
from model.llm.config import LLMConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # label of prompt and padding tokens (the reference uses 0; see prompts.encode_example)
LOSS_CHUNK = 2048  # rows of logits a summed loss computes at a time (2048 x 32000 fp32: 262 MB)

# (B, D) query -> ((B, k) inner products, (B, k, D) neighbour features): a visual cache lookup, wired by a pipeline
CacheLookup = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ImageBindLLM(nn.Module):
    """LLaMA (transformers, optionally with peft LoRA) + bind network + prefix queries + per-head gates.

    For each adapter layer i, `visual_query + prefix_query[i]` goes through that layer's base v_proj (never its
    LoRA), is scaled per head by tanh(gate_i) and added to the attention output of every position before o_proj.
    The gates start at zero, so a fresh model computes exactly what its LLaMA computes.
    """

    def __init__(self, config: LLMConfig, llama: PreTrainedModel | None = None, lora: bool = True) -> None:
        super().__init__()
        if config.kv_heads != config.n_heads:
            raise ValueError("the visual adapter needs one value head per query head (n_kv_heads == n_heads)")
        self.config = config
        llama = llama if llama is not None else LlamaForCausalLM(config.llama_config())
        _check_llama(llama, config)
        self.bind = BindNetwork(config.feature_dim, config.dim, config.bind_blocks, config.norm_eps)
        self.prefix_query = nn.Embedding(config.query_layer, config.dim)
        self.gates = nn.ParameterList(nn.Parameter(torch.zeros(config.n_heads)) for _ in range(config.query_layer))
        for layer in llama.model.layers:  # k/v biases exist only because transformers has one switch for all four
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                nn.init.zeros_(proj.bias)
        if lora:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
                warnings.simplefilter("ignore", FutureWarning)
                llama = get_peft_model(llama, lora_config(config))
        self.llama = llama
        self._visual: torch.Tensor | None = None
        self.loss_chunk = LOSS_CHUNK
        # a fused linear cross-entropy (weight, rows, targets, bias) -> summed loss, e.g. Liger-Kernel's; None = ours
        self.fused_loss: Callable[..., torch.Tensor] | None = None
        for i, index in enumerate(config.adapter_layers):
            attn = self.layers[index].self_attn
            attn.o_proj.register_forward_pre_hook(self._injector(i, attn))

    @property
    def base(self) -> LlamaForCausalLM:
        """The LlamaForCausalLM inside (with LoRA layers in place when present)."""
        return self.llama.get_base_model() if isinstance(self.llama, PeftModel) else self.llama

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.model.layers

    @property
    def has_lora(self) -> bool:
        return isinstance(self.llama, PeftModel)

    def _injector(self, i: int, attn: nn.Module) -> Callable:
        head_dim = self.config.head_dim

        def inject(module: nn.Module, args: tuple) -> tuple | None:
            visual = self._visual
            if visual is None:
                return None
            v_proj = attn.v_proj
            if getattr(v_proj, "merged", False):
                raise RuntimeError("LoRA is merged into v_proj: the visual adapter needs the unmerged base weight")
            base_v = getattr(v_proj, "base_layer", v_proj)
            adapter = visual + self.prefix_query.weight[i].to(visual.dtype)  # (B, 1, dim)
            value = base_v(adapter.to(base_v.weight.dtype))  # (B, 1, H * hd)
            gate = torch.tanh(self.gates[i]).to(value.dtype).repeat_interleave(head_dim)  # (H * hd,)
            value = value * gate
            x = args[0]
            if value.shape[0] != x.shape[0]:  # generation expanded the batch (several samples per prompt)
                value = value.repeat_interleave(x.shape[0] // value.shape[0], dim=0)
            return (x + value.to(x.dtype), *args[1:])

        return inject

    # ------------------------------------------------------------------ visual path

    def visual_query(
        self,
        embeddings: torch.Tensor | Mapping[str, torch.Tensor],
        weights: Mapping[str, float] | None = None,
        cache: CacheLookup | None = None,
        cache_t: float = CACHE_T,
        cache_w: float = CACHE_W,
    ) -> torch.Tensor:
        """ImageBind embeddings -> (B, 1, dim) bound visual query.

        Each modality's embedding is L2-normalised and weighted (weights / (sum + 1e-6), not re-normalised), as
        the reference does; a bare tensor is one modality of weight 1 (the training path). With a `cache`, the
        mixed vector, unnormalised, is searched in the visual cache and mixed with its neighbours by the softmax of
        its inner products with them (`model.llm.cache.cache_mix`; inference only).
        """
        if isinstance(embeddings, torch.Tensor):
            embeddings = {"vision": embeddings}
        mixed = mix_modalities(embeddings, weights or {})
        if cache is not None:
            sims, values = cache(mixed)
            mixed = cache_mix(mixed, sims.to(mixed.device), values.to(mixed.device), cache_t, cache_w)
        return self.bind(mixed.unsqueeze(1))

    @contextlib.contextmanager
    def injecting(self, visual: torch.Tensor | None) -> Iterator[None]:
        """Inject `visual` (B, 1, dim) into every adapter layer for the calls made inside the block."""
        previous, self._visual = self._visual, visual
        try:
            yield
        finally:
            self._visual = previous

    def checkpoint_layers(self, on: bool = True) -> None:
        """Activation checkpointing: each decoder layer keeps only its input for backward and runs again there.

        Wrapped here rather than with transformers' switch because the visual adapter is not an argument of the
        layers: the injected `visual` of the forward is handed to the recomputation (it runs in backward, after
        `injecting` has ended). Only calls with gradients enabled are checkpointed. Costs one more forward of the
        layers; activation memory becomes one layer's plus every layer's input.
        """
        for layer in self.layers:
            layer.__dict__.pop("forward", None)  # the class's forward again
            if on:
                layer.forward = self._checkpointed(layer.forward)

    def _checkpointed(self, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)

            def body(visual: torch.Tensor | None, *inputs):
                with self.injecting(visual):
                    return forward(*inputs, **kwargs)

            return checkpoint(body, self._visual, *args, use_reentrant=False)

        return run

    def keep_visual_path_only(self) -> None:
        """Drop the language model once a serving copy holds it (`model.llm.engine`): `visual_query` still works,
        `forward` no longer does."""
        self.llama = None

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
        sum_loss: bool = False,
        **llama_kwargs,
    ):
        """Logits (and `loss` when labels are given) with the visual feature injected.

        Args:
            input_ids: (B, L) token ids (right-padded for training: the causal mask keeps padding after the answer
                out of every scored position, as in the reference).
            features: (B, feature_dim) ImageBind embeddings, or `visual` (B, 1, dim) already bound; neither = text
                only through the plain LLaMA.
            labels: (B, L) with IGNORE on prompt and padding; the loss is the token mean over the batch.
            sum_loss: with labels, return only `loss`, the *sum* of the token losses (`summed_answer_loss`: from
                the final hidden states at the labelled positions, through lm_head in chunks; no logits).
        """
        if visual is None and features is not None:
            visual = self.visual_query(features)
        if sum_loss:
            if labels is None:
                raise ValueError("sum_loss needs labels")
            with self.injecting(visual):
                hidden = self.base.model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **llama_kwargs
                ).last_hidden_state
            loss = summed_answer_loss(hidden, labels, self.base.lm_head, self.loss_chunk, self.fused_loss)
            return CausalLMOutputWithPast(loss=loss)
        with self.injecting(visual):
            out = self.llama(input_ids=input_ids, attention_mask=attention_mask, **llama_kwargs)
        if labels is not None:
            out.loss = answer_loss(out.logits, labels)
        return out


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the non-IGNORE labels, token mean over the batch (0 when there are none)."""
    targets = labels[:, 1:].reshape(-1)
    if not bool((targets != IGNORE).any()):
        return logits.sum() * 0.0  # keeps the graph, as the reference's `logits.mean() * 0`
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE)


def summed_answer_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Linear,
    chunk: int = LOSS_CHUNK,
    fused: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the non-IGNORE labels, from the final hidden states (B, L, D).

    Equal to the cross-entropy of `head(hidden)`'s logits summed over the labelled positions, without the logits
    of the batch: the rows at labelled positions are gathered first (most prompt positions carry no label), then
    `chunk` rows at a time go through `head` and a float32 cross-entropy, each chunk under activation checkpointing
    so that its logits are not kept for backward (recomputed there, one chunk at a time). `fused(weight, rows,
    targets, bias)`, when given, computes the gathered rows' summed loss instead (a fused linear cross-entropy).
    0 (with a graph) when nothing is labelled.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows, targets = hidden[:, :-1][keep], targets[keep]  # (N, D), (N,)
    if rows.shape[0] == 0:
        return hidden.sum().float() * 0.0
    if fused is not None:
        weight = head.weight
        return fused(weight, rows.to(weight.dtype), targets, head.bias).float()
    grad = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = None
    for start in range(0, rows.shape[0], chunk):
        part = (rows[start : start + chunk], targets[start : start + chunk])
        loss = checkpoint(_chunk_loss, head, *part, use_reentrant=False) if grad else _chunk_loss(head, *part)
        total = loss if total is None else total + loss
    return total


def _chunk_loss(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def lora_config(config: LLMConfig) -> LoraConfig:
    """peft LoRA on all seven projections: rank and alpha from the config (16/16 = scaling 1), no dropout."""
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )


def _check_llama(llama: PreTrainedModel, config: LLMConfig) -> None:
    hf = llama.config
    theirs = (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size)
    ours = (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.intermediate_size)
    if theirs != ours:
        names = ("vocab_size", "dim", "n_layers", "n_heads", "intermediate_size")
        diff = ", ".join(f"{n} {a} vs {b}" for n, a, b in zip(names, theirs, ours, strict=True) if a != b)
        raise ValueError(f"the LLaMA model does not have this ImageBind-LLM's shape (model vs config): {diff}")
    if not (hf.attention_bias and hf.mlp_bias):
        raise ValueError("the LLaMA model needs attention_bias and mlp_bias (build it from LLMConfig.llama_config())")
