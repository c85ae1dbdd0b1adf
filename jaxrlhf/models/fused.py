"""Fused projections for decoding: q|k|v as one `qkv_proj` and gate|up as one `gate_up_proj`.

A decode step is a few hundred small matrix products per token (seven per block at
SmolLM2-135M's 30 blocks, plus attention); one product per fused group instead of three
(or two) reads the same weights in fewer, larger dots. The decoder already runs fused
kernels (Phi-3 ships them: `cfg.fused_qkv`, `cfg.fused_gate_up`), so fusing is a change of
the weights and of two config switches, made once per rollout phase; training keeps the
separate kernels.

    qkv_proj.kernel = [W_q | W_k | W_v]              [..., D, q + 2·kv]   (biases likewise)
    gate_up_proj.kernel = [W_gate | W_up]            [..., D, 2F]

An unmerged adapter is fused exactly too: its A factors side by side, its B factors block
diagonal, so `(x·[A_q|A_k|A_v])·blockdiag(B_q, B_k, B_v) = [x·A_q·B_q | x·A_k·B_k | x·A_v·B_v]`
(the off-diagonal blocks are exact zeros). A part without an adapter contributes no
columns to A and zero rows to B.

Not fused (left as they are): quantized kernels (`models.quant`, a pytree of packed ints and
scales), an expert stack's gate/up (MoE), and a family that is fused already.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.quant import is_quantized

Params = dict[str, Any]
GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""Each fused projection and its parts, in the column order the decoder splits them."""


def _blocks(layers: Any) -> list[Params]:
    """The per-block trees of `layers` (a list of blocks, or one stacked tree)."""
    return layers if isinstance(layers, list) else [layers]


def fusable_groups(layers: Any) -> tuple[str, ...]:
    """The fused projections (`GROUPS` keys) whose parts are all in every block, dense."""
    groups = []
    for fused, parts in GROUPS.items():
        if all(
            all(p in block and not is_quantized(block[p]["kernel"]) for p in parts)
            for block in _blocks(layers)
        ):
            groups.append(fused)
    return tuple(groups)


def fused_config(cfg: ModelConfig, layers: Any) -> ModelConfig:
    """`cfg` with `fused_qkv` / `fused_gate_up` set where `layers` hold fused kernels."""
    first = _blocks(layers)[0]
    return cfg.replace(
        fused_qkv=cfg.fused_qkv or "qkv_proj" in first,
        fused_gate_up=cfg.fused_gate_up or "gate_up_proj" in first,
    )


def fuse_block(block: Params, groups: tuple[str, ...]) -> Params:
    """One block's (or the stacked blocks') weights with each group's kernels (and biases,
    Qwen2's q/k/v) concatenated on the output axis; other leaves unchanged."""
    out = dict(block)
    for fused in groups:
        parts = [out.pop(p) for p in GROUPS[fused]]
        weights = {"kernel": jnp.concatenate([w["kernel"] for w in parts], axis=-1)}
        if any("bias" in w for w in parts):
            weights["bias"] = jnp.concatenate(
                [w["bias"] if "bias" in w else _zero_bias(w["kernel"]) for w in parts],
                axis=-1,
            )
        out[fused] = weights
    return out


def _zero_bias(kernel: Any) -> Any:
    """Zeros shaped like the bias of `kernel` [..., in, out]: [..., out]."""
    return jnp.zeros((*kernel.shape[:-2], kernel.shape[-1]), kernel.dtype)


def fuse_block_lora(block_lora: Params, block: Params, groups: tuple[str, ...]) -> Params:
    """One block's adapter for the fused kernels of `fuse_block`: A factors side by side,
    B factors block diagonal (see the module docstring). `block` (the unfused weights)
    gives each part's output width, for the zero columns of a part with no adapter."""
    out = dict(block_lora)
    for fused in groups:
        names = GROUPS[fused]
        if not any(p in out for p in names):
            continue
        widths = [block[p]["kernel"].shape[-1] for p in names]
        offsets = [sum(widths[:i]) for i in range(len(names))]
        parts = [(out.pop(p, None), o) for p, o in zip(names, offsets, strict=True)]
        total = sum(widths)
        a_parts, b_parts = [], []
        for lora, offset in parts:
            if lora is None:
                continue
            b = lora["lora_B"]
            pad = [(0, 0)] * (b.ndim - 1) + [(offset, total - offset - b.shape[-1])]
            a_parts.append(lora["lora_A"])
            b_parts.append(jnp.pad(b, pad))
        out[fused] = {
            "lora_A": jnp.concatenate(a_parts, axis=-1),
            "lora_B": jnp.concatenate(b_parts, axis=-2),
        }
    return out


def fuse_for_decoding(
    cfg: ModelConfig, params: Params, lora: Params | None = None
) -> tuple[ModelConfig, Params, Params | None]:
    """(config, params, adapter) with q|k|v and gate|up fused wherever `fusable_groups`
    allows (params fused already pass through, with the config switches set to match), for the sampler's prefill and decode steps; their logits equal the unfused
    model's up to float32 rounding. `params["layers"]` and `lora["layers"]` may be lists of
    blocks (`unstack_layers`) or stacked trees. An adapter of several stacked adapters
    ([K, ...] leaves, `lora.stack_adapters`) must be concatenated first
    (`lora.concat_adapters`): its row scales then repeat once per fused part (see
    `transformer.linear`)."""
    layers = params["layers"]
    groups = fusable_groups(layers)
    if cfg.num_experts:  # the experts' gate/up live in layers.experts and stay apart
        groups = tuple(g for g in groups if g != "gate_up_proj")
    blocks = _blocks(layers)
    fused_blocks = [fuse_block(b, groups) for b in blocks]
    if lora is not None and "layers" in lora:
        pairs = zip(_blocks(lora["layers"]), blocks, strict=True)
        fused_lora = [fuse_block_lora(a, b, groups) for a, b in pairs]
        lora = {**lora, "layers": _like(lora["layers"], fused_lora)}
    params = {**params, "layers": _like(layers, fused_blocks)}
    return fused_config(cfg, fused_blocks), params, lora


def _like(layers: Any, blocks: list[Params]) -> Any:
    """`blocks` as a list if `layers` was one, else the one stacked tree."""
    return blocks if isinstance(layers, list) else blocks[0]
