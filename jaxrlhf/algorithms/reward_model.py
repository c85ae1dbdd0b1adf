"""Bradley–Terry reward-model training as jit-compiled pure steps.

    loss = −log σ(r(x, y_chosen) − r(x, y_rejected) − margin)  [+ c·(r_c + r_r)²]

r is the `score` head read at the last real token (a sequence classifier, never a causal
LM). Only the reward adapter and its `score` copy (or, in full fine-tuning, all params)
get gradients. With `share_prompt` the pair is packed so the prompt runs once
(`jaxrlhf.packing`); the rewards equal the unshared computation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.algorithms.common import TrainState, apply_update, dropout_args, model_views
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import bradley_terry_loss
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import _head_weights, backbone, score_head
from jaxrlhf.train.optim import accumulate_gradients


def pair_rewards(
    trainable: Any,
    frozen: Any,
    batch: dict,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(r_chosen, r_rejected) [B] for a pair batch, packed (`packed_*` keys) or not."""
    params, lora, scale = model_views(trainable, frozen, lora_cfg)
    extra = dropout_args(lora_cfg, rng) if rng is not None else {}
    if "packed_input_ids" in batch:
        hidden, _ = backbone(
            params,
            batch["packed_input_ids"],
            batch["packed_attention_mask"],
            cfg=model_cfg,
            lora=lora,
            lora_scale=scale,
            positions=batch["packed_positions"],
            segment_ids=batch["packed_segment_ids"],
            **extra,
        )
        w = _head_weights(params, lora, "score")["kernel"].astype(hidden.dtype)

        def read(idx):
            h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
            return jnp.einsum("bd,dl->bl", h, w, preferred_element_type=jnp.float32)[:, 0]

        return read(batch["chosen_last"]), read(batch["rejected_last"])
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    hidden, _ = backbone(params, ids, mask, cfg=model_cfg, lora=lora, lora_scale=scale, **extra)
    scores = score_head(params, hidden, mask, lora)
    n = batch["chosen_input_ids"].shape[0]
    return scores[:n], scores[n:]


def reward_loss(
    trainable: Any,
    batch: dict,
    frozen: Any,
    rng: jax.Array,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    center_rewards_coefficient: float | None,
) -> tuple[jax.Array, dict]:
    r_c, r_r = pair_rewards(
        trainable, frozen, batch, model_cfg=model_cfg, lora_cfg=lora_cfg, rng=rng
    )
    return bradley_terry_loss(
        r_c,
        r_r,
        margin=batch.get("margin"),
        center_rewards_coefficient=center_rewards_coefficient,
        weights=batch.get("pair_mask"),
    )


def make_train_step(
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    optimizer: optax.GradientTransformation,
    center_rewards_coefficient: float | None = None,
):
    """`step(state, frozen, micro_batches) -> (state, metrics)`; micro_batches: [n, B, ...]."""

    def loss_fn(trainable, batch, frozen, rng):
        return reward_loss(
            trainable,
            batch,
            frozen,
            rng,
            model_cfg=model_cfg,
            lora_cfg=lora_cfg,
            center_rewards_coefficient=center_rewards_coefficient,
        )

    def step(state: TrainState, frozen: Any, micro_batches: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        grads, metrics = accumulate_gradients(
            loss_fn, state.trainable, micro_batches, frozen, step_rng
        )
        new_state, grad_norm = apply_update(state.replace(rng=rng), grads, optimizer)
        return new_state, {**metrics, "grad_norm": grad_norm}

    return step


def make_eval_step(*, model_cfg: ModelConfig, lora_cfg: LoraConfig | None):
    """`eval(trainable, frozen, batch) -> (r_chosen, r_rejected)`; metrics are computed over
    the whole eval set on the host (`eval_metrics`)."""

    def step(trainable, frozen, batch):
        return pair_rewards(trainable, frozen, batch, model_cfg=model_cfg, lora_cfg=lora_cfg)

    return step


def eval_metrics(r_chosen, r_rejected, pair_mask, margin=None) -> dict[str, float]:
    _, metrics = bradley_terry_loss(
        jnp.asarray(r_chosen),
        jnp.asarray(r_rejected),
        margin=None if margin is None else jnp.asarray(margin),
        weights=jnp.asarray(pair_mask),
    )
    return {k: float(v) for k, v in metrics.items()}
