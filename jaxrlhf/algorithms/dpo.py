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

A batch is either packed (`packed_*` keys, prompt once; see `jaxrlhf.data.packing`) or
unshared (`chosen_*`/`rejected_*` rows with response masks); both give the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.algorithms.common import (
    add_router_aux_loss,
    dropout_args,
    float_metrics,
    hidden_and_aux,
    make_batch_step,
    model_views,
    packed_hidden,
)
from jaxrlhf.algorithms.spec import PreferenceAlgorithm
from jaxrlhf.config import PreferenceTraining, check_literal
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import dpo_loss, masked_mean, masked_sum
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import token_logprobs

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(PreferenceTraining):
    """`jaxrlhf dpo`: direct preference optimisation of a causal LM, as TRL's DPOTrainer.

    LoRA (the default): the policy is the frozen base plus the adapter and the reference is
    the same base with the adapter off, so no second copy of the model exists. `lora: null`
    is full fine-tuning against a frozen reference copy (TRL uses lr 1e-6 there; set
    `optim.learning_rate` accordingly)."""

    lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(task_type="CAUSAL_LM", r=16, alpha=32)
    )
    """`null` for full fine-tuning (with a frozen reference copy)."""
    beta: float = 0.1
    """Temperature of the implicit reward β·log(π/π_ref); smaller stays further from the
    reference's constraint."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """`sigmoid` (DPO), `ipo` (on length-averaged log-probs, as TRL) or `hinge` (SLiC)."""
    label_smoothing: float = 0.0
    """cDPO: the assumed share of flipped labels, in [0, 0.5) (`sigmoid` only)."""
    precompute_ref_logps: bool = False
    """Compute the reference log-probs once over the data before training (TRL's
    `precompute_ref_log_probs`); each step then runs the policy only. In full fine-tuning
    the reference copy is freed afterwards."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        check_literal(self, "loss_type", DPO_LOSS_TYPES)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(
                f"label_smoothing applies to loss_type 'sigmoid' only; got "
                f"loss_type={self.loss_type!r}; set label_smoothing=0"
            )
        if self.lora is not None:
            if self.lora.task_type != "CAUSAL_LM":
                raise ValueError(
                    "lora.task_type must be CAUSAL_LM for DPO (the policy is read "
                    "through the lm head)"
                )
            if self.lora.modules_to_save:
                raise ValueError(
                    f"lora.modules_to_save={list(self.lora.modules_to_save)}: DPO "
                    f"uses no score/value head; set it to []"
                )


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
    with_aux_loss: bool = False,
) -> tuple[jax.Array, ...]:
    """(chosen_logps, rejected_logps) [B] in float32: the sum (mean with `average`) of
    log p(token | its prefix) over each response's tokens; with `with_aux_loss` a third
    entry, the MoE router's aux loss of this forward or None (`common.hidden_and_aux`).

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
        hidden, aux = packed_hidden(
            params,
            batch,
            model_cfg=model_cfg,
            lora=lora,
            lora_scale=scale,
            with_aux_loss=True,
            **extra,
        )
        # Response tokens only: the vocabulary projection never runs on prompt slots.
        prev = jnp.take_along_axis(hidden, batch["packed_response_prev"][..., None], axis=1)
        lp, _ = token_logprobs(
            params,
            prev,
            batch["packed_response_ids"],
            chunk_size=chunk_size,
            logit_softcap=model_cfg.final_logit_softcap,
        )
        logps = (
            _reduce(lp, batch["packed_response_chosen"], average),
            _reduce(lp, batch["packed_response_rejected"], average),
        )
        return (*logps, aux) if with_aux_loss else logps
    n = batch["chosen_input_ids"].shape[0]
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    response = jnp.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]])
    hidden, aux = hidden_and_aux(
        params, ids, mask, model_cfg=model_cfg, lora=lora, lora_scale=scale, **extra
    )
    lp, _ = token_logprobs(
        params,
        hidden[:, :-1],
        ids[:, 1:],
        chunk_size=chunk_size,
        logit_softcap=model_cfg.final_logit_softcap,
    )
    logps = _reduce(lp, response[:, 1:], average)
    return (logps[:n], logps[n:], aux) if with_aux_loss else (logps[:n], logps[n:])


def policy_logps(
    trainable: Any,
    frozen: Any,
    batch: dict,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    average: bool = False,
    rng: jax.Array | None = None,
    with_aux_loss: bool = False,
) -> tuple[jax.Array, ...]:
    """Sequence log-probs under the policy: base + adapter (LoRA) or the trainable tree (full);
    with `with_aux_loss` also the MoE router's aux loss (see `sequence_logps`)."""
    params, lora, scale = model_views(trainable, frozen, lora_cfg)
    extra = dropout_args(lora_cfg, rng) if rng is not None else {}
    return sequence_logps(
        params,
        lora,
        scale,
        batch,
        model_cfg=model_cfg,
        average=average,
        with_aux_loss=with_aux_loss,
        **extra,
    )


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
    """(loss, metrics) of one batch; differentiable w.r.t. `trainable` only. A MoE policy
    adds its router's aux term (`add_router_aux_loss`)."""
    average = loss_type == "ipo"
    ref_c, ref_r = reference_logps(frozen, batch, model_cfg=model_cfg, average=average)
    pi_c, pi_r, aux = policy_logps(
        trainable,
        frozen,
        batch,
        model_cfg=model_cfg,
        lora_cfg=lora_cfg,
        average=average,
        rng=rng,
        with_aux_loss=True,
    )
    loss, metrics = dpo_loss(
        pi_c,
        pi_r,
        ref_c,
        ref_r,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        weights=batch.get("pair_mask"),
    )
    return add_router_aux_loss(loss, metrics, aux, model_cfg=model_cfg)


def make_train_step(
    cfg: DPOConfig, *, model_cfg: ModelConfig, optimizer: optax.GradientTransformation
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
            lora_cfg=cfg.lora,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
        )

    return make_batch_step(loss_fn, optimizer)


def make_ref_logps_step(cfg: DPOConfig, *, model_cfg: ModelConfig):
    """`ref(frozen, batch) -> {ref_chosen_logps, ref_rejected_logps}` [B], for precomputing
    the reference once before training (mean per token for "ipo", as the step uses)."""
    average = cfg.loss_type == "ipo"

    def step(frozen, batch):
        batch = {k: v for k, v in batch.items() if k not in REF_KEYS}
        c, r = reference_logps(frozen, batch, model_cfg=model_cfg, average=average)
        return {REF_KEYS[0]: c, REF_KEYS[1]: r}

    return step


def make_eval_step(cfg: DPOConfig, *, model_cfg: ModelConfig):
    """`eval(trainable, frozen, batch) -> (pi_c, pi_r, ref_c, ref_r)` [B] each; metrics are
    computed over the whole eval set on the host (`eval_metrics`)."""
    average = cfg.loss_type == "ipo"

    def step(trainable, frozen, batch):
        ref_c, ref_r = reference_logps(frozen, batch, model_cfg=model_cfg, average=average)
        pi_c, pi_r = policy_logps(
            trainable, frozen, batch, model_cfg=model_cfg, lora_cfg=cfg.lora, average=average
        )
        return pi_c, pi_r, ref_c, ref_r

    return step


def eval_metrics(cfg: DPOConfig, outputs: tuple, pair_mask, margin=None) -> dict[str, float]:
    """TRL's DPO eval metrics (`loss`, `rewards/chosen|rejected|accuracies|margins`,
    `logps/chosen|rejected`) over all pairs where `pair_mask` is 1."""
    pi_c, pi_r, ref_c, ref_r = (jnp.asarray(x) for x in outputs)
    _, metrics = dpo_loss(
        pi_c,
        pi_r,
        ref_c,
        ref_r,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        weights=jnp.asarray(pair_mask),
    )
    return float_metrics(metrics)


ALGORITHM = PreferenceAlgorithm(
    name="dpo",
    help="direct preference optimisation (reference = adapter off)",
    config=DPOConfig,
    task="CAUSAL_LM",
    heads=(),
    make_train_step=make_train_step,
    make_eval_step=make_eval_step,
    eval_metrics=eval_metrics,
    # Full fine-tuning keeps the frozen base as the reference (unless precomputed).
    needs_reference=lambda cfg: True,
    make_reference_step=make_ref_logps_step,
    precompute_reference=lambda cfg: cfg.precompute_ref_logps,
    summary_keys=("loss", "rewards/accuracies", "rewards/margins"),
    bar_keys=("loss", "rewards/accuracies", "rewards/margins"),
)
