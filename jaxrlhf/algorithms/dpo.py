"""Direct Preference Optimization (Rafailov et al., 2023) as jit-compiled pure steps.

    h    = [log π(y_c|x) − log π(y_r|x)] − [log π_ref(y_c|x) − log π_ref(y_r|x)]
    loss = −log σ(β·h)          (or IPO / hinge, see `jaxrlhf.losses.dpo_loss`)

log π(y|x) is the SUM of the response tokens' log-probabilities (TRL; "ipo" uses their
mean). With LoRA the policy is the frozen base plus the adapter and the reference is the
same base with the adapter off (`lora=None`): one copy of the model serves both, and only
the adapter gets gradients. In full fine-tuning the trainable tree is the policy and
`frozen` is a separate reference copy. Either way the reference pass reads `frozen` with no
adapter, so one function covers both. With precomputed reference log-probs
(`ref_chosen_logps`/`ref_rejected_logps` in the batch) the step runs the policy only.

A batch is either packed (`packed_*` keys, prompt once; see `jaxrlhf.packing`) or
unshared (`chosen_*`/`rejected_*` rows with response masks); both give the same numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.algorithms.common import TrainState, apply_update, dropout_args, model_views
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import dpo_loss, masked_mean, masked_sum
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import backbone, token_logprobs
from jaxrlhf.train.optim import accumulate_gradients

PACKED_KEYS = (
    "packed_input_ids",
    "packed_attention_mask",
    "packed_positions",
    "packed_segment_ids",
    "packed_response_prev",
    "packed_response_ids",
    "packed_response_chosen",
    "packed_response_rejected",
)
UNSHARED_KEYS = (
    "chosen_input_ids",
    "chosen_attention_mask",
    "chosen_response_mask",
    "rejected_input_ids",
    "rejected_attention_mask",
    "rejected_response_mask",
)
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _reduce(logps, mask, average: bool):
    return masked_mean(logps, mask, axis=-1) if average else masked_sum(logps, mask, axis=-1)


def sequence_logps(
    params: Any,
    lora: Any,
    scale: Any,
    batch: dict,
    *,
    model_cfg: ModelConfig,
    average: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    chunk_size: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """(chosen_logps, rejected_logps) [B] in float32: the sum (mean with `average`) of
    log p(token | its prefix) over each response's tokens.

    Packed batch: one forward over prompt + chosen + rejected; each response token is
    predicted by the hidden state at its `response_prev` slot (the last prompt token for
    the first token of either response); only response tokens reach the vocabulary
    projection. Unshared: chosen and rejected rows in one forward,
    token t+1 predicted from hidden t. Neither builds a [B, T, V] array (`token_logprobs`
    works in chunks)."""
    extra = (
        {"dropout_rate": dropout_rate, "dropout_rng": dropout_rng}
        if dropout_rng is not None
        else {}
    )
    if "packed_input_ids" in batch:
        ids = batch["packed_input_ids"]
        hidden, _ = backbone(
            params,
            ids,
            batch["packed_attention_mask"],
            cfg=model_cfg,
            lora=lora,
            lora_scale=scale,
            positions=batch["packed_positions"],
            segment_ids=batch["packed_segment_ids"],
            **extra,
        )
        # Response tokens only: the vocabulary projection never runs on prompt slots.
        prev = jnp.take_along_axis(hidden, batch["packed_response_prev"][..., None], axis=1)
        lp, _ = token_logprobs(params, prev, batch["packed_response_ids"], chunk_size=chunk_size)
        return (
            _reduce(lp, batch["packed_response_chosen"], average),
            _reduce(lp, batch["packed_response_rejected"], average),
        )
    n = batch["chosen_input_ids"].shape[0]
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    response = jnp.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]])
    hidden, _ = backbone(params, ids, mask, cfg=model_cfg, lora=lora, lora_scale=scale, **extra)
    lp, _ = token_logprobs(params, hidden[:, :-1], ids[:, 1:], chunk_size=chunk_size)
    logps = _reduce(lp, response[:, 1:], average)
    return logps[:n], logps[n:]


def policy_logps(
    trainable: Any,
    frozen: Any,
    batch: dict,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    average: bool = False,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probs under the policy: base + adapter (LoRA) or the trainable tree (full)."""
    params, lora, scale = model_views(trainable, frozen, lora_cfg)
    extra = dropout_args(lora_cfg, rng) if rng is not None else {}
    return sequence_logps(params, lora, scale, batch, model_cfg=model_cfg, average=average, **extra)


def reference_logps(
    frozen: Any, batch: dict, *, model_cfg: ModelConfig, average: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probs under the reference, constant: the precomputed ones when the batch
    carries them, else `frozen` with no adapter (the base in LoRA mode, the reference copy
    in full fine-tuning)."""
    if REF_KEYS[0] in batch:
        return batch[REF_KEYS[0]], batch[REF_KEYS[1]]
    if frozen is None:
        raise ValueError(
            "no reference: the batch has no precomputed reference log-probs and "
            "no frozen reference params were given"
        )
    c, r = sequence_logps(frozen, None, 1.0, batch, model_cfg=model_cfg, average=average)
    return jax.lax.stop_gradient(c), jax.lax.stop_gradient(r)


def dpo_objective(
    trainable: Any,
    batch: dict,
    frozen: Any,
    rng: jax.Array | None,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    beta: float,
    loss_type: str,
    label_smoothing: float,
) -> tuple[jax.Array, dict]:
    """(loss, metrics) of one batch; differentiable w.r.t. `trainable` only."""
    average = loss_type == "ipo"
    ref_c, ref_r = reference_logps(frozen, batch, model_cfg=model_cfg, average=average)
    pi_c, pi_r = policy_logps(
        trainable, frozen, batch, model_cfg=model_cfg, lora_cfg=lora_cfg, average=average, rng=rng
    )
    return dpo_loss(
        pi_c,
        pi_r,
        ref_c,
        ref_r,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        weights=batch.get("pair_mask"),
    )


def make_train_step(
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    optimizer: optax.GradientTransformation,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """`step(state, frozen, micro_batches) -> (state, metrics)`; micro_batches: [n, B, ...].

    `frozen` is the base (LoRA) or the reference copy (full fine-tuning); it may be None in
    full fine-tuning when the batches carry precomputed reference log-probs."""

    def loss_fn(trainable, batch, frozen, rng):
        return dpo_objective(
            trainable,
            batch,
            frozen,
            rng,
            model_cfg=model_cfg,
            lora_cfg=lora_cfg,
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )

    def step(state: TrainState, frozen: Any, micro_batches: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        grads, metrics = accumulate_gradients(
            loss_fn, state.trainable, micro_batches, frozen, step_rng
        )
        new_state, grad_norm = apply_update(state.replace(rng=rng), grads, optimizer)
        return new_state, {**metrics, "grad_norm": grad_norm}

    return step


def make_ref_logps_step(*, model_cfg: ModelConfig, loss_type: str = "sigmoid"):
    """`ref(frozen, batch) -> (ref_chosen_logps, ref_rejected_logps)` [B], for precomputing
    the reference once before training (mean per token for "ipo", as the step uses)."""
    average = loss_type == "ipo"

    def step(frozen, batch):
        batch = {k: v for k, v in batch.items() if k not in REF_KEYS}
        return reference_logps(frozen, batch, model_cfg=model_cfg, average=average)

    return step


def make_eval_step(
    *, model_cfg: ModelConfig, lora_cfg: LoraConfig | None, loss_type: str = "sigmoid"
):
    """`eval(trainable, frozen, batch) -> (pi_c, pi_r, ref_c, ref_r)` [B] each; metrics are
    computed over the whole eval set on the host (`eval_metrics`)."""
    average = loss_type == "ipo"

    def step(trainable, frozen, batch):
        ref_c, ref_r = reference_logps(frozen, batch, model_cfg=model_cfg, average=average)
        pi_c, pi_r = policy_logps(
            trainable, frozen, batch, model_cfg=model_cfg, lora_cfg=lora_cfg, average=average
        )
        return pi_c, pi_r, ref_c, ref_r

    return step


def eval_metrics(
    pi_c,
    pi_r,
    ref_c,
    ref_r,
    pair_mask,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """TRL's DPO eval metrics (`loss`, `rewards/chosen|rejected|accuracies|margins`,
    `logps/chosen|rejected`) over all pairs where `pair_mask` is 1."""
    _, metrics = dpo_loss(
        jnp.asarray(pi_c),
        jnp.asarray(pi_r),
        jnp.asarray(ref_c),
        jnp.asarray(ref_r),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        weights=jnp.asarray(pair_mask),
    )
    return {k: float(v) for k, v in metrics.items()}
