"""Small pieces every algorithm shares: the train state and the trainable/frozen views."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxrlhf.lora import LoraConfig


@flax.struct.dataclass
class TrainState:
    """What a training step replaces: the trainable tree (LoRA + heads, or all params in full
    fine-tuning), its optimizer state, the step count and the rng."""

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(
    trainable: Any, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=rng,
    )


def model_views(trainable: Any, frozen: Any, lora_cfg: LoraConfig | None) -> tuple[Any, Any, float]:
    """(params, lora, lora_scale) for the forward pass. LoRA: the frozen base plus the adapter
    tree. Full fine-tuning: the trainable tree is the whole model and there is no adapter."""
    if lora_cfg is None:
        return trainable, None, 1.0
    return frozen, trainable, lora_cfg.scale


def apply_update(
    state: TrainState, grads: Any, optimizer: optax.GradientTransformation
) -> tuple[TrainState, jax.Array]:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, optax.global_norm(grads)


def dropout_args(lora_cfg: LoraConfig | None, rng: jax.Array) -> dict:
    if lora_cfg is None or lora_cfg.dropout == 0.0:
        return {}
    return {"dropout_rate": lora_cfg.dropout, "dropout_rng": rng}
