"""Continuous batching: a fixed number of decode slots over one pre-allocated KV cache, each
slot refilled with the next waiting prompt as soon as its row stops.

    waiting prompts ──prefill into a free slot (or copy a repeated prompt's cache)──> slot s
    decode all slots one token per step (jax.lax.while_loop) until some row stops
        (EOS or its budget) and a prompt is waiting -> harvest the row, refill its slot

A static batch (`Sampler`) decodes every row until the longest one stops, so on a workload
with varied lengths most rows sit finished while the batch keeps stepping; here a finished
row's slot goes back to work at once. The cost: prefills of one prompt (or `prefill_batch`)
at a time and a host round trip whenever a slot frees. With `prompt_repeats=k` a prompt is
prefilled once and its cache copied to the slots of its other copies (`clone_slot`).

Shapes are fixed: the slot state is `[slots, ...]` and a prompt is run at `prompt_length`
(the batch's width, or the engine's `prompt_length`, to which narrower batches are
left-padded), so the engine compiles two programs (prefill-a-slot, decode-until-free; one
more each for `prefill_batch` > 1 and for copying a repeated prompt) per (slots, cache
length = prompt_length + max_new_tokens) and never per prompt mix or batch size
(`num_programs`).

Each slot holds a batch-1 `KVCache` with its own write index; the decode step is
`sampling.decode_step` vmapped over the slots (the per-slot cache writes become one scatter).
A slot's layout is the static sampler's row layout: prompt left-padded into cache slots
[0, P), response token i at slot P + i, position `n_prompt + i`, so a sequence's logits are
the static sampler's. Every sequence draws token i from its own stream,
`uniform(fold_in(fold_in(key, b), i))` with b its row in the prompt batch
(`sampling.sequence_uniforms`), so its tokens do not depend on the slot or the company it
ran in, and equal `Sampler(..., per_sequence_rng=True)`'s row b for the same key.

Several adapters in one batch (`generate(..., adapter_ids=)`): each slot carries its row's
adapter id (`SlotState.adapter`; 0 is the base), a refilled slot takes the new row's, and the
adapters run as one concatenated adapter with per-row column scales (`slot_scales`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf import sharding as S
from jaxrlhf.lora import LoraConfig, concat_adapters, pad_rank, row_scales
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import KVCache, Params, unstack_layers
from jaxrlhf.rollout.engine import Rollout, merged_rollout_weights, stacked_layers
from jaxrlhf.rollout.sampling import (
    SamplingConfig,
    check_adapter_ids,
    check_left_padded,
    check_repeated_prompts,
    choose_tokens,
    decode_step,
    prefill,
    sequence_uniforms,
)


@dataclasses.dataclass(frozen=True)
class RolloutMetrics:
    """What one `generate` call did (`ContinuousEngine.last_metrics`)."""

    sequences: int
    response_tokens: int
    """Tokens generated (EOS included), summed over the sequences."""
    seconds: float
    tokens_per_second: float
    slot_occupancy: float
    """Share of slot-steps in the decode loop that advanced a live row:
    active slot-steps / (slots x decode steps)."""
    prefill_share: float
    """Share of the wall time spent in prefill calls (the rest: decode and bookkeeping)."""
    decode_share: float
    truncation_rate: float
    """Share of sequences cut at their budget without an EOS."""
    decode_steps: int
    prefills: int
    """Prompts run through the model (copies of a repeated prompt are cloned instead)."""

    def as_dict(self, prefix: str = "rollout/") -> dict[str, float]:
        """Flat `{prefix + name: value}` for a metrics logger."""
        return {prefix + k: float(v) for k, v in dataclasses.asdict(self).items()}


class SlotState(NamedTuple):
    """The engine's device state, every leaf `[slots, ...]` but the two counters."""

    k: jax.Array  # [S, L, 1, KVH, C, hd]: one batch-1 cache per slot
    v: jax.Array
    valid: jax.Array  # [S, 1, C] bool
    index: jax.Array  # [S] int32: each slot's next cache write
    last: jax.Array  # [S] int32: the last token emitted (fed at the next step)
    step: jax.Array  # [S] int32: tokens emitted so far
    n_prompt: jax.Array  # [S] int32: real prompt tokens (position of response token 0)
    seq: jax.Array  # [S] int32: the sequence (prompt row) in the slot: its RNG stream
    adapter: jax.Array  # [S] int32: the slot's adapter (0: none; several adapters in a batch)
    budget: jax.Array  # [S] int32: the most tokens this sequence may emit
    active: jax.Array  # [S] bool: the row is still running
    eos: jax.Array  # [S] bool: the row stopped at an EOS
    tokens: jax.Array  # [S, N] int32
    response_mask: jax.Array  # [S, N] int32
    logprobs: jax.Array  # [S, N] float32
    first_logits: jax.Array  # [S, V] float32: the prefill's logits of token 0 (for repeats)
    active_steps: jax.Array  # int32: slot-steps that advanced a live row (decode only)
    steps: jax.Array  # int32: decode steps run


def init_slots(
    cfg: ModelConfig, slots: int, cache_length: int, max_new_tokens: int, pad_token_id: int
) -> SlotState:
    """Empty slots over a zeroed cache of `cache_length` per slot."""
    dtype = jnp.dtype(cfg.dtype)
    kv = (slots, cfg.num_layers, 1, cfg.num_kv_heads, cache_length, cfg.head_dim)

    def zeros_i():  # a buffer per field: the programs donate the state
        return jnp.zeros((slots,), jnp.int32)

    return SlotState(
        k=jnp.zeros(kv, dtype),
        v=jnp.zeros(kv, dtype),
        valid=jnp.zeros((slots, 1, cache_length), bool),
        index=zeros_i(),
        last=zeros_i(),
        step=zeros_i(),
        n_prompt=zeros_i(),
        seq=zeros_i(),
        adapter=zeros_i(),
        budget=zeros_i(),
        active=jnp.zeros((slots,), bool),
        eos=jnp.zeros((slots,), bool),
        tokens=jnp.full((slots, max_new_tokens), pad_token_id, jnp.int32),
        response_mask=jnp.zeros((slots, max_new_tokens), jnp.int32),
        logprobs=jnp.zeros((slots, max_new_tokens), jnp.float32),
        first_logits=jnp.zeros((slots, cfg.vocab_size), jnp.float32),
        active_steps=jnp.zeros((), jnp.int32),
        steps=jnp.zeros((), jnp.int32),
    )


def prefill_slots(
    params: Params,
    lora: Params | None,
    lora_scale: jax.Array,
    state: SlotState,
    slots: jax.Array,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    seqs: jax.Array,
    budgets: jax.Array,
    key: jax.Array,
    adapters: jax.Array,
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
) -> SlotState:
    """Run K left-padded prompts [K, P] in one prefill into `slots` [K] (their cache rows
    rebuilt from scratch; a slot index >= the number of slots marks an unused row, dropped)
    and emit each sequence's token 0 from its stream (`start_rows`). `adapters` [K]: each
    prompt's adapter when `lora_scale` is per adapter ([A], see `slot_scales`)."""
    logits, cache = prefill(
        params,
        prompt_ids,
        prompt_mask,
        cfg=cfg,
        cache_length=state.valid.shape[-1],
        lora=lora,
        lora_scale=slot_scales(lora, lora_scale, adapters),
    )
    rows = KVCache(
        k=jnp.moveaxis(cache.k, 1, 0),  # [K, L, KVH, C, hd]
        v=jnp.moveaxis(cache.v, 1, 0),
        valid=cache.valid,
        index=jnp.broadcast_to(cache.index, slots.shape),
    )
    n_prompt = jnp.sum(prompt_mask, axis=-1)
    return start_rows(
        state, slots, rows, logits, n_prompt, seqs, budgets, key, adapters, sampling=sampling
    )


def slot_scales(lora: Params | None, lora_scale: jax.Array, adapters: jax.Array) -> jax.Array:
    """The LoRA scale of these rows: the scalar as it is (one adapter), or, for per-adapter
    scales [A] over a concatenated adapter of rank A·r (`lora.concat_adapters`), each row's
    column scales [rows, A·r] from its adapter id (`lora.row_scales`; 0: none)."""
    if lora is None or jnp.ndim(lora_scale) == 0:
        return lora_scale
    layers = lora["layers"]
    first = layers[0] if isinstance(layers, list) else layers
    total_rank = next(iter(first.values()))["lora_A"].shape[-1]
    return row_scales(adapters, lora_scale, total_rank // lora_scale.shape[0])


def clone_slot(
    state: SlotState,
    slot: jax.Array,
    source: jax.Array,
    seq: jax.Array,
    budget: jax.Array,
    key: jax.Array,
    *,
    sampling: SamplingConfig,
) -> SlotState:
    """Start sequence `seq` in `slot` from the prompt already in `source`'s cache (another
    copy of the same prompt, `prompt_repeats`): its cache slots [0, P) and its prefill
    logits are copied, no model call. Decoding writes only at slots >= P, so the prompt part
    of `source` holds even after its row has stopped."""
    cache_length = state.valid.shape[-1]
    width = cache_length - sampling.max_new_tokens
    prompt = KVCache(
        k=state.k[source, :, 0][None],
        v=state.v[source, :, 0][None],
        valid=(state.valid[source, 0] & (jnp.arange(cache_length) < width))[None],
        index=jnp.full((1,), width, jnp.int32),
    )
    return start_rows(
        state,
        slot[None],
        prompt,
        state.first_logits[source][None],
        state.n_prompt[source][None],
        seq[None],
        budget[None],
        key,
        state.adapter[source][None],
        sampling=sampling,
    )


def start_rows(
    state: SlotState,
    slots: jax.Array,
    prompts: KVCache,
    logits: jax.Array,
    n_prompt: jax.Array,
    seqs: jax.Array,
    budgets: jax.Array,
    key: jax.Array,
    adapters: jax.Array,
    *,
    sampling: SamplingConfig,
) -> SlotState:
    """Put K prompts' caches (k, v: [K, L, KVH, C, hd]; valid [K, C]; index [K]) in `slots`
    [K] and emit each sequence's token 0 from `logits` [K, V] with its stream. A slot is
    active unless that token is an EOS or its budget is 1. Out-of-range slots are dropped."""
    tok, logp = choose_tokens(logits, key, sampling, sequence_uniforms(key, seqs, 0))
    stopped = jnp.isin(tok, _eos_array(sampling))
    first = (jnp.arange(sampling.max_new_tokens) == 0)[None, :]

    def put(x, value):
        return x.at[slots].set(value, mode="drop")

    return state._replace(
        k=put(state.k, prompts.k[:, :, None]),
        v=put(state.v, prompts.v[:, :, None]),
        valid=put(state.valid, prompts.valid[:, None]),
        index=put(state.index, prompts.index),
        last=put(state.last, tok),
        step=put(state.step, jnp.ones_like(tok)),
        n_prompt=put(state.n_prompt, n_prompt),
        seq=put(state.seq, seqs),
        adapter=put(state.adapter, adapters),
        budget=put(state.budget, budgets),
        active=put(state.active, ~stopped & (budgets > 1)),
        eos=put(state.eos, stopped),
        tokens=put(state.tokens, jnp.where(first, tok[:, None], sampling.pad_token_id)),
        response_mask=put(
            state.response_mask,
            jnp.broadcast_to(first, (tok.shape[0], first.shape[1])).astype(jnp.int32),
        ),
        logprobs=put(state.logprobs, jnp.where(first, logp[:, None], 0.0)),
        first_logits=put(state.first_logits, logits.astype(jnp.float32)),
    )


def decode_until_free(
    params: Params,
    lora: Params | None,
    lora_scale: jax.Array,
    state: SlotState,
    key: jax.Array,
    free_target: jax.Array,
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
) -> SlotState:
    """Decode every slot one token per step until no row runs, or until `free_target` (> 0)
    slots are free (rows that stopped), so they can be refilled. `free_target` 0: until
    every row has stopped."""
    eos_ids = _eos_array(sampling)
    pad = jnp.int32(sampling.pad_token_id)
    columns = jnp.arange(sampling.max_new_tokens)
    slots = state.active.shape[0]
    per_row = lora is not None and jnp.ndim(lora_scale) == 1  # several adapters

    def one_slot(tok, pos, k, v, valid, index, scale):
        logits, cache = decode_step(
            params,
            tok[None],
            pos[None],
            KVCache(k=k, v=v, valid=valid, index=index),
            cfg=cfg,
            lora=lora,
            lora_scale=scale[None] if per_row else scale,
        )
        return logits[0], cache

    def cond(s: SlotState):
        running = jnp.sum(s.active)
        return (running > 0) & ((free_target == 0) | (slots - running < free_target))

    def body(s: SlotState) -> SlotState:
        logits, cache = jax.vmap(one_slot, in_axes=(0,) * 6 + (0 if per_row else None,))(
            s.last,
            s.n_prompt + s.step - 1,
            s.k,
            s.v,
            s.valid,
            s.index,
            slot_scales(lora, lora_scale, s.adapter),
        )
        uniforms = sequence_uniforms(key, s.seq, s.step)
        tok, logp = choose_tokens(logits, key, sampling, uniforms)
        live = s.active
        write = live[:, None] & (columns[None, :] == s.step[:, None])
        stopped = live & jnp.isin(tok, eos_ids)
        step = s.step + live.astype(jnp.int32)
        return s._replace(
            k=cache.k,
            v=cache.v,
            valid=cache.valid,
            index=cache.index,
            last=jnp.where(live, tok, s.last),
            step=step,
            active=live & ~stopped & (step < s.budget),
            eos=s.eos | stopped,
            tokens=jnp.where(write, jnp.where(live, tok, pad)[:, None], s.tokens),
            response_mask=jnp.where(write, 1, s.response_mask),
            logprobs=jnp.where(write, logp[:, None], s.logprobs),
            active_steps=s.active_steps + jnp.sum(live),
            steps=s.steps + 1,
        )

    # The loop carries one array per layer ([slots, 1, KVH, C, hd] each), so no step slices
    # a layer out of the stack (`transformer.split_cache_layers`); stacked again after.
    def per_layer(x):
        return tuple(x[:, i] for i in range(x.shape[1]))

    state = state._replace(k=per_layer(state.k), v=per_layer(state.v))
    state = jax.lax.while_loop(cond, body, state)
    return state._replace(k=jnp.stack(state.k, axis=1), v=jnp.stack(state.v, axis=1))


def _eos_array(sampling: SamplingConfig) -> jax.Array:
    return jnp.asarray(sampling.eos_token_ids or (-1,), jnp.int32)


def static_slot_occupancy(response_mask: Any) -> float:
    """The decode-loop occupancy a static batch gets for these responses [B, N]: every row
    steps until the longest stops, so sum(len - 1) / (B x (max len - 1)) (token 0 comes from
    the prefill in both engines, as in `RolloutMetrics.slot_occupancy`)."""
    lengths = np.asarray(response_mask).sum(axis=1)
    steps = int(lengths.max()) - 1
    if steps <= 0:
        return 1.0
    return float(np.sum(lengths - 1) / (lengths.size * steps))


class ContinuousEngine:
    """A continuous-batching `RolloutEngine` with `slots` decode slots.

    Same contract and `Rollout` layout as `Sampler` (rows in the prompts' order; responses
    of `max_new_tokens` columns) and the same LoRA handling: merged into the base once per
    call (`gen.merge_adapter`) or applied unmerged at `gen.max_rank`. Tokens equal
    `Sampler(..., per_sequence_rng=True)`'s for the same key (up to float rounding of the
    different batch shapes). `prompt_length`: run every prompt at this width (narrower
    batches are left-padded to it), so batches of any width share the compiled programs.
    `prefill_batch`: when that many slots wait for a prompt (the first fill, simultaneous
    stops) they are prefilled in one call (one more program); fewer go one at a time.
    `refill_at`: the decode loop returns to the host to refill once this many slots are free
    (fewer host round trips; those slots idle meanwhile). `prefill_batch = refill_at` makes
    every refill one prefill call.

    After each call, `last_metrics` holds a `RolloutMetrics`. The slot state (the KV cache
    of every slot) is allocated per call and freed after it, so training never shares memory
    with an idle cache.

    With `mesh`, the programs are jitted without explicit shardings (the compiler lays out
    the slot state next to the params); the returned rollout is placed with
    `sharding.shard_batch`.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        gen: Any,
        *,
        lora_cfg: LoraConfig | None,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int,
        slots: int,
        prompt_length: int | None = None,
        prefill_batch: int = 1,
        refill_at: int = 1,
        mesh: Mesh | None = None,
    ):
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"ContinuousEngine slots must be an int >= 1, got {slots!r}")
        if not isinstance(prefill_batch, int) or not 1 <= prefill_batch <= slots:
            raise ValueError(
                f"ContinuousEngine prefill_batch must be an int in [1, slots={slots}], got "
                f"{prefill_batch!r}"
            )
        if prompt_length is not None and (not isinstance(prompt_length, int) or prompt_length < 1):
            raise ValueError(
                f"ContinuousEngine prompt_length must be an int >= 1 or None (the batch's "
                f"width), got {prompt_length!r}"
            )
        self.model_cfg, self.gen, self.lora_cfg, self.mesh = model_cfg, gen, lora_cfg, mesh
        if not isinstance(refill_at, int) or not 1 <= refill_at <= slots:
            raise ValueError(
                f"ContinuousEngine refill_at must be an int in [1, slots={slots}], got "
                f"{refill_at!r}"
            )
        self.slots, self.prompt_length = slots, prompt_length
        self.prefill_batch, self.refill_at = prefill_batch, refill_at
        self.sampling = SamplingConfig(
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            per_sequence_rng=True,
        )
        statics = {"cfg": model_cfg, "sampling": self.sampling}
        self._prefill = jax.jit(lambda *a: prefill_slots(*a, **statics), donate_argnums=(3,))
        self._decode = jax.jit(lambda *a: decode_until_free(*a, **statics), donate_argnums=(3,))
        self._clone = jax.jit(
            lambda *a: clone_slot(*a, sampling=self.sampling), donate_argnums=(0,)
        )
        self._merge = jax.jit(lambda base, lora: merged_rollout_weights(base, lora, lora_cfg))
        self._concat = jax.jit(concat_adapters)
        self.last_metrics: RolloutMetrics | None = None

    def num_programs(self) -> int:
        """Compiled programs so far: two per (slots, cache length, LoRA tree structure), one
        more with `prefill_batch` > 1, and one more once a repeated prompt is copied."""
        return sum(f._cache_size() for f in (self._prefill, self._decode, self._clone))

    def _weights(
        self, policy: Any, frozen: Any, stacked: bool = False
    ) -> tuple[Params, Params | None, Any]:
        if stacked:  # K adapters as one of rank K·r, a scale per adapter (`slot_scales`)
            if self.lora_cfg is None:
                raise ValueError(
                    "adapter_ids: several adapters in one batch need a LoRA run (lora_cfg); "
                    "full fine-tuning has no adapters to switch"
                )
            layers = stacked_layers(policy, self.gen.max_rank)
            k = jax.tree.leaves(layers)[0].shape[0]
            lora = self._concat(layers)
            params = {**frozen, "layers": unstack_layers(frozen["layers"])}
            scales = jnp.full((k,), self.lora_cfg.scale, jnp.float32)
            return params, {"layers": unstack_layers(lora["layers"])}, scales
        if self.lora_cfg is None:
            return {**policy, "layers": unstack_layers(policy["layers"])}, None, 1.0
        if self.gen.merge_adapter:
            return self._merge(frozen, policy), None, 1.0
        lora = policy if self.gen.max_rank is None else pad_rank(policy, self.gen.max_rank)
        params = {**frozen, "layers": unstack_layers(frozen["layers"])}
        return params, {"layers": unstack_layers(lora["layers"])}, self.lora_cfg.scale

    def generate(
        self,
        policy: Any,
        frozen: Any,
        prompts: dict,
        key: jax.Array,
        *,
        prompt_repeats: int = 1,
        budgets: Any = None,
        adapter_ids: Any = None,
        sequence_ids: Any = None,
    ) -> Rollout:
        """`RolloutEngine.generate`. Copies of a repeated prompt (`prompt_repeats`) run as
        separate sequences; the prompt is prefilled once while one of its copies holds a
        slot and copied from that slot's cache for the others. `budgets` [B] (ints in
        [1, max_new_tokens], default all max_new_tokens): the most tokens row b may emit.

        Several adapters in one batch: with `adapter_ids` [B] (0: no adapter, the
        reference; k: adapter k−1) `policy` is K adapters stacked on a leading axis
        (`lora.stack_adapters`), run unmerged; each slot carries its row's adapter id, and a
        refilled slot takes the new row's. `sequence_ids` [B]: each row's RNG stream
        (default its row index), so a row can be given the stream it has in another batch."""
        ids = np.asarray(S.host_view(prompts["input_ids"]), np.int32)
        mask = np.asarray(S.host_view(prompts["attention_mask"]), np.int32)
        check_left_padded(mask)
        check_repeated_prompts(ids, mask, prompt_repeats)
        b, p = ids.shape
        n = self.sampling.max_new_tokens
        budgets = np.full((b,), n, np.int32) if budgets is None else np.asarray(budgets)
        if budgets.shape != (b,) or budgets.min() < 1 or budgets.max() > n:
            raise ValueError(
                f"budgets must be [{b}] ints in [1, max_new_tokens={n}], got shape "
                f"{budgets.shape} and range [{budgets.min()}, {budgets.max()}]"
            )
        width = p if self.prompt_length is None else self.prompt_length
        if p > width:
            raise ValueError(
                f"The prompts are {p} tokens wide but the engine's prompt_length is {width}; "
                "raise prompt_length or truncate the prompts"
            )
        run_ids = np.pad(ids, ((0, 0), (width - p, 0)), constant_values=self.sampling.pad_token_id)
        run_mask = np.pad(mask, ((0, 0), (width - p, 0)))
        stacked = adapter_ids is not None
        if stacked:
            n_adapters = jax.tree.leaves(policy["layers"])[0].shape[0]
            check_adapter_ids(adapter_ids, b, n_adapters, prompt_repeats)
        row_adapter = np.zeros((b,), np.int32) if not stacked else np.asarray(adapter_ids)
        row_adapter = row_adapter.astype(np.int32)
        streams = np.arange(b, dtype=np.int32)
        if sequence_ids is not None:
            streams = np.asarray(S.host_view(sequence_ids), np.int32)
            if streams.shape != (b,):
                raise ValueError(
                    f"sequence_ids must be [{b}] ints (one stream per row), got {streams.shape}"
                )

        start = time.perf_counter()
        params, lora, scale = self._weights(policy, frozen, stacked)
        scale = jnp.asarray(scale, jnp.float32)
        state = init_slots(self.model_cfg, self.slots, width + n, n, self.sampling.pad_token_id)
        if self.mesh is not None:
            state = jax.device_put(state, S.replicated(self.mesh))
        out_tokens = np.full((b, n), self.sampling.pad_token_id, np.int32)
        out_mask = np.zeros((b, n), np.int32)
        out_logprobs = np.zeros((b, n), np.float32)
        out_eos = np.zeros((b,), bool)
        in_slot = [-1] * self.slots  # the sequence each slot holds (-1: free)
        # The prompt group whose prompt sits in each slot's cache [0, P) (kept after the row
        # stops, until the slot is refilled): later copies of that prompt are cloned from it.
        cache_group = [-1] * self.slots
        waiting = list(range(b))
        prefill_seconds, prefills = 0.0, 0

        def harvest(state: SlotState) -> None:
            """Copy every stopped row out of its slot and free the slot."""
            active = np.asarray(state.active)
            done = [s for s in range(self.slots) if in_slot[s] >= 0 and not active[s]]
            if not done:
                return
            toks, rmask, logp, eos = jax.device_get(
                (state.tokens, state.response_mask, state.logprobs, state.eos)
            )
            for s in done:
                row = in_slot[s]
                out_tokens[row], out_mask[row] = toks[s], rmask[s]
                out_logprobs[row], out_eos[row] = logp[s], eos[s]
                in_slot[s] = -1

        def flush(state: SlotState, pending: list[tuple[int, int]]) -> SlotState:
            """Prefill the pending rows: `prefill_batch` at a time, the rest one by
            one (two programs at most, never a padded row)."""
            while pending:
                k = self.prefill_batch if len(pending) >= self.prefill_batch else 1
                chunk = [pending.pop(0) for _ in range(k)]
                slots_, rows = (np.array(x, np.int32) for x in zip(*chunk, strict=True))
                state = self._prefill(
                    params,
                    lora,
                    scale,
                    state,
                    slots_,
                    run_ids[rows],
                    run_mask[rows],
                    streams[rows],
                    budgets[rows].astype(np.int32),
                    key,
                    row_adapter[rows],
                )
            return state

        while True:
            free = [s for s in range(self.slots) if in_slot[s] < 0]
            if free and waiting:
                t0 = time.perf_counter()
                pending: list[tuple[int, int]] = []  # (slot, row) to prefill
                for s in free[: len(waiting)]:
                    row = waiting.pop(0)
                    group = row // prompt_repeats
                    if group in cache_group:
                        source = cache_group.index(group)
                        if any(slot == source for slot, _ in pending):
                            state = flush(state, pending)  # the source's prompt is not in yet
                        state = self._clone(
                            state,
                            jnp.int32(s),
                            jnp.int32(source),
                            jnp.int32(streams[row]),
                            jnp.int32(budgets[row]),
                            key,
                        )
                    else:
                        pending.append((s, row))
                        prefills += 1
                    in_slot[s], cache_group[s] = row, group
                state = flush(state, pending)
                harvest(state)  # rows that stopped at token 0 (an EOS, or a budget of 1)
                prefill_seconds += time.perf_counter() - t0
                continue
            if all(s < 0 for s in in_slot):
                break
            # Back to the host once `refill_at` slots (or as many as prompts wait) are free.
            target = min(self.refill_at, len(waiting))
            state = self._decode(params, lora, scale, state, key, jnp.int32(target))
            harvest(state)

        steps, active_steps = (int(x) for x in jax.device_get((state.steps, state.active_steps)))
        state = params = lora = None  # free the slot caches and the merged weights
        seconds = time.perf_counter() - start
        generated = int(out_mask.sum())
        self.last_metrics = RolloutMetrics(
            sequences=b,
            response_tokens=generated,
            seconds=seconds,
            tokens_per_second=generated / seconds,
            slot_occupancy=active_steps / (self.slots * steps) if steps else 1.0,
            prefill_share=prefill_seconds / seconds,
            decode_share=1.0 - prefill_seconds / seconds,
            truncation_rate=float(np.mean(~out_eos)),
            decode_steps=steps,
            prefills=prefills,
        )
        rollout = Rollout(
            input_ids=np.concatenate([ids, out_tokens], axis=1),
            attention_mask=np.concatenate([mask, out_mask], axis=1),
            response_mask=out_mask,
            sampler_logprobs=out_logprobs,
            finished=out_eos,
            tokens=out_tokens,
        )
        if self.mesh is not None:
            return S.shard_batch(rollout, self.mesh)
        return jax.tree.map(jnp.asarray, rollout)

    __call__ = generate
