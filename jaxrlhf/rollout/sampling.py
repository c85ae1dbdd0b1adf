"""Autoregressive sampling with a KV cache, compiled once per (batch, prompt, response) shape.

    prompt (left-padded) ──prefill: one backbone call──> cache [P + N slots], logits of token 0
    while step < N and some row is still running:          (jax.lax.while_loop)
        feed the previous token (one backbone call, T = 1) -> logits -> sample the next token

Prompts are left-padded so every row's last prompt token sits at slot P-1 and the rows decode
in lock step. Positions count real tokens only (`cumsum(mask) - 1`), so a row's padding does
not shift its rotary positions: generated token `i` of a row with `n` real prompt tokens has
position `n + i`, exactly as a full forward over `[prompt, response]` with the joined mask.

Log-probability convention (TRL's): `logprobs[b, i] = log_softmax(logits / temperature)` at
the sampled token, taken *before* top-k/top-p filtering, so PPO's recomputed log-probs at the
same temperature (`token_logprobs(..., temperature=T)`) agree with the rollout's. Greedy
decoding reports temperature-1 log-probs.

The LoRA tree, if any, is applied unmerged (`x·W + s·(x·A)·B`); merge it first with
`jaxrlhf.lora` when sampling speed matters more than memory.

On a device mesh (`make_generate_fn(..., mesh=mesh)`) the layout is explicit: params and
LoRA by their logical axes (`sharding.tree_shardings`), prompts and every per-row output
over ("data", "fsdp"), and the KV cache rows over ("data", "fsdp") with its kv heads over
"tensor" (`sharding.kv_cache_sharding`), constrained at every step of the decode loop.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf import sharding as S
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import (
    KVCache,
    Params,
    backbone,
    init_cache,
    lm_logits,
    positions_from_mask,
    split_cache_layers,
    unstack_layers,
)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample a response. Field names follow transformers/TRL.

    `greedy=True` or `temperature=0` picks the argmax token (top-k/top-p are then unused).
    `top_k=0` and `top_p=1.0` switch those filters off; when both are on, top-k is applied
    first, then top-p on what is left (the order of transformers' logits warpers).
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    """Any of these ends a row (the EOS itself is part of the response). Empty: never stop early."""
    pad_token_id: int
    """Written after a row's EOS (and used for nothing else)."""
    temperature: float = 1.0
    greedy: bool = False
    top_k: int = 0
    top_p: float = 1.0
    per_sequence_rng: bool = False
    """Draw token `i` of row `b` from its own stream, `fold_in(fold_in(key, b), i)`
    (`sequence_uniforms`), so a row's tokens do not depend on the batch it ran in: what the
    continuous-batching engine does. False: one `fold_in(key, i)` per step for the batch."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}"
            )
        eos = self.eos_token_ids
        if _is_int(eos):
            eos = (eos,)
        if (
            not isinstance(eos, Sequence)
            or isinstance(eos, str)
            or not all(_is_int(t) and t >= 0 for t in eos)
        ):
            raise ValueError(
                "SamplingConfig.eos_token_ids must be a tuple of non-negative token ids "
                f"(use () to never stop early), got {self.eos_token_ids!r}"
            )
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in eos))
        if not _is_int(self.pad_token_id) or self.pad_token_id < 0:
            raise ValueError(
                f"SamplingConfig.pad_token_id must be a non-negative token id, got "
                f"{self.pad_token_id!r} (models without a pad token usually pad with their EOS)"
            )
        if not isinstance(self.per_sequence_rng, bool):
            raise ValueError(
                f"SamplingConfig.per_sequence_rng must be a bool, got {self.per_sequence_rng!r}"
            )
        if not isinstance(self.greedy, bool):
            raise ValueError(f"SamplingConfig.greedy must be a bool, got {self.greedy!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not np.isfinite(t) or t < 0:
            raise ValueError(
                f"SamplingConfig.temperature must be a finite number >= 0 (0 means greedy), "
                f"got {t!r}"
            )
        object.__setattr__(self, "temperature", float(t))
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(
                f"SamplingConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}"
            )
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1.0 = off), got {p!r}")
        object.__setattr__(self, "top_p", float(p))

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @classmethod
    def for_model(cls, cfg: ModelConfig, **fields: Any) -> SamplingConfig:
        """EOS and pad ids taken from the model config (pad falls back to the first EOS)."""
        eos = fields.pop("eos_token_ids", cfg.eos_token_id)
        pad = fields.pop("pad_token_id", cfg.pad_token_id)
        if pad is None:
            if not eos:
                raise ValueError(
                    "The model config has neither a pad nor an EOS token id; "
                    "pass pad_token_id= explicitly"
                )
            pad = eos[0]
        return cls(eos_token_ids=tuple(eos), pad_token_id=pad, **fields)


class SampleOutput(NamedTuple):
    """What `generate` returns; every array has the response length N = max_new_tokens."""

    tokens: jax.Array  # [B, N] int32: generated ids, pad_token_id after a row's EOS
    response_mask: jax.Array  # [B, N] int32: 1 for generated tokens up to and including EOS
    logprobs: jax.Array  # [B, N] float32: log_softmax(logits / T)[token], 0 where masked
    finished: jax.Array  # [B] bool: the row produced an EOS


# ----------------------------------------------------------------------------- token choice


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf. [..., V].

    Top-p keeps the smallest set of most likely tokens whose probability sums to >= p; the
    most likely token is always kept. Tokens tied with the last kept one are kept too.
    """
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, neg_inf)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep a token while the mass of the more likely ones is still short of p.
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
        logits = jnp.where(logits >= threshold, logits, neg_inf)
    return logits


def _last_nonzero(mask: jax.Array) -> jax.Array:
    """Index of the last True along the last axis (0 if none)."""
    n = mask.shape[-1]
    return n - 1 - jnp.argmax(mask[..., ::-1], axis=-1)


def _draw_index(cdf: jax.Array, u: jax.Array, weights: jax.Array) -> jax.Array:
    """The first index whose running sum `cdf` [B, n] exceeds `u` [B], capped at the last
    index of positive `weights`, so rounding at the very top never lands on a zero weight."""
    count = jnp.sum(cdf <= u[:, None], axis=-1)
    return jnp.minimum(count, _last_nonzero(weights > 0))


def sample_categorical(
    key: jax.Array, logits: jax.Array, uniforms: jax.Array | None = None, *, block: int = 256
) -> jax.Array:
    """One draw per row from softmax(logits) [B, V] by inverting the CDF with one uniform
    per row. Same distribution as `jax.random.categorical` (Gumbel-max), which needs B·V
    random numbers and, fused into its arg-max, took most of a small model's decode step on
    CPU. Token j is drawn iff cdf[j-1] <= u < cdf[j], so a token of probability 0 never is.
    `uniforms` [B] in [0, 1): the draws to use instead of ones made from `key`.

    The CDF is inverted in two levels: the running sum of `block`-token block masses picks
    the block, then the running sum inside that one block picks the token. One cumulative
    sum over the whole vocabulary (a reduce-window on CPU) took, alone at V = 49k, 3.2 ms
    for 16 rows and 62 ms for 64 (two levels: 0.9 and 2.4 ms); inside the decode loop XLA
    had fused most of it, and the step gains 2 ms at batch 1 (BENCHMARKS.md)."""
    b, v = logits.shape
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised p
    if uniforms is None:
        uniforms = jax.random.uniform(key, (b, 1))[:, 0]
    n_blocks = -(-v // block)
    if n_blocks < 2:
        cdf = jnp.cumsum(weights, axis=-1)
        return _draw_index(cdf, uniforms * cdf[:, -1], weights)
    blocks = jnp.pad(weights, ((0, 0), (0, n_blocks * block - v))).reshape(b, n_blocks, block)
    mass = jnp.sum(blocks, axis=-1)  # [B, n_blocks]
    block_cdf = jnp.cumsum(mass, axis=-1)
    u = uniforms * block_cdf[:, -1]
    k = _draw_index(block_cdf, u, mass)
    below = jnp.where(k > 0, jnp.take_along_axis(block_cdf, k[:, None] - 1, axis=-1)[:, 0], 0)
    inner = jnp.take_along_axis(blocks, k[:, None, None], axis=1)[:, 0]  # [B, block]
    j = _draw_index(below[:, None] + jnp.cumsum(inner, axis=-1), u, inner)
    return k * block + j


def sequence_uniforms(key: jax.Array, sequence_ids: jax.Array, step: jax.Array) -> jax.Array:
    """[B] uniforms in [0, 1): the draw of token `step` of each sequence,
    `uniform(fold_in(fold_in(key, sequence_id), step))` (`step` scalar or [B]) — the same
    whichever batch or slot the sequence is sampled in."""
    step = jnp.broadcast_to(step, sequence_ids.shape)
    return jax.vmap(
        lambda s, i: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, s), i))
    )(sequence_ids, step)


def choose_tokens(
    logits: jax.Array,
    key: jax.Array,
    sampling: SamplingConfig,
    uniforms: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Next tokens [B] (int32) and their log-probs [B] from float32 logits [B, V].
    `uniforms` [B]: the sampling draws (`sequence_uniforms`) instead of ones from `key`."""
    logits = logits.astype(jnp.float32)
    if sampling.is_greedy:
        scaled = logits
        tokens = jnp.argmax(logits, axis=-1)
    else:
        scaled = logits / sampling.temperature
        filtered = filter_logits(scaled, top_k=sampling.top_k, top_p=sampling.top_p)
        tokens = sample_categorical(key, filtered, uniforms)
    tokens = tokens.astype(jnp.int32)
    return tokens, token_log_softmax(scaled, tokens)


def token_log_softmax(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """`log_softmax(logits)[b, tokens[b]]` [B] without the [B, V] log-softmax: the same
    arithmetic as `jax.nn.log_softmax` (shift by the max, subtract the log-sum), read at
    one token per row."""
    top = jnp.max(logits, axis=-1)
    log_norm = jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return (picked - top) - log_norm


# ----------------------------------------------------------------------------- model steps


def constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """`cache` pinned to `sharding.kv_cache_sharding` on `mesh` (unchanged without one)."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, S.kv_cache_sharding(cache, mesh))


def _constrain_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Per-row arrays pinned to the batch axes (whole where data x fsdp does not divide B)."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, S.batch_shardings(tree, mesh))


def prefill(
    params: Params,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    *,
    cfg: ModelConfig,
    cache_length: int,
    lora: Params | None = None,
    lora_scale: Any = 1.0,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the left-padded prompts [B, P] into a fresh cache of `cache_length` slots.
    Returns the logits [B, V] of the first response token and the cache (index = P).
    With `mesh`, the cache is constrained to `sharding.kv_cache_sharding`."""
    b, p = prompt_ids.shape
    cache = constrain_cache(init_cache(cfg, b, cache_length), mesh)
    hidden, cache = backbone(
        params,
        prompt_ids,
        prompt_mask,
        cfg=cfg,
        lora=lora,
        lora_scale=lora_scale,
        positions=positions_from_mask(prompt_mask),
        cache=cache,
    )
    # Left padding puts every row's last real token at P-1: one [B, 1, V] logits slice.
    logits = lm_logits(params, hidden[:, -1:], logit_softcap=cfg.final_logit_softcap)[:, 0]
    return logits, constrain_cache(cache, mesh)


def decode_step(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    cfg: ModelConfig,
    lora: Params | None = None,
    lora_scale: Any = 1.0,
) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (tokens, positions: [B]) at `cache.index`; logits [B, V]."""
    hidden, cache = backbone(
        params,
        tokens[:, None],
        jnp.ones_like(tokens)[:, None],
        cfg=cfg,
        lora=lora,
        lora_scale=lora_scale,
        positions=positions[:, None],
        cache=cache,
    )
    return lm_logits(params, hidden, logit_softcap=cfg.final_logit_softcap)[:, 0], cache


# ----------------------------------------------------------------------------- generate


def generate(
    params: Params,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
    lora: Params | None = None,
    lora_scale: Any = 1.0,
    mesh: Mesh | None = None,
    prompt_repeats: int = 1,
    adapter_ids: jax.Array | None = None,
    sequence_ids: jax.Array | None = None,
) -> SampleOutput:
    """Sample `sampling.max_new_tokens` tokens after left-padded prompts [B, P].

    Several adapters in one batch: with `adapter_ids` [B] int32, `lora` is K adapters stacked
    on a leading axis (`lora.stack_adapters`, [K, L, ...]) and `lora_scale` a scalar or [K];
    row b runs adapter `adapter_ids[b]` (1..K) or none (0: the base, the reference). They
    run as one adapter of rank K·r with per-row column scales (`lora.concat_adapters`,
    `lora.row_scales`); the rows of a `prompt_repeats` group must share their adapter.
    `sequence_ids` [B]: each row's stream with `per_sequence_rng` (default: its row index),
    so a row sampled in another batch draws the same tokens.

    `prompt_repeats=k`: the rows come in groups of k copies of one prompt (GRPO's groups,
    several samples per prompt): each prompt is run through the model once and its KV cache
    copied to its k rows, which then sample independently.

    Every row needs at least one real prompt token (see `check_left_padded`). The loop stops
    as soon as every row has produced an EOS; the outputs always have N = max_new_tokens
    columns. Traceable: call it inside `jax.jit` (or use `make_generate_fn`, which does).
    With `mesh`, the KV cache and the per-row loop state are constrained to their shardings
    (cache: `sharding.kv_cache_sharding`; rows: over ("data", "fsdp")) in the prefill and
    at every decode step, rather than left to the compiler.

    Stacked layers are split into per-block arrays once, before the decode loop (a
    transient copy; pass `unstack_layers` output, as the PPO/GRPO `Sampler` does with the
    merged policy, to avoid it); so is the KV cache after the prefill
    (`split_cache_layers`): each step then reads and writes every layer's keys in place.
    """
    b, p = prompt_ids.shape
    n = sampling.max_new_tokens
    k = prompt_repeats
    if k < 1 or b % k:
        raise ValueError(f"prompt_repeats={k} must be >= 1 and divide the batch of {b} rows")
    prefill_scale = lora_scale
    if adapter_ids is not None:
        if lora is None:
            raise ValueError("adapter_ids needs lora: K adapters stacked on a leading axis")
        lora, lora_scale = multi_adapter_lora(lora, lora_scale, adapter_ids)
        prefill_scale = lora_scale[::k]  # a group's rows share their prompt and adapter
    params = {**params, "layers": unstack_layers(params["layers"])}
    if lora is not None and "layers" in lora:
        lora = {**lora, "layers": unstack_layers(lora["layers"])}
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    eos_ids = jnp.asarray(sampling.eos_token_ids or (-1,), jnp.int32)
    pad = jnp.int32(sampling.pad_token_id)
    n_prompt = jnp.sum(prompt_mask, axis=-1)  # position of response token 0
    if sequence_ids is not None and not sampling.per_sequence_rng:
        raise ValueError("sequence_ids name per-row streams: set SamplingConfig.per_sequence_rng")
    # each row's stream with `per_sequence_rng`
    rows = (
        jnp.arange(b, dtype=jnp.int32)
        if sequence_ids is None
        else jnp.asarray(sequence_ids, jnp.int32)
    )

    def emit(i, logits, tokens, response_mask, logprobs, finished):
        """Choose token i for every running row and write it into the outputs."""
        uniforms = sequence_uniforms(key, rows, i) if sampling.per_sequence_rng else None
        tok, logp = choose_tokens(logits, jax.random.fold_in(key, i), sampling, uniforms)
        running = ~finished
        tok = jnp.where(running, tok, pad)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], i, 1)
        response_mask = jax.lax.dynamic_update_slice_in_dim(
            response_mask, running.astype(jnp.int32)[:, None], i, 1
        )
        logprobs = jax.lax.dynamic_update_slice_in_dim(
            logprobs, jnp.where(running, logp, 0.0)[:, None], i, 1
        )
        finished = finished | (running & jnp.isin(tok, eos_ids))
        return tok, tokens, response_mask, logprobs, finished

    logits, cache = prefill(
        params,
        prompt_ids[::k],
        prompt_mask[::k],
        cfg=cfg,
        cache_length=p + n,
        lora=lora,
        lora_scale=prefill_scale,
        mesh=mesh,
    )
    if k > 1:
        logits = jnp.repeat(logits, k, axis=0)
        cache = constrain_cache(
            cache._replace(
                k=jnp.repeat(cache.k, k, axis=1),
                v=jnp.repeat(cache.v, k, axis=1),
                valid=jnp.repeat(cache.valid, k, axis=0),
            ),
            mesh,
        )
    # The loop carries one array per layer, so no step slices a layer out of the stack.
    cache = constrain_cache(split_cache_layers(cache), mesh)
    outputs = _constrain_rows(
        (
            jnp.full((b, n), pad, jnp.int32),
            jnp.zeros((b, n), jnp.int32),
            jnp.zeros((b, n), jnp.float32),
            jnp.zeros((b,), bool),
        ),
        mesh,
    )
    last, *outputs = emit(0, logits, *outputs)

    def cond(carry):
        i, _, _, _, _, _, finished = carry
        return (i < n) & ~jnp.all(finished)

    def body(carry):
        i, last, cache, *outputs = carry
        logits, cache = decode_step(
            params, last, n_prompt + i - 1, cache, cfg=cfg, lora=lora, lora_scale=lora_scale
        )
        last, *outputs = emit(i, logits, *outputs)
        last, outputs = _constrain_rows((last, tuple(outputs)), mesh)
        return (i + 1, last, constrain_cache(cache, mesh), *outputs)

    carry = (jnp.int32(1), last, cache, *outputs)
    _, _, _, tokens, response_mask, logprobs, finished = jax.lax.while_loop(cond, body, carry)
    return SampleOutput(
        tokens=tokens, response_mask=response_mask, logprobs=logprobs, finished=finished
    )


def multi_adapter_lora(
    stacked: Params, scales: Any, adapter_ids: jax.Array
) -> tuple[Params, jax.Array]:
    """(one adapter of rank K·r, per-row column scales [B, K·r]) for K stacked adapters
    [K, ...] with per-adapter `scales` (scalar or [K]) and `adapter_ids` [B] in 0..K (0: no
    adapter): what `generate` and `models.transformer.linear` run (`lora.concat_adapters`)."""
    from jaxrlhf.lora import concat_adapters, lora_rank, row_scales

    k = jax.tree.leaves(stacked["layers"])[0].shape[0]
    rank = lora_rank(stacked)
    scales = jnp.broadcast_to(jnp.asarray(scales, jnp.float32), (k,))
    return concat_adapters(stacked), row_scales(adapter_ids, scales, rank)


def check_adapter_ids(adapter_ids: Any, batch: int, adapters: int, repeats: int = 1) -> None:
    """Raise unless `adapter_ids` is [batch] ints in 0..adapters (0: no adapter) and the rows
    of each `repeats` group share one id (they share a prefill). Traced arrays pass."""
    if isinstance(adapter_ids, jax.core.Tracer) or (
        isinstance(adapter_ids, jax.Array) and not adapter_ids.is_fully_addressable
    ):
        return
    ids = np.asarray(adapter_ids)
    if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"adapter_ids must be [{batch}] integers (one per row), got shape {ids.shape} "
            f"of {ids.dtype}"
        )
    if ids.size and (ids.min() < 0 or ids.max() > adapters):
        raise ValueError(
            f"adapter_ids must be in [0, {adapters}] (0: no adapter, k: stacked adapter k-1), "
            f"got range [{ids.min()}, {ids.max()}]"
        )
    groups = ids.reshape(-1, repeats)
    bad = np.flatnonzero((groups != groups[:, :1]).any(axis=1))
    if bad.size:
        raise ValueError(
            f"prompt_repeats={repeats}: the rows of group(s) {bad[:5].tolist()} name different "
            f"adapters; a group shares one prefill, so give its rows one adapter id"
        )


def check_left_padded(prompt_mask: Any) -> None:
    """Raise if a concrete prompt mask is not left-padded (a row's last column is padding,
    or a row is empty). Traced masks and arrays spread over several hosts pass unchecked."""
    if isinstance(prompt_mask, jax.core.Tracer) or (
        isinstance(prompt_mask, jax.Array) and not prompt_mask.is_fully_addressable
    ):
        return
    last = np.asarray(prompt_mask)[:, -1]
    if not last.all():
        rows = np.flatnonzero(last == 0)[:5].tolist()
        raise ValueError(
            f"Prompts must be left-padded with at least one real token, but rows {rows} end "
            "in padding; tokenize with tokenizer.padding_side = 'left'"
        )


def check_repeated_prompts(prompt_ids: Any, prompt_mask: Any, repeats: int) -> None:
    """Raise unless the rows come in groups of `repeats` identical prompts (what
    `prompt_repeats` promises). Traced arrays and arrays spread over several hosts pass."""
    if repeats == 1:
        return
    for x in (prompt_ids, prompt_mask):
        if isinstance(x, jax.core.Tracer) or (
            isinstance(x, jax.Array) and not x.is_fully_addressable
        ):
            return
    for name, x in (("prompt ids", prompt_ids), ("prompt mask", prompt_mask)):
        x = np.asarray(x)
        if x.shape[0] % repeats:
            raise ValueError(f"prompt_repeats={repeats} does not divide the {x.shape[0]} rows")
        groups = x.reshape(x.shape[0] // repeats, repeats, -1)
        bad = np.flatnonzero((groups != groups[:, :1]).any(axis=(1, 2)))
        if bad.size:
            raise ValueError(
                f"prompt_repeats={repeats}: the {name} of group(s) {bad[:5].tolist()} are not "
                f"{repeats} copies of one prompt"
            )


def generate_shardings(
    mesh: Mesh,
    params: Params,
    prompt_ids: Any,
    lora: Params | None = None,
    adapter_ids: Any = None,
    sequence_ids: Any = None,
) -> tuple[tuple, SampleOutput]:
    """(in_shardings, out_shardings) of the compiled sampler on `mesh` for these arguments:
    params and LoRA by their logical axes, prompt ids/mask and every per-row output over
    ("data", "fsdp") (whole when data x fsdp does not divide the batch, as `shard_batch`
    places such a batch), the key and the LoRA scale replicated; a stacked adapter tree
    (with `adapter_ids`) replicated too (adapters are small), the ids like the rows."""
    rows = S.batch_shardings(jax.ShapeDtypeStruct(np.shape(prompt_ids), jnp.int32), mesh)
    rows_1d = S.batch_shardings(jax.ShapeDtypeStruct(np.shape(prompt_ids)[:1], jnp.int32), mesh)
    rep = S.replicated(mesh)
    if lora is None:
        lora_sh = None
    elif adapter_ids is not None:  # [K, ...]: the logical axes are one position off
        lora_sh = jax.tree.map(lambda _: rep, lora)
    else:
        lora_sh = S.tree_shardings(lora, mesh)
    ids_sh = tuple(None if x is None else rows_1d for x in (adapter_ids, sequence_ids))
    in_sh = (S.tree_shardings(params, mesh), rows, rows, rep, lora_sh, rep, *ids_sh)
    return in_sh, SampleOutput(tokens=rows, response_mask=rows, logprobs=rows, finished=rows_1d)


def make_generate_fn(
    cfg: ModelConfig, sampling: SamplingConfig, mesh: Mesh | None = None
) -> Callable[..., SampleOutput]:
    """`fn(params, prompt_ids, prompt_mask, key, lora=None, lora_scale=1.0, prompt_repeats=1,
    adapter_ids=None, sequence_ids=None) -> SampleOutput`, compiled once per shape (and per
    LoRA tree structure) with `cfg`/`sampling` baked in; several adapters in one batch
    (`adapter_ids`, see `generate`) compile once per number of adapters, never per mix.

    `lora_scale` is cast to a float32 array before the compiled call, so adapters with
    different alpha/r share one program.

    Without `mesh`, the compiled function is `fn.jitted` (a plain `jax.jit`; the compiler
    picks every layout). With `mesh`, it is jitted with explicit in/out shardings
    (`generate_shardings`) and the KV cache is constrained inside (`generate(mesh=...)`);
    arguments placed otherwise are moved to those shardings first (a no-op for params
    placed with `sharding.put_tree` and prompts with `sharding.shard_batch`). Either way
    `fn.jitted_for(*args)` is the `jax.jit` that serves these arguments and
    `fn.num_programs()` counts the compiled programs (one per shape bucket).
    """

    def run_for(prompt_repeats: int):
        def run(
            params, prompt_ids, prompt_mask, key, lora, lora_scale, adapter_ids=None, seq_ids=None
        ):
            return generate(
                params,
                prompt_ids,
                prompt_mask,
                key,
                cfg=cfg,
                sampling=sampling,
                lora=lora,
                lora_scale=lora_scale,
                mesh=mesh,
                prompt_repeats=prompt_repeats,
                adapter_ids=adapter_ids,
                sequence_ids=seq_ids,
            )

        return run

    programs: dict[Any, Any] = {}
    if mesh is None:
        programs[None] = jax.jit(run_for(1))

    def shardings(args: tuple) -> tuple[tuple, SampleOutput]:
        params, prompt_ids, _, _, lora, _, *ids = args
        in_sh, out_sh = generate_shardings(mesh, params, prompt_ids, lora, *ids)
        return in_sh[: len(args)], out_sh  # callers may leave the two id arrays out

    def jitted_for(*args, prompt_repeats: int = 1):
        if mesh is None:
            key = None if prompt_repeats == 1 else prompt_repeats
            if key not in programs:
                programs[key] = jax.jit(run_for(prompt_repeats))
            return programs[key]
        in_sh, out_sh = shardings(args)
        # Shardings depend on the params/LoRA shapes and on whether data x fsdp divides the
        # batch; one jit per distinct set, each compiling once per shape it sees.
        key = (jax.tree.structure(in_sh), tuple(jax.tree.leaves(in_sh)), out_sh, prompt_repeats)
        if key not in programs:
            programs[key] = jax.jit(
                run_for(prompt_repeats), in_shardings=in_sh, out_shardings=out_sh
            )
        return programs[key]

    def generate_fn(
        params: Params,
        prompt_ids: jax.Array,
        prompt_mask: jax.Array,
        key: jax.Array,
        lora: Params | None = None,
        lora_scale: Any = 1.0,
        prompt_repeats: int = 1,
        adapter_ids: Any = None,
        sequence_ids: Any = None,
    ) -> SampleOutput:
        check_left_padded(prompt_mask)
        check_repeated_prompts(prompt_ids, prompt_mask, prompt_repeats)
        if adapter_ids is not None:
            if lora is None:
                raise ValueError("adapter_ids needs lora: K adapters stacked on a leading axis")
            n_adapters = jax.tree.leaves(lora)[0].shape[0]
            check_adapter_ids(adapter_ids, np.shape(prompt_ids)[0], n_adapters, prompt_repeats)
            adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
        if sequence_ids is not None:
            sequence_ids = jnp.asarray(sequence_ids, jnp.int32)
        args = (
            params,
            prompt_ids,
            prompt_mask,
            key,
            lora,
            jnp.asarray(lora_scale, jnp.float32),
            adapter_ids,
            sequence_ids,
        )
        if mesh is not None:
            args = jax.device_put(args, shardings(args)[0])
        return jitted_for(*args, prompt_repeats=prompt_repeats)(*args)

    def num_programs() -> int:
        return sum(j._cache_size() for j in programs.values())

    if mesh is None:
        generate_fn.jitted = programs[None]  # type: ignore[attr-defined]
    generate_fn.jitted_for = jitted_for  # type: ignore[attr-defined]
    generate_fn.num_programs = num_programs  # type: ignore[attr-defined]
    generate_fn.__doc__ = make_generate_fn.__doc__
    return generate_fn


def decode_text(tokenizer: Any, out: SampleOutput) -> list[str]:
    """The response strings: each row cut at its response mask, special tokens skipped."""
    return decode_responses(tokenizer, out.tokens, out.response_mask)


def decode_responses(tokenizer: Any, tokens: Any, response_mask: Any) -> list[str]:
    """`decode_text` for response tokens [B, N] and their mask given apart."""
    tokens = np.asarray(tokens)
    mask = np.asarray(response_mask).astype(bool)
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
        for row, m in zip(tokens, mask, strict=True)
    ]
