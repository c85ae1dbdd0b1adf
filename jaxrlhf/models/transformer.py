"""A Llama-family decoder as pure functions of a parameter pytree.

The parameters are a plain nested dict; the decoder blocks are stacked on a leading
`layers` axis and run with `lax.scan`, so compile time does not grow with depth:

    params = {
      "embed":  [V, D],
      "layers": {"input_norm": {"scale": [L, D]},
                 "q_proj": {"kernel": [L, D, H*hd], "bias"?: [L, H*hd]},
                 "k_proj", "v_proj": {"kernel": [L, D, KVH*hd], "bias"?},
                 "o_proj": {"kernel": [L, H*hd, D]},
                 "post_attn_norm": {"scale": [L, D]},
                 "gate_proj", "up_proj": {"kernel": [L, D, F]},
                 "down_proj": {"kernel": [L, F, D]}},
      "final_norm": {"scale": [D]},
      "lm_head"?: {"kernel": [D, V]},          # absent when embeddings are tied
      "score"?:   {"kernel": [D, num_labels]}, # reward model head (SEQ_CLS)
      "value"?:   {"kernel": [D, 1], "bias": [1]},  # PPO critic head
    }

A LoRA tree (see `jaxrlhf.lora`) mirrors the targeted kernels with `lora_A: [L, in, r]`
and `lora_B: [L, r, out]` and may carry full copies of heads (`modules_to_save`). It is
applied *unmerged* here: `y = x·W + s·(dropout(x)·A)·B`, so the frozen `W` is only read.
Passing `lora=None` is the base model: the reference policy of PPO/DPO, for free.

The cached forward of the sampler (prefill and decode steps) instead runs the blocks as an
unrolled loop, and accepts `layers` as a list of per-block trees (`unstack_layers`): inside
the decode loop each weight is then read where it lies, not sliced out of the stack at every
step (on CPU that slice is a copy of every weight per generated token).

Heads are separate functions so a reward or value pass never computes vocabulary logits.

Families differ by the switches of `ModelConfig` (see `models/config.py`): extra norms
(`pre_ffn_norm`, `post_ffn_norm`, `q_norm`, `k_norm` with `scale` leaves), fused kernels
(`qkv_proj`, `gate_up_proj`), and for a mixture of experts

    "layers": {..., "router": {"kernel": [L, D, E]},
               "experts": {"gate_proj", "up_proj": {"kernel": [L, E, D, F]},
                           "down_proj": {"kernel": [L, E, F, D]}}}

whose LoRA factors stack along the same expert axis (`lora_A: [L, E, in, r]`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models import dots
from jaxrlhf.models.config import ModelConfig, rope_inv_freq
from jaxrlhf.models.quant import (
    dense,
    is_one_vector,
    is_quantized,
    matmul,
    take_rows,
    tied,
    vector_product,
)

Params = dict[str, Any]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Llama's projections, the default LoRA targets; a family's own are `cfg.projections`."""
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_MASK_VALUE = -1e30  # finite, so a fully masked row (a pad query) gives no NaN


class KVCache(NamedTuple):
    """Keys/values of every layer for `S` slots; `valid[b, s]` marks slots holding a real token.

    Heads before slots, [L, B, KVH, S, hd] (as transformers' [B, H, S, hd]): attention's
    products batch over (row, kv head), and a dot's batch axes must lead, so a
    [B, S, KVH, hd] cache was transposed whole, every layer, at every decoded token
    (profiled on CPU: 16% of a batch-64 SmolLM2-135M decode step); this layout is read
    where it lies. A decode loop carries `k`/`v` as tuples of L per-layer arrays
    (`split_cache_layers`), so no step slices (copies) a layer out of the stack either."""

    k: Any  # [L, B, KVH, S, hd], or a tuple of L [B, KVH, S, hd]
    v: Any
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # int32 scalar: the slot the next token is written to


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    dtype = dtype or jnp.dtype(cfg.dtype)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, length), bool),
        index=jnp.zeros((), jnp.int32),
    )


def split_cache_layers(cache: KVCache) -> KVCache:
    """The cache with `k`/`v` as tuples of L per-layer arrays [B, KVH, S, hd] (a no-op if
    they are already): what a decode loop carries, so each layer's attention reads its
    own array in place rather than a slice (on CPU, a copy) of the stack at every token."""
    if isinstance(cache.k, tuple):
        return cache
    return cache._replace(k=tuple(cache.k), v=tuple(cache.v))


def stack_cache_layers(cache: KVCache) -> KVCache:
    """The cache with `k`/`v` stacked [L, B, KVH, S, hd] again (a no-op if they are)."""
    if not isinstance(cache.k, tuple):
        return cache
    return cache._replace(k=jnp.stack(cache.k), v=jnp.stack(cache.v))


# ----------------------------------------------------------------------------- init


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection kernel of a block (an expert's, for MoE MLPs)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "q_proj": (d, cfg.q_size),
        "k_proj": (d, cfg.kv_size),
        "v_proj": (d, cfg.kv_size),
        "qkv_proj": (d, cfg.q_size + 2 * cfg.kv_size),
        "o_proj": (cfg.q_size, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "gate_up_proj": (d, 2 * f),
        "down_proj": (f, d),
    }
    return {name: shapes[name] for name in cfg.projections}


def is_expert_projection(cfg: ModelConfig, name: str) -> bool:
    """Whether projection `name` lives in the expert stack (`layers.experts`)."""
    return cfg.num_experts > 0 and name in EXPERT_PROJECTIONS


def init_params(
    key: jax.Array, cfg: ModelConfig, *, heads: tuple[str, ...] = ("lm",), dtype=jnp.float32
) -> Params:
    """Random parameters (normal, std 0.02; lm_head std 1/sqrt(D); norms at one), for tests
    and from-scratch runs."""
    d, L = cfg.hidden_size, cfg.num_layers
    keys = iter(jax.random.split(key, 32))

    def normal(shape):
        return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def norm(n):  # a norm that starts as the identity: offset + w = 1
        return {"scale": jnp.full((L, n), 1.0 - cfg.norm_offset, dtype)}

    layers: Params = {name: norm(d) for name in cfg.norm_names}
    if cfg.qk_norm != "none":
        per_head = cfg.qk_norm == "head"
        layers["q_norm"] = norm(cfg.head_dim if per_head else cfg.q_size)
        layers["k_norm"] = norm(cfg.head_dim if per_head else cfg.kv_size)
    for name, (i, o) in projection_shapes(cfg).items():
        if is_expert_projection(cfg, name):
            layers.setdefault("experts", {})[name] = {"kernel": normal((L, cfg.num_experts, i, o))}
            continue
        layers[name] = {"kernel": normal((L, i, o))}
        if cfg.attention_bias and name in ("q_proj", "k_proj", "v_proj"):
            layers[name]["bias"] = normal((L, o))
    if cfg.num_experts:
        layers["router"] = {"kernel": normal((L, d, cfg.num_experts))}
    params: Params = {
        "embed": normal((cfg.vocab_size, d)),
        "layers": layers,
        "final_norm": {"scale": jnp.full((d,), 1.0 - cfg.norm_offset, dtype)},
    }
    if not cfg.tie_word_embeddings:
        # std 1/sqrt(D): unit-variance logits from the RMS-normed hidden state, so the output
        # distribution can be steered (a 0.02 std would pin it near uniform).
        lm = jax.random.normal(next(keys), (d, cfg.vocab_size), jnp.float32) / np.sqrt(d)
        params["lm_head"] = {"kernel": lm.astype(dtype)}
    for head in heads:
        if head in ("score", "value"):
            params[head] = init_head(next(keys), cfg, head, dtype=dtype)
        elif head != "lm":
            raise ValueError(f"Unknown head {head!r}; choose from 'lm', 'score', 'value'")
    return params


def init_head(key: jax.Array, cfg: ModelConfig, head: str, dtype=jnp.float32) -> Params:
    """A fresh `score` ([D, num_labels], no bias, as transformers) or `value` ([D, 1] + bias) head."""
    d = cfg.hidden_size
    if head == "score":
        return {"kernel": (0.02 * jax.random.normal(key, (d, cfg.num_labels))).astype(dtype)}
    if head == "value":
        return {
            "kernel": (0.02 * jax.random.normal(key, (d, 1))).astype(dtype),
            "bias": jnp.zeros((1,), dtype),
        }
    raise ValueError(f"Unknown head {head!r}; choose from 'score', 'value'")


def cast_params(params: Params, dtype) -> Params:
    """Store floating params in `dtype` (e.g. bfloat16 for a frozen base); quantized weights
    (`models.quant`) are kept as they are."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        params,
        is_leaf=is_quantized,
    )


# ----------------------------------------------------------------------------- layers


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """x / sqrt(mean(x²) + eps) · (offset + scale), over the last axis, in float32
    (offset 1 is Gemma's `(1 + w)`)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (offset + scale.astype(jnp.float32))).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap · tanh(x / cap) (Gemma's soft-capping); identity for cap None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half rotary embedding (HF layout). x: [B, T, H, hd], positions: [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


FEW_ROWS = 64
"""At most this many rows (tokens) per product, a weight stored [out, in] is multiplied as the
left operand (`linear`, `lm_logits`): measured on a Zen 3 EPYC, bare 16-row product chains
1.35× faster, and SmolLM2-135M's batch-16 decode step kept out of a slow mode of `x·W`
(160–200 ms instead of ~115 in three of five runs; docs/rollout_engine.md). Prefill-sized
products keep the usual orientation."""


def _rows(x: jax.Array) -> int:
    return x.size // x.shape[-1]


def _weight_left(w_out_in: jax.Array, x: jax.Array, **kw) -> jax.Array:
    """x·Wᵀ [..., out] computed as (W·xᵀ)ᵀ, the weight [out, in] as the left operand."""
    y = jax.lax.dot_general(w_out_in, x, (((1,), (x.ndim - 1,)), ((), ())), **kw)
    return jnp.moveaxis(y, 0, -1)


def kernels_out_in(block: Params, names=PROJECTIONS + ("qkv_proj", "gate_up_proj")) -> Params:
    """One block's dense 2-D projection kernels stored transposed, `kernel` [in, out] →
    `kernel_t` [out, in], for the decode loop (`FEW_ROWS`); quantized or expert kernels, the
    router and the norms stay as they are. Rollout weights only: training reads `kernel`."""
    out = dict(block)
    for name in names:
        kernel = block.get(name, {}).get("kernel")
        if kernel is not None and not is_quantized(kernel) and kernel.ndim == 2:
            rest = {k: v for k, v in block[name].items() if k != "kernel"}
            out[name] = {**rest, "kernel_t": kernel.T}
    return out


def read_kernel(weights: Params, dtype=None) -> jax.Array:
    """The one door to a frozen kernel: `weights["kernel"]` as a dense [..., in, out] array in
    `dtype`, dequantized here (inside the step) when it is a `models.quant.QuantizedArray`."""
    return dense(weights["kernel"], dtype)


def kernel_shape(weights: Params) -> tuple[int, ...]:
    """The logical shape [..., in, out] of `weights["kernel"]`, dense or quantized."""
    return tuple(weights["kernel"].shape)


def linear(
    x: jax.Array,
    weights: Params,
    lora: Params | None,
    lora_scale,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """`x·W (+b)`, plus the unmerged LoRA term `s·(dropout(x)·A)·B` when an adapter is given.

    `lora_scale` is a scalar `s`, or per-row column scales `S: [B, r]` for several adapters
    in one batch (`lora.concat_adapters`: K adapters side by side as one of rank K·r, and
    `lora.row_scales`): `y_b = x_b·W + ((x_b·A) ⊙ S_b)·B`, where row b's scales are its
    adapter's `s` on that adapter's r columns and 0 elsewhere, so a row sees only its own
    adapter (all zero: the base). x is then [B, T, in]."""
    if "kernel_t" in weights:  # stored [out, in] for decoding (`kernels_out_in`)
        kt = weights["kernel_t"].astype(x.dtype)
        if _rows(x) <= FEW_ROWS and x.dtype == jnp.float32:
            y = _weight_left(kt, x)
        else:
            y = dots.matmul_t(x, kt)
    else:
        y = matmul(x, weights["kernel"])
    if "bias" in weights:
        y = y + weights["bias"].astype(y.dtype)
    if lora is not None:
        xa = x
        if dropout_rate > 0.0 and dropout_rng is not None:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, x.shape)
            xa = jnp.where(keep, x / (1.0 - dropout_rate), 0).astype(x.dtype)
        a = lora["lora_A"].astype(x.dtype)
        b = lora["lora_B"].astype(x.dtype)
        if jnp.ndim(lora_scale) == 2:  # several adapters, one per row
            y = y + row_lora_delta(xa, a, b, jnp.asarray(lora_scale, x.dtype))
        else:
            y = y + lora_delta(xa, a, b, jnp.asarray(lora_scale, x.dtype))
    return y


def row_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, row_scales: jax.Array) -> jax.Array:
    """`((x·A) ⊙ S)·B` for x [B, T, in], A [in, R], B [R, out], S [B, R]: each row's own
    scaled columns of a concatenated adapter (see `linear`). One dense dot per factor, no
    gather: on CPU a decode step costs what one adapter's does (docs/rollout_engine.md)."""
    xa = jnp.einsum("bti,ir->btr", x, a) * row_scales[:, None, :]
    return jnp.einsum("btr,ro->bto", xa, b)


@jax.custom_vjp
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """`s·(x·A)·B` for x [..., in], A [in, r], B [r, out].

    The backward is written by hand because the derived one contracts A's gradient over
    the token axis with the large [tokens, out] cotangent transposed in memory (XLA:CPU
    lays the dot out that way), which cost as much as the whole forward pass. Here every
    transpose is of a rank-r matrix and each dot is a plain [m, k]·[k, n] product.
    """
    return _lora_delta_fwd(x, a, b, scale)[0]


def _lora_delta_fwd(x, a, b, scale):
    xa = dots.einsum("...i,ir->...r", x, a)
    return dots.einsum("...r,ro->...o", xa, b) * scale, (x, a, b, xa, scale)


def _lora_delta_bwd(res, g):
    x, a, b, xa, scale = res
    tokens_x = x.reshape(-1, x.shape[-1])  # [N, in]
    tokens_g = g.reshape(-1, g.shape[-1])  # [N, out]
    tokens_xa = xa.reshape(-1, xa.shape[-1])  # [N, r]
    g_xa_unscaled = dots.einsum("no,ro->nr", tokens_g, b)  # [N, r]
    g_xa = g_xa_unscaled * scale
    g_a = dots.einsum(
        "rn,ni->ri", g_xa.T, tokens_x
    ).T  # [in, r]: the [r, N] transpose is the small one
    g_b = dots.einsum("rn,no->ro", tokens_xa.T, tokens_g) * scale  # [r, out]
    g_x = dots.einsum("nr,ir->ni", g_xa, a).reshape(x.shape)
    g_scale = jnp.sum(g_xa_unscaled * tokens_xa).astype(scale.dtype).reshape(scale.shape)
    return g_x, g_a, g_b, g_scale


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def build_attention_mask(
    key_valid: jax.Array,
    q_slots: jax.Array,
    k_slots: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
) -> jax.Array:
    """[B, T, S] bool: causal by slot, real keys only, and (for packed prefix sharing) a key
    of segment > 0 is seen only by queries of the same segment; segment 0 is shared by all."""
    mask = (k_slots[None, None, :] <= q_slots[None, :, None]) & key_valid[:, None, :]
    if q_segments is not None:
        same = (k_segments[:, None, :] == 0) | (k_segments[:, None, :] == q_segments[:, :, None])
        mask = mask & same
    return mask


def _attention(q, k, v, mask, cfg: ModelConfig):
    """Grouped-query attention. q: [B,T,H,hd]; k, v: [B,KVH,S,hd]; mask: [B,T,S]."""
    b, t, _, hd = q.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, hd)
    scores = dots.einsum("btkgh,bksh->bkgts", q, k).astype(jnp.float32) * cfg.attention_scale
    scores = softcap(scores, cfg.attn_logit_softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = dots.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, cfg.num_heads * hd)


def _pick(flag, full, local):
    """`local` on a sliding layer, else `full`; `flag` is a Python bool (unrolled loop) or a
    traced one (the scan over stacked layers)."""
    if local is None:
        return full
    if isinstance(flag, bool):
        return local if flag else full
    return jnp.where(flag, local, full)


def _block(
    cfg: ModelConfig,
    x,
    layer: Params,
    layer_lora: Params | None,
    lora_scale,
    positions,
    masks,
    sliding,
    kv: tuple | None,
    write_index,
    dropout_rate,
    dropout_rng,
):
    """One decoder block. With `kv` = (k cache, v cache, this block's index) — the stacked
    [L, B, KVH, S, hd] caches — or (k, v, None) — this block's own [B, KVH, S, hd] arrays
    (`split_cache_layers`) — new keys/values are written in place at `write_index` and
    attention runs over this block's whole cache; the updated caches come back.
    `masks` = (full, sliding-window or None) and `sliding` says which one this layer uses.
    Returns (x, new caches, router logits [B, T, E] or None)."""
    b, t, _ = x.shape
    names = cfg.projections
    rngs = (
        jax.random.split(dropout_rng, len(names))
        if dropout_rng is not None
        else [None] * len(names)
    )
    rng_of = dict(zip(names, rngs, strict=True))

    def proj(name, h):
        sub = None if layer_lora is None else layer_lora.get(name)
        return linear(h, layer[name], sub, lora_scale, dropout_rate, rng_of[name])

    def norm(name, h):
        return rms_norm(h, layer[name]["scale"], cfg.rms_norm_eps, cfg.norm_offset)

    def attention(h):
        if cfg.fused_qkv:
            q, k, v = jnp.split(proj("qkv_proj", h), [cfg.q_size, cfg.q_size + cfg.kv_size], -1)
        else:
            q, k, v = proj("q_proj", h), proj("k_proj", h), proj("v_proj", h)
        if cfg.qk_norm == "projection":  # OLMo 2: over the whole projection, before the split
            q, k = norm("q_norm", q), norm("k_norm", k)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":  # Qwen3, Gemma 3: per head, over head_dim
            q, k = norm("q_norm", q), norm("k_norm", k)
        inv_freq = _pick(
            sliding,
            jnp.asarray(rope_inv_freq(cfg)),
            jnp.asarray(rope_inv_freq(cfg, local=True)) if cfg.local_rope_theta else None,
        )
        q = rope(q, positions, inv_freq)
        k = rope(k, positions, inv_freq)
        if kv is not None and kv[2] is None:  # this block's own [B, KVH, S, hd] arrays
            k_cache, v_cache, _ = kv
            at = (0, 0, write_index, 0)
            k_cache, v_cache = (
                jax.lax.dynamic_update_slice(c, x.swapaxes(1, 2).astype(c.dtype), at)
                for c, x in ((k_cache, k), (v_cache, v))
            )
            k_all, v_all, new_kv = (
                k_cache.astype(q.dtype),
                v_cache.astype(q.dtype),
                (k_cache, v_cache),
            )
        elif kv is not None:  # the stacked caches: block i is sliced (copied) out
            k_cache, v_cache, i = kv
            at = (i, 0, 0, write_index, 0)
            new_k, new_v = (x.swapaxes(1, 2)[None].astype(k_cache.dtype) for x in (k, v))
            k_cache = jax.lax.dynamic_update_slice(k_cache, new_k, at)
            v_cache = jax.lax.dynamic_update_slice(v_cache, new_v, at)
            k_all, v_all, new_kv = (
                k_cache[i].astype(q.dtype),
                v_cache[i].astype(q.dtype),
                (k_cache, v_cache),
            )
        else:  # the training forward: keys in the order of the tokens
            k_all, v_all, new_kv = k.swapaxes(1, 2), v.swapaxes(1, 2), None
        mask = _pick(sliding, *masks)
        return proj("o_proj", _attention(q, k_all, v_all, mask, cfg)), new_kv

    def mlp(h):
        if cfg.num_experts:
            experts_lora = None if layer_lora is None else layer_lora.get("experts")
            return moe_mlp(h, layer, experts_lora, lora_scale, cfg=cfg)
        if cfg.fused_gate_up:
            gate, up = jnp.split(proj("gate_up_proj", h), 2, axis=-1)
        else:
            gate, up = proj("gate_proj", h), proj("up_proj", h)
        return proj("down_proj", _activation(cfg, gate) * up), None

    # (norm before, norm after) each sub-layer: x + after(f(before(x))).
    attn_norms, mlp_norms = {
        "pre": (("input_norm", None), ("post_attn_norm", None)),
        "sandwich": (("input_norm", "post_attn_norm"), ("pre_ffn_norm", "post_ffn_norm")),
        "post": ((None, "post_attn_norm"), (None, "post_ffn_norm")),
    }[cfg.norm_placement]
    before, after = attn_norms
    h, new_kv = attention(norm(before, x) if before else x)
    x = x + (norm(after, h) if after else h)
    before, after = mlp_norms
    h, router_logits = mlp(norm(before, x) if before else x)
    x = x + (norm(after, h) if after else h)
    return x, new_kv, router_logits


def _activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.mlp_activation == "gelu_tanh":  # transformers' gelu_pytorch_tanh
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


# ----------------------------------------------------------------------------- experts


def route(router_logits: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Top-k routing [N, E] -> (weights [N, k] float32, expert ids [N, k]): the k largest
    softmax probabilities, renormalised to sum to one with `norm_topk_prob`."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def _expert_linear_dense(x_en, w, lora, lora_scale):
    """Every expert on every token: x [E, N, in] · W [E, in, out] (+ LoRA) -> [E, N, out]."""
    y = dots.einsum_grad("eni,eio->eno", x_en, read_kernel(w, x_en.dtype))
    if lora is not None:
        xa = dots.einsum_grad("eni,eir->enr", x_en, lora["lora_A"].astype(x_en.dtype))
        delta = dots.einsum_grad("enr,ero->eno", xa, lora["lora_B"].astype(x_en.dtype))
        y = y + delta * lora_scale
    return y


def _expert_linear_ragged(x_sorted, w, lora, lora_scale, group_sizes):
    """Rows sorted by expert, each through its own expert: `jax.lax.ragged_dot` (+ LoRA)."""
    y = dots.ragged_dot(x_sorted, read_kernel(w, x_sorted.dtype), group_sizes)
    if lora is not None:
        a, bb = (lora[n].astype(x_sorted.dtype) for n in ("lora_A", "lora_B"))
        xa = dots.ragged_dot(x_sorted, a, group_sizes)
        y = y + dots.ragged_dot(xa, bb, group_sizes) * lora_scale
    return y


def moe_mlp(
    x: jax.Array, layer: Params, experts_lora: Params | None, lora_scale, *, cfg: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """A mixture of SwiGLU experts on x [B, T, D]: y = Σ_{e in top-k(x)} w_e · down_e(silu(gate_e
    x) · up_e x). Returns (y, router logits [B, T, E]). The experts run as one batched
    computation, by `cfg.moe_dispatch`:

    - `dense`: every expert on every token, weighted by the (mostly zero) routing weights;
      E/k times the FLOPs, but plain einsums that shard on the `expert` axis.
    - `ragged`: the N·k (token, expert) pairs sorted by expert and run through
      `jax.lax.ragged_dot`, only the FLOPs of the chosen experts.
    """
    b, t, d = x.shape
    tokens = x.reshape(b * t, d)
    logits = jnp.einsum(
        "nd,de->ne",
        tokens,
        read_kernel(layer["router"], x.dtype),
        preferred_element_type=jnp.float32,
    )
    weights, chosen = route(logits, cfg)
    experts = layer["experts"]
    lora = experts_lora or {}
    if cfg.moe_dispatch == "dense":
        combine = jnp.sum(
            jax.nn.one_hot(chosen, cfg.num_experts, dtype=jnp.float32) * weights[..., None], 1
        )  # [N, E]
        x_en = jnp.broadcast_to(tokens[None], (cfg.num_experts, *tokens.shape))
        gate = _expert_linear_dense(x_en, experts["gate_proj"], lora.get("gate_proj"), lora_scale)
        up = _expert_linear_dense(x_en, experts["up_proj"], lora.get("up_proj"), lora_scale)
        out = _expert_linear_dense(
            jax.nn.silu(gate) * up, experts["down_proj"], lora.get("down_proj"), lora_scale
        )
        y = dots.einsum_grad("end,ne->nd", out, combine.astype(out.dtype))
    else:
        k = cfg.num_experts_per_tok
        flat = chosen.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token_of = order // k
        group_sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
        xs = tokens[token_of]

        def run(name, h):
            return _expert_linear_ragged(h, experts[name], lora.get(name), lora_scale, group_sizes)

        out = run("down_proj", jax.nn.silu(run("gate_proj", xs)) * run("up_proj", xs))
        w = weights.reshape(-1)[order].astype(out.dtype)
        y = jnp.zeros_like(tokens).at[token_of].add(out * w[:, None])
    return y.reshape(b, t, d), logits.reshape(b, t, -1)


def load_balancing_loss(
    router_logits: jax.Array, attention_mask: jax.Array, *, top_k: int
) -> jax.Array:
    """The Switch-Transformer auxiliary loss over real tokens, as transformers'
    `load_balancing_loss_func`: with f_e the fraction of (token, slot) choices that went to
    expert e and P_e its mean router probability, over every layer and real token,

        loss = E · Σ_e f_e · P_e          (= k when routing is perfectly uniform)

    router_logits [L, B, T, E] (from `backbone(..., with_router_logits=True)`)."""
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    counts = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=-2)
    m = attention_mask.astype(jnp.float32)[None, :, :, None]
    rows = router_logits.shape[0] * jnp.sum(attention_mask.astype(jnp.float32))
    frac = jnp.sum(counts * m, axis=(0, 1, 2)) / rows
    mean_prob = jnp.sum(probs * m, axis=(0, 1, 2)) / rows
    return num_experts * jnp.sum(frac * mean_prob)


def router_aux_loss(
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    cfg: ModelConfig,
    lora: Params | None = None,
    lora_scale: Any = 1.0,
) -> jax.Array:
    """`router_aux_loss_coef · load_balancing_loss` of a MoE model on a batch (a training
    loss adds it; 0 for a dense model). To get it from the same forward as the hidden
    states, call `backbone(..., with_router_logits=True)` and `load_balancing_loss`."""
    if not cfg.num_experts:
        return jnp.zeros((), jnp.float32)
    _, _, logits = backbone(
        params,
        input_ids,
        attention_mask,
        cfg=cfg,
        lora=lora,
        lora_scale=lora_scale,
        with_router_logits=True,
    )
    return cfg.router_aux_loss_coef * load_balancing_loss(
        logits, attention_mask, top_k=cfg.num_experts_per_tok
    )


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids counting real tokens only, so left padding does not shift positions."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def backbone(
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    cfg: ModelConfig,
    lora: Params | None = None,
    lora_scale: Any = 1.0,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    with_router_logits: bool = False,
) -> tuple[jax.Array, KVCache | None]:
    """Final hidden states [B, T, D] (after the last norm) and the updated cache
    (and, with `with_router_logits`, a MoE model's router logits [L, B, T, E] third).

    input_ids, attention_mask: [B, T]. Without a cache, attention is causal over these T
    tokens. With a cache, the T tokens are written at `cache.index` and attend to every
    valid slot before them (prefill: T = prompt length; decode: T = 1).
    `segment_ids` [B, T] enable packed prefix sharing (see `build_attention_mask`).
    """
    dtype = jnp.dtype(cfg.dtype)
    t = input_ids.shape[1]
    if positions is None:
        positions = positions_from_mask(attention_mask)
    x = take_rows(params["embed"], input_ids, dtype)
    if cfg.embed_scale:  # Gemma: sqrt(D), rounded to the compute dtype as transformers does
        x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype)
    window = None
    if cache is None:
        slots = jnp.arange(t)
        mask = build_attention_mask(
            attention_mask.astype(bool), slots, slots, segment_ids, segment_ids
        )
        write_index = None
        if cfg.sliding_window is not None:  # distance in positions: right for packed rows too
            window = (positions[:, :, None] - positions[:, None, :]) < cfg.sliding_window
    else:
        write_index = cache.index
        valid = jax.lax.dynamic_update_slice_in_dim(
            cache.valid, attention_mask.astype(bool), write_index, 1
        )
        s = cache.valid.shape[1]
        q_slots = write_index + jnp.arange(t)
        mask = build_attention_mask(valid, q_slots, jnp.arange(s))
        if cfg.sliding_window is not None:  # a row's real tokens sit in consecutive slots
            window = (q_slots[:, None] - jnp.arange(s)[None, :] < cfg.sliding_window)[None]
    masks = (mask, None if window is None else mask & window)
    flags = cfg.layer_is_sliding
    mixed = any(flags) and not all(flags)

    layers = params["layers"]
    layer_lora = None if lora is None else lora.get("layers")
    layer_rngs = jax.random.split(dropout_rng, cfg.num_layers) if dropout_rng is not None else None

    def block(x, layer, l_lora, kv, rng, sliding):
        return _block(
            cfg,
            x,
            layer,
            l_lora,
            lora_scale,
            positions,
            masks,
            sliding,
            kv,
            write_index,
            dropout_rate,
            rng,
        )

    # the training forward's blocks are recomputed in the backward with `remat="block"`;
    # the cached forward is never differentiated
    unrolled_block = (
        jax.checkpoint(block, static_argnums=(5,), prevent_cse=False)
        if (cache is None and cfg.remat == "block")
        else block
    )
    new_cache = None
    router_logits = None
    if cache is None and not isinstance(layers, list) and scans_layers(cfg):

        def step(x, xs):
            sliding = xs[3] if mixed else all(flags)
            x, _, logits = block(x, *xs[:2], None, xs[2], sliding)
            return x, logits

        if cfg.remat == "block":
            step = jax.checkpoint(step, prevent_cse=False)
        sliding_xs = jnp.asarray(flags) if mixed else None
        x, router_logits = jax.lax.scan(step, x, (layers, layer_lora, layer_rngs, sliding_xs))
    else:  # the cached (sampling) forward: an unrolled loop over the blocks
        layers = layers if isinstance(layers, list) else unstack_layers(layers)
        if layer_lora is not None and not isinstance(layer_lora, list):
            layer_lora = unstack_layers(layer_lora)
        per_layer = cache is not None and isinstance(cache.k, tuple)
        kv = None if cache is None else (cache.k, cache.v)
        new_k, new_v, per_layer_logits = [], [], []
        for i, layer in enumerate(layers):
            if kv is None:
                block_kv = None
            else:
                block_kv = (kv[0][i], kv[1][i], None) if per_layer else (*kv, i)
            x, out_kv, logits = unrolled_block(
                x,
                layer,
                None if layer_lora is None else layer_lora[i],
                block_kv,
                None if layer_rngs is None else layer_rngs[i],
                flags[i],
            )
            if per_layer:
                new_k.append(out_kv[0])
                new_v.append(out_kv[1])
            elif kv is not None:
                kv = out_kv
            per_layer_logits.append(logits)
        if cfg.num_experts:
            router_logits = jnp.stack(per_layer_logits)
        if per_layer:
            kv = (tuple(new_k), tuple(new_v))
        if cache is not None:
            new_cache = KVCache(k=kv[0], v=kv[1], valid=valid, index=write_index + t)
    x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps, cfg.norm_offset)
    if with_router_logits:
        return x, new_cache, router_logits
    return x, new_cache


def scans_layers(cfg: ModelConfig) -> bool:
    """Whether the uncached forward runs its blocks as a `lax.scan` (`cfg.layer_loop`). `auto`
    scans, except for low-precision activations on the CPU: there XLA stores each block's
    bf16 residuals into the stacked `[L, ...]` buffers through a float32 round trip of the
    whole buffer at every block (L² traffic; docs/speed.md, "bfloat16 on the CPU"), which an
    unrolled loop never forms."""
    if cfg.layer_loop != "auto":
        return cfg.layer_loop == "scan"
    return cfg.dtype == "float32" or jax.default_backend() != "cpu"


def unstack_layers(layers: Params) -> list[Params]:
    """The stacked block tree ([L, ...] leaves) as a list of L per-block trees: separate
    arrays, which the cached forward reads in place (see the module docstring)."""
    if isinstance(layers, list):
        return layers
    n = jax.tree.leaves(layers)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)]


# ----------------------------------------------------------------------------- heads


def head_weights(params: Params, lora: Params | None, name: str) -> Params:
    """A head's weights: the adapter's trained copy (modules_to_save) if it has one."""
    if lora is not None and name in lora:
        return lora[name]
    if name not in params:
        raise KeyError(
            f"The model has no {name!r} head; create one with jaxrlhf.init_head or load a "
            f"checkpoint that has it"
        )
    return params[name]


def lm_kernel(params: Params) -> jax.Array:
    """The output projection [D, V]: the tied embedding's transpose or the lm_head (dense;
    a quantized one is dequantized here)."""
    return dense(params["embed"]).T if "lm_head" not in params else read_kernel(params["lm_head"])


def lm_logits(
    params: Params, hidden: jax.Array, *, logit_softcap: float | None = None
) -> jax.Array:
    """Vocabulary logits [B, T, V] in float32 (soft-capped: `cfg.final_logit_softcap`)."""
    head = params["lm_head"]["kernel"] if "lm_head" in params else params["embed"]
    if is_quantized(head):
        head, hidden = tied(head, hidden)  # dequantized per call, not hoisted out of a loop
        if head.codes.ndim == 2 and is_one_vector(hidden):
            # One decode token: read the packed rows (stored [V, D] for both the tied
            # embedding and an lm_head kernel), no dense [D, V] weight.
            return softcap(vector_product(hidden, head), logit_softcap)
        kernel = dense(head) if "lm_head" in params else dense(head).T
    elif "lm_head" not in params and 1 < _rows(hidden) <= FEW_ROWS // 2:
        # a few rows on the tied [V, D] table, as the left operand (`FEW_ROWS`; the bare
        # product measured: 16 rows 2× faster, 1 row 5–10% slower, 64 rows either way)
        logits = _weight_left(head.astype(hidden.dtype), hidden, preferred_element_type=jnp.float32)
        return softcap(logits, logit_softcap)
    elif _rows(hidden) == 1:  # one decode token (bf16: on two rows, `dots.row_logits`)
        tied_table = "lm_head" not in params
        logits = dots.row_logits(hidden, head.astype(hidden.dtype), transposed=tied_table)
        return softcap(logits, logit_softcap)
    else:
        kernel = lm_kernel(params)
    logits = jnp.einsum(
        "btd,dv->btv", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    return softcap(logits, logit_softcap)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row (works for left and right padding)."""
    t = attention_mask.shape[-1]
    return jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(t), 0), axis=-1)


def score_head(
    params: Params, hidden: jax.Array, attention_mask: jax.Array, lora: Params | None = None
) -> jax.Array:
    """Sequence scores read at the last real token, as `*ForSequenceClassification`.
    Returns [B] when num_labels == 1, else [B, num_labels]."""
    w = head_weights(params, lora, "score")
    last = jnp.take_along_axis(hidden, last_token_index(attention_mask)[:, None, None], axis=1)[
        :, 0
    ]
    scores = jnp.einsum(
        "bd,dl->bl", last, w["kernel"].astype(last.dtype), preferred_element_type=jnp.float32
    )
    return scores[:, 0] if scores.shape[-1] == 1 else scores


def value_head(params: Params, hidden: jax.Array, lora: Params | None = None) -> jax.Array:
    """Per-token values [B, T] in float32."""
    w = head_weights(params, lora, "value")
    v = jnp.einsum(
        "btd,do->bto", hidden, w["kernel"].astype(hidden.dtype), preferred_element_type=jnp.float32
    )[..., 0]
    return v + w["bias"].astype(jnp.float32)[0]


def token_logprobs(
    params: Params,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
    logit_softcap: float | None = None,
    entropy_grad: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """log p(targets[b, t] | hidden[b, t]) [B, T] (and the entropy) in float32, computed
    `chunk_size` positions at a time so a full [B, T, V] float32 log-softmax never exists
    (the backward keeps per-token vectors, not logits: `_chunk_logprobs`). A model with a
    final soft-cap (Gemma 2) must pass `logit_softcap=cfg.final_logit_softcap`: p = softmax(cap·tanh(z/cap)/T).

    `entropy_grad=False`: the entropy is a metric, with no gradient (GRPO's logged entropy,
    PPO's at `entropy_coef` 0); it is then read off the logits the log-probabilities already
    form, and the log-probabilities keep their hand-written backward (two vocabulary
    products a chunk instead of differentiating the softmax through three)."""
    kernel = lm_kernel(params).astype(hidden.dtype)
    b, t, d = hidden.shape
    chunk = min(chunk_size, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n_chunks, chunk, d)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n_chunks, chunk)

    @jax.checkpoint
    def chunk_with_entropy(h_c, y_c):
        logits = _logits_chunk(h_c, kernel, temperature, logit_softcap)[0]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        probs = jax.nn.softmax(logits, axis=-1)
        return picked - lse, lse - jnp.sum(probs * logits, axis=-1)

    def chunk(h_c, y_c):  # the common case, with a hand-written backward
        t = jnp.asarray(temperature, jnp.float32)
        if logit_softcap is not None:
            cap = jnp.asarray(logit_softcap, jnp.float32)
            return _chunk_logprobs_capped(h_c, kernel, y_c, t, cap), None
        return _chunk_logprobs(h_c, kernel, y_c, t), None

    def chunk_with_metric_entropy(h_c, y_c):
        t = jnp.asarray(temperature, jnp.float32)
        if logit_softcap is not None:
            cap = jnp.asarray(logit_softcap, jnp.float32)
            return _chunk_logprobs_entropy_capped(h_c, kernel, y_c, t, cap)
        return _chunk_logprobs_entropy(h_c, kernel, y_c, t)

    if not with_entropy:
        one_chunk = chunk
    else:
        one_chunk = chunk_with_entropy if entropy_grad else chunk_with_metric_entropy

    lp, ent = jax.lax.map(lambda xs: one_chunk(*xs), (h.swapaxes(0, 1), y.swapaxes(0, 1)))
    lp = lp.swapaxes(0, 1).reshape(b, -1)[:, :t]
    if with_entropy:
        ent = ent.swapaxes(0, 1).reshape(b, -1)[:, :t]
    return lp, ent


def _logits_chunk(h_c, kernel, temperature, cap=None):
    """(logits / T, tanh(z / cap) or None): z = h·W, soft-capped when `cap` is given."""
    z = jnp.einsum("bcd,dv->bcv", h_c, kernel, preferred_element_type=jnp.float32)
    if cap is None:
        return z / temperature, None
    t = jnp.tanh(z / cap)
    return cap * t / temperature, t


# The gradient of lp = l_y − logsumexp(l) in the logits l is (onehot(y) − softmax(l))·g, g the
# upstream cotangent: one scalar per token. Two backward rules follow from it:
# - a frozen kernel (LoRA, the reference model: no gradient for W): the forward also forms the
#   per-token direction Σ_v (onehot(y) − p)_v · dl_v/dh, one product of the same size as the
#   logits, and the backward only scales it by g: two vocabulary products in all, and no
#   logits kept or recomputed;
# - a trained kernel (full fine-tuning, a trained head): dW = hᵀ·dl needs dl itself, so the
#   backward keeps the log-normaliser and recomputes the logits once, with no second max/sum
#   pass over the vocabulary (what rematerialising the forward costs): three products.
# `symbolic_zeros` tells the forward which of the two holds (`kernel.perturbed`).


@jax.custom_vjp
def _chunk_logprobs(h_c, kernel, y_c, temperature):
    """log p(y | h) for one chunk [b, c] (logits h·W / T; the backward rules above)."""
    return _chunk_values(h_c, kernel, y_c, temperature)[0]


@jax.custom_vjp
def _chunk_logprobs_capped(h_c, kernel, y_c, temperature, cap):
    """`_chunk_logprobs` with soft-capped logits l = cap·tanh(z/cap)/T; the chain rule adds
    dl/dz = (1 − tanh²(z/cap)) / T to both backward rules."""
    return _chunk_values(h_c, kernel, y_c, temperature, cap)[0]


def _chunk_values(h_c, kernel, y_c, temperature, cap=None):
    """(log p(y) [b, c], logits, lse, tanh(z / cap) or None) of one chunk."""
    logits, t = _logits_chunk(h_c, kernel, temperature, cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
    return picked - lse, logits, lse, t


def _logit_grads(logits, lse, t, y_c, temperature):
    """d lp / d z [b, c, V] for g = 1: (onehot(y) − p) · dl/dz."""
    onehot = jnp.arange(logits.shape[-1]) == y_c[..., None]
    d = (onehot - jnp.exp(logits - lse[..., None])) / temperature
    return d if t is None else d * (1.0 - t * t)


@jax.custom_vjp
def _chunk_logprobs_entropy(h_c, kernel, y_c, temperature):
    """(`_chunk_logprobs`, the entropy of the same softmax as a value with no gradient)."""
    lp, logits, lse, _ = _chunk_values(h_c, kernel, y_c, temperature)
    return lp, _entropy(logits, lse)


@jax.custom_vjp
def _chunk_logprobs_entropy_capped(h_c, kernel, y_c, temperature, cap):
    """`_chunk_logprobs_entropy` with soft-capped logits."""
    lp, logits, lse, _ = _chunk_values(h_c, kernel, y_c, temperature, cap)
    return lp, _entropy(logits, lse)


def _entropy(logits, lse):
    """H(softmax(logits)) = lse − Σ p·l, as `token_logprobs`' differentiable entropy."""
    return lse - jnp.sum(jnp.exp(logits - lse[..., None]) * logits, axis=-1)


def _chunk_fwd(h_c, kernel, y_c, temperature, cap=None):
    lp, _, _, res = _chunk_fwd_parts(h_c, kernel, y_c, temperature, cap)
    return lp, res


def _chunk_entropy_fwd(h_c, kernel, y_c, temperature, cap=None):
    lp, logits, lse, res = _chunk_fwd_parts(h_c, kernel, y_c, temperature, cap)
    return (lp, _entropy(logits, lse)), res


def _chunk_entropy_bwd(n_args, res, g):
    return _chunk_bwd(n_args, res, g[0])  # the entropy's cotangent is dropped: a metric


def _chunk_fwd_parts(h_c, kernel, y_c, temperature, cap=None):
    """(log p, logits, lse, the residuals of `_chunk_bwd`) of one chunk."""
    trained = kernel.perturbed
    h_c, kernel, y_c, temperature = (a.value for a in (h_c, kernel, y_c, temperature))
    cap = None if cap is None else cap.value
    lp, logits, lse, t = _chunk_values(h_c, kernel, y_c, temperature, cap)
    if trained:
        return lp, logits, lse, (h_c, kernel, y_c, temperature, cap, lse)
    # (onehot − p)·dl/dz contracted with W here, split so no [b, c, V] one-hot is formed:
    # dl_y/dz_y · W[:, y] − Σ_v p_v · dl_v/dz_v · W[:, v]
    probs = jnp.exp(logits - lse[..., None]) / temperature
    picked_scale = 1.0 / temperature
    if t is not None:
        slope = 1.0 - t * t
        probs = probs * slope
        picked_scale = picked_scale * jnp.take_along_axis(slope, y_c[..., None], axis=-1)[..., 0]
    # A low-precision kernel takes the probabilities in its dtype (the product that PyTorch's
    # bfloat16 backward forms), accumulated in float32: twice the float32 rate on the CPU.
    picked_rows = jnp.take(kernel.T, y_c, axis=0).astype(jnp.float32)
    direction = picked_rows * picked_scale[..., None]
    direction = direction - dots.einsum_f32("bcv,dv->bcd", probs.astype(kernel.dtype), kernel)
    return lp, logits, lse, (kernel, direction)


def _chunk_bwd(n_args, res, g):
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return (None,) * n_args
    if len(res) == 2:  # a frozen kernel: the direction is ready, in float32
        kernel, direction = res  # token_logprobs gives the kernel the hidden states' dtype
        return ((g[..., None] * direction).astype(kernel.dtype),) + (None,) * (n_args - 1)
    h_c, kernel, y_c, temperature, cap, lse = res
    logits, t = _logits_chunk(h_c, kernel, temperature, cap)
    d_z = (_logit_grads(logits, lse, t, y_c, temperature) * g[..., None]).astype(kernel.dtype)
    d_h = dots.einsum_f32("bcv,dv->bcd", d_z, kernel).astype(h_c.dtype)
    d_kernel = dots.einsum_f32("bcd,bcv->dv", h_c, d_z).astype(kernel.dtype)
    return (d_h, d_kernel) + (None,) * (n_args - 2)


_chunk_logprobs.defvjp(_chunk_fwd, functools.partial(_chunk_bwd, 4), symbolic_zeros=True)
_chunk_logprobs_capped.defvjp(_chunk_fwd, functools.partial(_chunk_bwd, 5), symbolic_zeros=True)
_chunk_logprobs_entropy.defvjp(
    _chunk_entropy_fwd, functools.partial(_chunk_entropy_bwd, 4), symbolic_zeros=True
)
_chunk_logprobs_entropy_capped.defvjp(
    _chunk_entropy_fwd, functools.partial(_chunk_entropy_bwd, 5), symbolic_zeros=True
)


# ----------------------------------------------------------------------------- conveniences


def forward(
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    cfg: ModelConfig,
    head: str = "lm",
    lora: Params | None = None,
    lora_scale: Any = 1.0,
    positions: jax.Array | None = None,
) -> jax.Array:
    """The whole model with one head: `lm` logits [B,T,V], `score` [B], or `value` [B,T]."""
    hidden, _ = backbone(
        params,
        input_ids,
        attention_mask,
        cfg=cfg,
        lora=lora,
        lora_scale=lora_scale,
        positions=positions,
    )
    if head == "lm":
        return lm_logits(params, hidden, logit_softcap=cfg.final_logit_softcap)
    if head == "score":
        return score_head(params, hidden, attention_mask, lora)
    if head == "value":
        return value_head(params, hidden, lora)
    raise ValueError(f"Unknown head {head!r}; choose from 'lm', 'score', 'value'")


def sequence_logprobs(
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    cfg: ModelConfig,
    lora: Params | None = None,
    lora_scale: Any = 1.0,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 128,
):
    """Log-probabilities [B, T-1] of tokens 1..T-1 given their prefixes (no [B,T,V] array)."""
    hidden, _ = backbone(
        params, input_ids, attention_mask, cfg=cfg, lora=lora, lora_scale=lora_scale
    )
    return token_logprobs(
        params,
        hidden[:, :-1],
        input_ids[:, 1:],
        temperature=temperature,
        with_entropy=with_entropy,
        chunk_size=chunk_size,
        logit_softcap=cfg.final_logit_softcap,
    )
