"""Functional LoRA: an adapter is a small pytree beside the frozen base params.

For every targeted projection `W: [in, out]` (stacked over layers) the adapter holds

    lora_A: [L, in, r]   (random at init)      lora_B: [L, r, out]   (zero at init)

and the layer computes `x·W + s·(dropout(x)·A)·B` with `s = alpha / r` (or `alpha / sqrt(r)`
with rsLoRA). Because `B = 0` at init, a fresh adapter is the base model exactly. The adapter
may also carry full copies of heads (`modules_to_save`, e.g. `score`, `value`), which are
trained fully; the base keeps its own, so "adapter off" is always the original model.

    lora = init_lora(key, params, lora_cfg, model_cfg)
    logits = forward(params, ids, mask, cfg=model_cfg, lora=lora, lora_scale=lora_cfg.scale)
    ref_logits = forward(params, ids, mask, cfg=model_cfg)    # reference: adapter off
    merged = merge(params, lora, lora_cfg)                    # W + s·A·B, for rollouts/export

Only the adapter tree is differentiated, so no full-size gradient of a frozen weight exists.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.hf_names import module_path
from jaxrlhf.models.quant import is_quantized, logical_size
from jaxrlhf.models.transformer import (
    PROJECTIONS,
    init_head,
    is_expert_projection,
    kernel_shape,
    read_kernel,
)

Params = dict[str, Any]
HEADS = ("score", "value")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = PROJECTIONS
    """Module names matched by suffix (`q_proj`), or one regex matched against the full module
    name (`model.layers.3.self_attn.q_proj`), as PEFT does."""
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    task_type: Literal["CAUSAL_LM", "SEQ_CLS"] = "CAUSAL_LM"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.modules_to_save, list | str):
            mts = (
                (self.modules_to_save,)
                if isinstance(self.modules_to_save, str)
                else self.modules_to_save
            )
            object.__setattr__(self, "modules_to_save", tuple(mts))
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoraConfig.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.task_type not in ("CAUSAL_LM", "SEQ_CLS"):
            raise ValueError(
                f"LoraConfig.task_type must be 'CAUSAL_LM' or 'SEQ_CLS', got {self.task_type!r}"
            )
        for m in self.modules_to_save:
            if m not in HEADS:
                raise ValueError(
                    f"LoraConfig.modules_to_save: unknown module {m!r}; "
                    f"jaxrlhf trains these heads fully: {', '.join(HEADS)}"
                )
        if self.task_type == "SEQ_CLS" and "score" not in self.modules_to_save:
            raise ValueError(
                "LoraConfig: a SEQ_CLS adapter must list 'score' in modules_to_save, otherwise "
                "the randomly initialised score head would never be trained"
            )
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _matches(cfg: LoraConfig, full_name: str) -> bool:
    if isinstance(cfg.target_modules, str):
        return re.fullmatch(cfg.target_modules, full_name) is not None
    return any(full_name == t or full_name.endswith("." + t) for t in cfg.target_modules)


def _module_names(model_cfg: ModelConfig, proj: str, layer: int) -> list[str]:
    """HF module names of a projection in one block: one, or one per expert (PEFT's names,
    e.g. `model.layers.0.block_sparse_moe.experts.3.w1` for a Mixtral expert's gate)."""
    if not is_expert_projection(model_cfg, proj):
        return [f"model.layers.{layer}.{module_path(proj)}"]
    return [
        f"model.layers.{layer}.{module_path(proj, model_cfg, expert=e)}"
        for e in range(model_cfg.num_experts)
    ]


def target_name(model_cfg: ModelConfig, proj: str) -> str:
    """The name PEFT's `target_modules` uses for a projection (Mixtral's experts: w1/w3/w2)."""
    if not is_expert_projection(model_cfg, proj):
        return proj
    return module_path(proj, model_cfg, expert=0).rsplit(".", 1)[-1]


def all_targets(model_cfg: ModelConfig) -> tuple[str, ...]:
    """Every projection of the family by PEFT's names: the `target_modules` that adapts
    them all (Llama's default `PROJECTIONS` does not name Phi-3's fused or Mixtral's experts)."""
    return tuple(target_name(model_cfg, p) for p in model_cfg.projections)


def targeted_modules(cfg: LoraConfig, model_cfg: ModelConfig) -> tuple[str, ...]:
    """The projections the adapter covers (our names: `model_cfg.projections`). Every block
    (and every expert) must be matched alike, since blocks and experts are stacked; a name
    or regex that matches nothing is an error. The default (Llama's seven names) means every
    projection of the family (`all_targets`: Phi-3's fused ones, Mixtral's experts)."""
    if cfg.target_modules == PROJECTIONS:
        cfg = dataclasses.replace(cfg, target_modules=all_targets(model_cfg))
    chosen = []
    for proj in model_cfg.projections:
        per_layer = [
            [_matches(cfg, n) for n in _module_names(model_cfg, proj, i)]
            for i in range(model_cfg.num_layers)
        ]
        if all(all(hits) for hits in per_layer):
            chosen.append(proj)
        elif any(any(hits) for hits in per_layer):
            layers = [i for i, hits in enumerate(per_layer) if any(hits)]
            where = f"layers {layers}" if len(layers) < len(per_layer) else "some experts"
            raise ValueError(
                f"LoraConfig.target_modules matches {proj} in {where} only; jaxrlhf adapts a "
                f"projection in every layer (and expert): they are stacked"
            )
    if not chosen:
        raise ValueError(
            f"LoraConfig.target_modules={cfg.target_modules!r} matches no module of this "
            f"{model_cfg.model_type} model; choose from "
            f"{', '.join(target_name(model_cfg, p) for p in model_cfg.projections)} "
            f"(or a regex over names like model.layers.0.self_attn.q_proj)"
        )
    if not isinstance(cfg.target_modules, str):
        # The same suffix rule as `_matches`, so a partial name like "attn.q_proj" is flagged.
        full_names = [
            n
            for i in range(model_cfg.num_layers)
            for p in model_cfg.projections
            for n in _module_names(model_cfg, p, i)
        ]
        unused = [
            t
            for t in cfg.target_modules
            if not any(n == t or n.endswith("." + t) for n in full_names)
        ]
        if unused:
            raise ValueError(
                f"LoraConfig.target_modules: {unused} match no module of this "
                f"{model_cfg.model_type} model; choose from "
                f"{', '.join(target_name(model_cfg, p) for p in model_cfg.projections)}"
            )
    return tuple(chosen)


def init_lora(
    key: jax.Array, params: Params, cfg: LoraConfig, model_cfg: ModelConfig, *, dtype=jnp.float32
) -> Params:
    """A fresh adapter: A random (PEFT's kaiming-uniform, or normal with std 1/r), B zero, and
    copies of the `modules_to_save` heads (freshly initialised if the base has none)."""
    layers = params["layers"]
    tree: Params = {"layers": {}}
    n_proj = len(model_cfg.projections)
    keys = jax.random.split(key, n_proj + len(HEADS))
    for k, proj in zip(keys, targeted_modules(cfg, model_cfg), strict=False):
        expert = is_expert_projection(model_cfg, proj)
        # [L, in, out], or [L, E, in, out] for an expert stack: A and B stack alike.
        *lead, fan_in, fan_out = kernel_shape((layers["experts"] if expert else layers)[proj])
        if cfg.init == "kaiming":
            # torch's kaiming_uniform_(a=sqrt(5)) on a [r, in] weight: bound = 1/sqrt(in).
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(k, (*lead, fan_in, cfg.r), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, (*lead, fan_in, cfg.r), jnp.float32) / cfg.r
        factors = {
            "lora_A": a.astype(dtype),
            "lora_B": jnp.zeros((*lead, cfg.r, fan_out), dtype),
        }
        if expert:
            tree["layers"].setdefault("experts", {})[proj] = factors
        else:
            tree["layers"][proj] = factors
    for k, head in zip(keys[n_proj:], cfg.modules_to_save, strict=False):
        if head in params:
            tree[head] = jax.tree.map(lambda x: jnp.array(x, dtype), params[head])
        else:
            tree[head] = init_head(k, model_cfg, head, dtype=dtype)
    return tree


def delta(lora_layer: Params, scale: float) -> jax.Array:
    """s·A·B for one stacked projection: [L, in, out] (or [L, E, in, out]) in float32."""
    return scale * jnp.einsum(
        "...ir,...ro->...io",
        lora_layer["lora_A"].astype(jnp.float32),
        lora_layer["lora_B"].astype(jnp.float32),
    )


def _fold_layers(layers: Params, lora_layers: Params, scale: float, sign: float) -> Params:
    layers = dict(layers)
    for proj, ab in lora_layers.items():
        if proj == "experts":
            layers[proj] = _fold_layers(layers[proj], ab, scale, sign)
            continue
        # A quantized kernel is never merged into: the merged weight is dense float32.
        w = layers[proj]["kernel"]
        out_dtype = jnp.float32 if is_quantized(w) else w.dtype
        merged = read_kernel(layers[proj], jnp.float32) + sign * delta(ab, scale)
        layers[proj] = {**layers[proj], "kernel": merged.astype(out_dtype)}
    return layers


def _fold(params: Params, lora: Params, scale: float, sign: float, with_heads: bool) -> Params:
    layers = _fold_layers(params["layers"], lora.get("layers", {}), scale, sign)
    out = {**params, "layers": layers}
    if with_heads:
        for head in HEADS:
            if head in lora:
                out[head] = lora[head]
    return out


def merge(params: Params, lora: Params, cfg: LoraConfig, *, with_heads: bool = True) -> Params:
    """Base params with the adapter folded in (`W + s·A·B`); with `with_heads` the adapter's
    trained heads replace the base's. For rollouts (sampling at base speed) and export."""
    return _fold(params, lora, cfg.scale, +1.0, with_heads)


def unmerge(merged: Params, lora: Params, cfg: LoraConfig) -> Params:
    """Subtract the adapter's kernels again (`W − s·A·B`); heads are left as they are."""
    return _fold(merged, lora, cfg.scale, -1.0, False)


def pad_rank(lora: Params, max_rank: int) -> Params:
    """Zero-pad an adapter's rank to `max_rank`, so one compiled rollout program serves every
    adapter of rank ≤ max_rank (A·B is unchanged by zero rows/columns). Larger is refused."""

    def pad(ab: Params) -> Params:
        r = ab["lora_A"].shape[-1]
        if r > max_rank:
            raise ValueError(
                f"adapter rank {r} exceeds the rollout engine's max_rank={max_rank}; "
                f"recompile the sampler with a larger max_rank"
            )
        extra = max_rank - r
        lead = [(0, 0)] * (ab["lora_A"].ndim - 2)
        return {
            "lora_A": jnp.pad(ab["lora_A"], (*lead, (0, 0), (0, extra))),
            "lora_B": jnp.pad(ab["lora_B"], (*lead, (0, extra), (0, 0))),
        }

    def pad_layers(layers: Params) -> Params:
        return {k: pad_layers(v) if k == "experts" else pad(v) for k, v in layers.items()}

    return {**lora, "layers": pad_layers(lora.get("layers", {}))}


def lora_factors(lora: Params) -> list[Params]:
    """Every {lora_A, lora_B} pair of an adapter, the expert stacks' included."""
    layers = lora.get("layers", {})
    return [v for k, v in layers.items() if k != "experts"] + list(
        layers.get("experts", {}).values()
    )


def lora_rank(lora: Params) -> int:
    ranks = {v["lora_A"].shape[-1] for v in lora_factors(lora)}
    if len(ranks) != 1:
        raise ValueError(f"adapter has mixed ranks {sorted(ranks)}")
    return ranks.pop()


# ----------------------------------------------------------------------------- bookkeeping


def tree_bytes(tree: Any) -> int:
    """Resident bytes: a quantized weight counts its packed codes and scales."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def tree_size(tree: Any) -> int:
    """Number of parameters (a quantized weight by its logical shape, not its bytes)."""
    return logical_size(tree)


@dataclasses.dataclass(frozen=True)
class TrainableSummary:
    trainable_params: int
    total_params: int
    trainable_bytes: int
    optimizer_bytes: int
    frozen_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        mb = 1024 * 1024
        return (
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {self.trainable_percent:.4f} || trainable state: "
            f"{(self.trainable_bytes + self.optimizer_bytes) / mb:.2f} MiB (params "
            f"{self.trainable_bytes / mb:.2f} + optimizer {self.optimizer_bytes / mb:.2f}) "
            f"|| frozen: {self.frozen_bytes / mb:.2f} MiB"
        )


def trainable_summary(
    trainable: Any, frozen: Any = None, opt_state: Any = None
) -> TrainableSummary:
    """Trainable vs total parameter counts and bytes (params + optimizer state)."""
    n_train = tree_size(trainable)
    return TrainableSummary(
        trainable_params=n_train,
        total_params=n_train + (tree_size(frozen) if frozen is not None else 0),
        trainable_bytes=tree_bytes(trainable),
        optimizer_bytes=tree_bytes(opt_state) if opt_state is not None else 0,
        frozen_bytes=tree_bytes(frozen) if frozen is not None else 0,
    )


def split_trainable(
    key: jax.Array,
    base: Params,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    heads: tuple[str, ...] = (),
) -> tuple[Any, Any]:
    """(trainable, frozen). LoRA: a fresh adapter over the frozen base (heads as
    modules_to_save). Full fine-tuning: a float32 copy of everything, heads added, and no
    frozen tree."""
    if lora_cfg is not None:
        missing = [h for h in heads if h not in lora_cfg.modules_to_save]
        if missing:
            raise ValueError(
                f"lora.modules_to_save must include {missing}: those heads start "
                f"random and must be trained"
            )
        return init_lora(key, base, lora_cfg, model_cfg), base
    trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), base)
    for i, head in enumerate(heads):
        if head not in trainable:
            trainable[head] = init_head(jax.random.fold_in(key, i), model_cfg, head)
    return trainable, None


def stack_adapters(adapters: list[Any]) -> Any:
    """K adapters of one shape as one tree with a leading adapter axis [K, ...]: trained in
    one compiled step (`jax.vmap` over the axis; the frozen base is shared, read once)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def concat_adapters(stacked: Params) -> Params:
    """K stacked adapters (`stack_adapters`: `lora_A [K, L, in, r]`, `lora_B [K, L, r, out]`)
    as one adapter of rank K·r whose columns k·r … k·r + r − 1 are adapter k:

        A_cat = [A_1 | … | A_K]  [L, in, K·r]        B_cat = [B_1; …; B_K]  [L, K·r, out]

    With per-row column scales (`row_scales`) each row of a batch then runs its own adapter
    (`models.transformer.linear`). Only the decoder's kernels: an adapter with trained heads
    (`modules_to_save`) or expert factors is refused."""
    heads = [h for h in HEADS if h in stacked]
    if heads:
        raise ValueError(
            f"several adapters in one batch: the adapters carry modules_to_save heads {heads}, "
            f"which a per-row batch cannot switch; pass {{'layers': adapter['layers']}}"
        )
    layers = stacked.get("layers", {})
    if "experts" in layers:
        raise ValueError(
            "several adapters in one batch: LoRA on MoE experts is not supported; target the "
            "attention (or other non-expert) projections only"
        )

    def cat(ab: Params) -> Params:
        a, b = ab["lora_A"], ab["lora_B"]  # [K, L, in, r], [K, L, r, out]
        k, n_layers, fan_in, r = a.shape
        return {
            "lora_A": jnp.moveaxis(a, 0, 2).reshape(n_layers, fan_in, k * r),
            "lora_B": jnp.swapaxes(b, 0, 1).reshape(n_layers, k * r, b.shape[-1]),
        }

    return {"layers": {proj: cat(ab) for proj, ab in layers.items()}}


def row_scales(adapter_ids: jax.Array, scales: jax.Array, rank: int) -> jax.Array:
    """Per-row column scales [B, K·rank] for `concat_adapters`: row b gets `scales[k − 1]` on
    adapter k's columns when `adapter_ids[b] = k`, 0 elsewhere; id 0 is no adapter (the
    base, the reference), all zeros. `scales`: [K] (each adapter's alpha/r)."""
    scales = jnp.asarray(scales, jnp.float32)
    picked = jax.nn.one_hot(jnp.asarray(adapter_ids) - 1, scales.shape[0]) * scales
    return jnp.repeat(picked, rank, axis=-1)


def adapter_member(stacked: Any, k: int) -> Any:
    """Adapter k of a stacked tree (`stack_adapters`)."""
    return jax.tree.map(lambda x: x[k], stacked)
