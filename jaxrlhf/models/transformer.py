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
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.config import ModelConfig, rope_inv_freq
from jaxrlhf.models.quant import dense, is_quantized, take_rows

Params = dict[str, Any]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MASK_VALUE = -1e30  # finite, so a fully masked row (a pad query) gives no NaN


class KVCache(NamedTuple):
    """Keys/values of every layer for `S` slots; `valid[b, s]` marks slots holding a real token."""

    k: jax.Array  # [L, B, S, KVH, hd]
    v: jax.Array  # [L, B, S, KVH, hd]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # int32 scalar: the slot the next token is written to


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    dtype = dtype or jnp.dtype(cfg.dtype)
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, length), bool),
        index=jnp.zeros((), jnp.int32),
    )


# ----------------------------------------------------------------------------- init


def init_params(
    key: jax.Array, cfg: ModelConfig, *, heads: tuple[str, ...] = ("lm",), dtype=jnp.float32
) -> Params:
    """Random parameters (normal, std 0.02; lm_head std 1/sqrt(D); norms at one), for tests
    and from-scratch runs."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    shapes = {
        "q_proj": (d, cfg.q_size),
        "k_proj": (d, cfg.kv_size),
        "v_proj": (d, cfg.kv_size),
        "o_proj": (cfg.q_size, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    keys = iter(jax.random.split(key, 16))

    def normal(shape):
        return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    layers: Params = {
        "input_norm": {"scale": jnp.ones((L, d), dtype)},
        "post_attn_norm": {"scale": jnp.ones((L, d), dtype)},
    }
    for name, (i, o) in shapes.items():
        layers[name] = {"kernel": normal((L, i, o))}
        if cfg.attention_bias and name in ("q_proj", "k_proj", "v_proj"):
            layers[name]["bias"] = normal((L, o))
    params: Params = {
        "embed": normal((cfg.vocab_size, d)),
        "layers": layers,
        "final_norm": {"scale": jnp.ones((d,), dtype)},
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


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half rotary embedding (HF layout). x: [B, T, H, hd], positions: [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


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
    """`x·W (+b)`, plus the unmerged LoRA term `s·(dropout(x)·A)·B` when an adapter is given."""
    y = jnp.einsum("...i,io->...o", x, read_kernel(weights, x.dtype))
    if "bias" in weights:
        y = y + weights["bias"].astype(y.dtype)
    if lora is not None:
        xa = x
        if dropout_rate > 0.0 and dropout_rng is not None:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, x.shape)
            xa = jnp.where(keep, x / (1.0 - dropout_rate), 0).astype(x.dtype)
        a = lora["lora_A"].astype(x.dtype)
        b = lora["lora_B"].astype(x.dtype)
        y = y + lora_delta(xa, a, b, jnp.asarray(lora_scale, x.dtype))
    return y


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
    xa = jnp.einsum("...i,ir->...r", x, a)
    return jnp.einsum("...r,ro->...o", xa, b) * scale, (x, a, b, xa, scale)


def _lora_delta_bwd(res, g):
    x, a, b, xa, scale = res
    tokens_x = x.reshape(-1, x.shape[-1])  # [N, in]
    tokens_g = g.reshape(-1, g.shape[-1])  # [N, out]
    tokens_xa = xa.reshape(-1, xa.shape[-1])  # [N, r]
    g_xa_unscaled = tokens_g @ b.T  # [N, r]
    g_xa = g_xa_unscaled * scale
    g_a = (g_xa.T @ tokens_x).T  # [in, r]: the [r, N] transpose is the small one
    g_b = (tokens_xa.T @ tokens_g) * scale  # [r, out]
    g_x = (g_xa @ a.T).reshape(x.shape)
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
    """Grouped-query attention. q: [B,T,H,hd]; k, v: [B,S,KVH,hd]; mask: [B,T,S]."""
    b, t, _, hd = q.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, hd)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32) / np.sqrt(hd)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, cfg.num_heads * hd)


def _block(
    cfg: ModelConfig,
    x,
    layer: Params,
    layer_lora: Params | None,
    lora_scale,
    positions,
    mask,
    kv: tuple | None,
    write_index,
    dropout_rate,
    dropout_rng,
):
    """One decoder block. With `kv` = (k cache, v cache, this block's index) — the stacked
    [L, B, S, KVH, hd] caches — new keys/values are written in place at `write_index` and
    attention runs over this block's whole cache; the updated caches come back."""
    b, t, _ = x.shape
    rngs = (
        jax.random.split(dropout_rng, len(PROJECTIONS))
        if dropout_rng is not None
        else [None] * len(PROJECTIONS)
    )
    rng_of = dict(zip(PROJECTIONS, rngs, strict=True))

    def proj(name, h):
        sub = None if layer_lora is None else layer_lora.get(name)
        return linear(h, layer[name], sub, lora_scale, dropout_rate, rng_of[name])

    h = rms_norm(x, layer["input_norm"]["scale"], cfg.rms_norm_eps)
    q = proj("q_proj", h).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = proj("k_proj", h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = proj("v_proj", h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    q = rope(q, positions, inv_freq)
    k = rope(k, positions, inv_freq)
    if kv is not None:
        k_cache, v_cache, i = kv
        at = (i, 0, write_index, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
        k_all, v_all, new_kv = (
            k_cache[i].astype(q.dtype),
            v_cache[i].astype(q.dtype),
            (k_cache, v_cache),
        )
    else:
        k_all, v_all, new_kv = k, v, None
    attn = _attention(q, k_all, v_all, mask, cfg)
    x = x + proj("o_proj", attn)
    h = rms_norm(x, layer["post_attn_norm"]["scale"], cfg.rms_norm_eps)
    x = x + proj("down_proj", jax.nn.silu(proj("gate_proj", h)) * proj("up_proj", h))
    return x, new_kv


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
) -> tuple[jax.Array, KVCache | None]:
    """Final hidden states [B, T, D] (after the last norm) and the updated cache.

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
    if cache is None:
        slots = jnp.arange(t)
        mask = build_attention_mask(
            attention_mask.astype(bool), slots, slots, segment_ids, segment_ids
        )
        write_index = None
    else:
        write_index = cache.index
        valid = jax.lax.dynamic_update_slice_in_dim(
            cache.valid, attention_mask.astype(bool), write_index, 1
        )
        s = cache.valid.shape[1]
        mask = build_attention_mask(valid, write_index + jnp.arange(t), jnp.arange(s))

    layers = params["layers"]
    layer_lora = None if lora is None else lora.get("layers")
    layer_rngs = jax.random.split(dropout_rng, cfg.num_layers) if dropout_rng is not None else None

    def block(x, layer, l_lora, kv, rng):
        return _block(
            cfg, x, layer, l_lora, lora_scale, positions, mask, kv, write_index, dropout_rate, rng
        )

    new_cache = None
    if cache is None and not isinstance(layers, list):
        step = lambda x, xs: block(x, *xs[:2], None, xs[2])  # noqa: E731
        if cfg.remat == "block":
            step = jax.checkpoint(step, prevent_cse=False)
        x, _ = jax.lax.scan(step, x, (layers, layer_lora, layer_rngs))
    else:  # the cached (sampling) forward: an unrolled loop over the blocks
        layers = layers if isinstance(layers, list) else unstack_layers(layers)
        if layer_lora is not None and not isinstance(layer_lora, list):
            layer_lora = unstack_layers(layer_lora)
        kv = None if cache is None else (cache.k, cache.v)
        for i, layer in enumerate(layers):
            x, new_kv = block(
                x,
                layer,
                None if layer_lora is None else layer_lora[i],
                None if kv is None else (*kv, i),
                None if layer_rngs is None else layer_rngs[i],
            )
            kv = new_kv
        if cache is not None:
            new_cache = KVCache(k=kv[0], v=kv[1], valid=valid, index=write_index + t)
    x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
    return x, new_cache


def unstack_layers(layers: Params) -> list[Params]:
    """The stacked block tree ([L, ...] leaves) as a list of L per-block trees: separate
    arrays, which the cached forward reads in place (see the module docstring)."""
    if isinstance(layers, list):
        return layers
    n = jax.tree.leaves(layers)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)]


# ----------------------------------------------------------------------------- heads


def _head_weights(params: Params, lora: Params | None, name: str) -> Params:
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


def lm_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Vocabulary logits [B, T, V] in float32."""
    return jnp.einsum(
        "btd,dv->btv",
        hidden,
        lm_kernel(params).astype(hidden.dtype),
        preferred_element_type=jnp.float32,
    )


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row (works for left and right padding)."""
    t = attention_mask.shape[-1]
    return jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(t), 0), axis=-1)


def score_head(
    params: Params, hidden: jax.Array, attention_mask: jax.Array, lora: Params | None = None
) -> jax.Array:
    """Sequence scores read at the last real token, as `*ForSequenceClassification`.
    Returns [B] when num_labels == 1, else [B, num_labels]."""
    w = _head_weights(params, lora, "score")
    last = jnp.take_along_axis(hidden, last_token_index(attention_mask)[:, None, None], axis=1)[
        :, 0
    ]
    scores = jnp.einsum(
        "bd,dl->bl", last, w["kernel"].astype(last.dtype), preferred_element_type=jnp.float32
    )
    return scores[:, 0] if scores.shape[-1] == 1 else scores


def value_head(params: Params, hidden: jax.Array, lora: Params | None = None) -> jax.Array:
    """Per-token values [B, T] in float32."""
    w = _head_weights(params, lora, "value")
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
) -> tuple[jax.Array, jax.Array | None]:
    """log p(targets[b, t] | hidden[b, t]) [B, T] (and the entropy) in float32, computed
    `chunk_size` positions at a time so a full [B, T, V] float32 log-softmax never exists;
    each chunk is rematerialised in the backward pass."""
    kernel = lm_kernel(params).astype(hidden.dtype)
    b, t, d = hidden.shape
    chunk = min(chunk_size, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n_chunks, chunk, d)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n_chunks, chunk)

    @jax.checkpoint
    def chunk_with_entropy(h_c, y_c):
        logits = _logits_chunk(h_c, kernel, temperature)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        probs = jax.nn.softmax(logits, axis=-1)
        return picked - lse, lse - jnp.sum(probs * logits, axis=-1)

    def chunk(h_c, y_c):  # the common case, with a hand-written backward
        return _chunk_logprobs(h_c, kernel, y_c, jnp.asarray(temperature, jnp.float32)), None

    one_chunk = chunk_with_entropy if with_entropy else chunk

    lp, ent = jax.lax.map(lambda xs: one_chunk(*xs), (h.swapaxes(0, 1), y.swapaxes(0, 1)))
    lp = lp.swapaxes(0, 1).reshape(b, -1)[:, :t]
    if with_entropy:
        ent = ent.swapaxes(0, 1).reshape(b, -1)[:, :t]
    return lp, ent


def _logits_chunk(h_c, kernel, temperature):
    return jnp.einsum("bcd,dv->bcv", h_c, kernel, preferred_element_type=jnp.float32) / temperature


@jax.custom_vjp
def _chunk_logprobs(h_c, kernel, y_c, temperature):
    """log p(y | h) for one chunk [b, c]. The backward keeps the forward's log-normaliser and
    recomputes the logits once: d logits = (onehot(y) − exp(logits − lse))·g / T, with no
    second max/sum pass over the vocabulary (what rematerialising the forward costs)."""
    return _chunk_logprobs_fwd(h_c, kernel, y_c, temperature)[0]


def _chunk_logprobs_fwd(h_c, kernel, y_c, temperature):
    logits = _logits_chunk(h_c, kernel, temperature)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
    return picked - lse, (h_c, kernel, y_c, temperature, lse)


def _chunk_logprobs_bwd(res, g):
    h_c, kernel, y_c, temperature, lse = res
    logits = _logits_chunk(h_c, kernel, temperature)
    onehot = jnp.arange(logits.shape[-1]) == y_c[..., None]
    d_logits = (onehot - jnp.exp(logits - lse[..., None])) * (g / temperature)[..., None]
    d_h = jnp.einsum("bcv,dv->bcd", d_logits, kernel.astype(jnp.float32)).astype(h_c.dtype)
    d_kernel = jnp.einsum("bcd,bcv->dv", h_c.astype(jnp.float32), d_logits).astype(kernel.dtype)
    return d_h, d_kernel, None, None  # no gradient for the targets or the temperature


_chunk_logprobs.defvjp(_chunk_logprobs_fwd, _chunk_logprobs_bwd)


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
        return lm_logits(params, hidden)
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
    )
