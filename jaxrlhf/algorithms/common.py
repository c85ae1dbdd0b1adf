"""Small pieces every algorithm shares: the train state, the trainable/frozen views, gradient
accumulation and the two step shapes (a preference step over micro-batches, an online
update over a minibatch of prepared rows)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxrlhf.lora import LoraConfig
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import backbone, load_balancing_loss


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
) -> tuple[TrainState, dict]:
    """One optimizer step; metrics `grad_norm` and `param_norm` (of the updated trainable
    tree: the run's guard reads both, so a non-finite update is caught at its step)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, {
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(trainable),
    }


def router_aux_active(model_cfg: ModelConfig) -> bool:
    """Whether a training loss adds the MoE router's load-balancing term: a mixture of experts
    whose `router_aux_loss_coef` (the checkpoint's, or `model.router_aux_loss_coef`) is not 0."""
    return model_cfg.num_experts > 0 and model_cfg.router_aux_loss_coef != 0.0


def hidden_and_aux(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    model_cfg: ModelConfig,
    **forward: Any,
) -> tuple[jax.Array, jax.Array | None]:
    """The backbone's hidden states [B, T, D] and, when `router_aux_active`, the
    load-balancing loss of the same forward over its real tokens (transformers' `aux_loss`,
    see `load_balancing_loss`); None otherwise. `forward`: the other `backbone` arguments."""
    if not router_aux_active(model_cfg):
        hidden, _ = backbone(params, input_ids, attention_mask, cfg=model_cfg, **forward)
        return hidden, None
    hidden, _, router_logits = backbone(
        params, input_ids, attention_mask, cfg=model_cfg, with_router_logits=True, **forward
    )
    aux = load_balancing_loss(router_logits, attention_mask, top_k=model_cfg.num_experts_per_tok)
    return hidden, aux


def add_router_aux_loss(
    loss: jax.Array,
    metrics: dict,
    aux_loss: jax.Array | None,
    *,
    model_cfg: ModelConfig,
    loss_key: str | None = "loss",
) -> tuple[jax.Array, dict]:
    """TRL's MoE term: loss + router_aux_loss_coef · aux_loss, with `aux_loss` (the unscaled
    load-balancing loss) in the metrics and the metric `loss_key` (when present) updated to
    the new total. Unchanged when `aux_loss` is None (a dense model, or the coefficient 0)."""
    if aux_loss is None:
        return loss, metrics
    total = loss + model_cfg.router_aux_loss_coef * aux_loss
    metrics = {**metrics, "aux_loss": jax.lax.stop_gradient(aux_loss)}
    if loss_key is not None and loss_key in metrics:
        metrics[loss_key] = jax.lax.stop_gradient(total)
    return total, metrics


def packed_hidden(
    params: Any,
    packed: dict,
    *,
    model_cfg: Any,
    prefix: str = "packed_",
    with_aux_loss: bool = False,
    **forward: Any,
):
    """The backbone's hidden states [B, T, D] of packed rows (prefix-shared: a prompt once,
    then its responses as segments; see `data.packing`), read from `packed[prefix + key]`
    for input_ids, attention_mask, positions and segment_ids. `forward`: lora, lora_scale,
    dropout. With `with_aux_loss`: (hidden, aux loss or None) as `hidden_and_aux`, over the
    packed tokens (a shared prompt counts once)."""
    hidden, aux = hidden_and_aux(
        params,
        packed[prefix + "input_ids"],
        packed[prefix + "attention_mask"],
        model_cfg=model_cfg,
        positions=packed[prefix + "positions"],
        segment_ids=packed[prefix + "segment_ids"],
        **forward,
    )
    return (hidden, aux) if with_aux_loss else hidden


def float_metrics(metrics: dict) -> dict[str, float]:
    """Device scalars as Python floats (eval metrics over a whole eval set)."""
    return {k: float(v) for k, v in metrics.items()}


def dropout_args(lora_cfg: LoraConfig | None, rng: jax.Array) -> dict:
    if lora_cfg is None or lora_cfg.dropout == 0.0:
        return {}
    return {"dropout_rate": lora_cfg.dropout, "dropout_rng": rng}


def accumulate_gradients(
    loss_fn: Callable, trainable: Any, micro_batches: Any, *extra: Any
) -> tuple[Any, dict]:
    """Mean gradient and metrics of `loss_fn(trainable, micro_batch, *extra) -> (loss, metrics)`
    over the leading axis of `micro_batches` (a scan, so memory is one micro-batch's).

    Gradient accumulation is not an optimizer wrapper here: a step scans over its
    micro-batches and applies one update, so no accumulator state is stored and every
    optimizer step is one compiled call."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n = jax.tree.leaves(micro_batches)[0].shape[0]
    if n == 1:
        (_, metrics), grads = grad_fn(
            trainable, jax.tree.map(lambda x: x[0], micro_batches), *extra
        )
        return grads, metrics

    def body(acc, mb):
        (_, metrics), grads = grad_fn(trainable, mb, *extra)
        return jax.tree.map(jnp.add, acc, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    grads, metrics = jax.lax.scan(body, zeros, micro_batches)
    return (
        jax.tree.map(lambda g: g / n, grads),
        jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics),
    )


def make_batch_step(loss_fn: Callable, optimizer: optax.GradientTransformation):
    """`step(state, frozen, micro_batches) -> (state, metrics)`: one optimizer step on the mean
    gradient of `loss_fn(trainable, micro_batch, frozen, rng) -> (loss, metrics)` over the
    micro-batches ([n, B, ...]); the state's rng is split for the step (LoRA dropout)."""

    def step(state: TrainState, frozen: Any, micro_batches: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        grads, metrics = accumulate_gradients(
            loss_fn, state.trainable, micro_batches, frozen, step_rng
        )
        new_state, norms = apply_update(state.replace(rng=rng), grads, optimizer)
        return new_state, {**metrics, **norms}

    return step


def make_minibatch_update(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    micro_batches: int,
    scale_micro_batches: Callable[[dict], dict] | None = None,
):
    """`update(state, frozen, batch, indices) -> (state, metrics)`: one optimizer step on the
    rows `indices` [m] of a prepared batch, split into `micro_batches` for gradient
    accumulation, with `loss_fn(trainable, micro_batch, frozen) -> (loss, metrics)`.
    `scale_micro_batches` may add per-micro-batch entries (e.g. a loss scale) first."""

    def update(state: TrainState, frozen: Any, batch: dict, indices: jax.Array):
        mb = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), batch)
        mb = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), mb)
        if scale_micro_batches is not None:
            mb = scale_micro_batches(mb)
        grads, metrics = accumulate_gradients(loss_fn, state.trainable, mb, frozen)
        state, norms = apply_update(state, grads, optimizer)
        return state, {**metrics, **norms}

    return update


def steps_from_outputs(outputs_fn: Callable, loss_from_outputs: Callable):
    """(make_train_step, make_eval_step, eval_metrics) of a preference algorithm whose loss
    is a function of per-pair outputs: `outputs_fn(trainable, frozen, batch, *, cfg,
    model_cfg, rng=None, with_aux_loss=False) -> tuple of [B]` (with `with_aux_loss`:
    (that tuple, MoE aux loss or None)) and `loss_from_outputs(cfg, outputs, pair_mask)
    -> (loss, metrics)`. The train step adds the router's aux loss (`add_router_aux_loss`);
    the eval step returns the outputs; the metrics are the loss's over the whole eval set
    (ORPO, CPO/SimPO)."""

    def make_train_step(cfg: Any, *, model_cfg: Any, optimizer: optax.GradientTransformation):
        def loss_fn(trainable, batch, frozen, rng):
            outputs, aux = outputs_fn(
                trainable, frozen, batch, cfg=cfg, model_cfg=model_cfg, rng=rng, with_aux_loss=True
            )
            loss, metrics = loss_from_outputs(cfg, outputs, batch["pair_mask"])
            return add_router_aux_loss(loss, metrics, aux, model_cfg=model_cfg)

        return make_batch_step(loss_fn, optimizer)

    def make_eval_step(cfg: Any, *, model_cfg: Any):
        def step(trainable, frozen, batch):
            return outputs_fn(trainable, frozen, batch, cfg=cfg, model_cfg=model_cfg)

        return step

    def eval_metrics(cfg: Any, outputs: tuple, pair_mask, margin=None) -> dict[str, float]:
        outputs = tuple(jnp.asarray(x) for x in outputs)
        _, metrics = loss_from_outputs(cfg, outputs, jnp.asarray(pair_mask))
        return float_metrics(metrics)

    return make_train_step, make_eval_step, eval_metrics
