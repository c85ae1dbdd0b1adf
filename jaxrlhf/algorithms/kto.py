"""Kahneman-Tversky Optimization (Ethayarajh et al., 2024) as jit-compiled pure steps, as
TRL's KTOTrainer (`jaxrlhf.losses.kto_loss`), on the pair driver.

Unpaired feedback: a completion y for prompt x, desirable or not. With summed log-probs,
h = log π(y|x) − log π_ref(y|x) and the reference point z0 estimated from mismatched pairs
(x_i, y'_i) of the batch:

    z0   = max(0, mean_i sg[log π(y'_i|x_i) − log π_ref(y'_i|x_i)])
    loss = mean  λ_D·(1 − σ(β(h − z0)))  (desirable)  |  λ_U·(1 − σ(β(z0 − h)))  (undesirable)

Each row arrives as a pair (`jaxrlhf.data.unpaired`): "chosen" = its completion,
"rejected" = its KL completion, `margin` = its label; so one packed forward (prompt once)
gives both log-probs, and the reference is the base with the adapter off (or precomputed
once, `precompute_ref_logps`), exactly as DPO's (`algorithms.dpo`). As TRL, the KL
completions are the completions rotated by one within blocks of one micro-batch per
process (TRL's `per_device_train_batch_size`), and each micro-batch is one such block, so
z0 is estimated from the batch's own completions under other prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.algorithms.common import add_router_aux_loss, make_batch_step
from jaxrlhf.algorithms.dpo import make_ref_logps_step, policy_logps, reference_logps
from jaxrlhf.algorithms.orpo import check_policy_lora
from jaxrlhf.algorithms.spec import PreferenceAlgorithm
from jaxrlhf.config import PreferenceTraining, check_literal
from jaxrlhf.data.unpaired import kto_rows, with_kl_completions
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import KTO_LOSS_TYPES, kto_loss
from jaxrlhf.models.config import ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class KTOConfig(PreferenceTraining):
    """`jaxrlhf kto`: KTO on unpaired feedback (`prompt`, `completion`, `label`), or on
    paired rows unpaired; as TRL's KTOTrainer (beta 0.1, loss_type kto, both weights 1)."""

    lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(task_type="CAUSAL_LM", r=16, alpha=32)
    )
    beta: float = 0.1
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = 1.0
    """λ_D: weight of the desirable rows' losses (TRL suggests balancing
    λ_D·n_D / (λ_U·n_U) in [1, 4/3])."""
    undesirable_weight: float = 1.0
    precompute_ref_logps: bool = False
    """Compute the reference log-probs once over the data before training (TRL's
    `precompute_ref_log_probs`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_literal(self, "loss_type", KTO_LOSS_TYPES)
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.loss_type == "kto" and self.batch_size < 2 * self.optim.grad_accum_steps:
            raise ValueError(
                "loss_type: kto pairs each row's prompt with another row's completion of its "
                "micro-batch for its KL estimate: batch_size / optim.grad_accum_steps must be "
                f">= 2, got {self.batch_size} / {self.optim.grad_accum_steps} (or use "
                "loss_type: apo_zero_unpaired)"
            )
        check_policy_lora(self, "KTO")


def kto_objective(trainable, batch, frozen, rng, *, cfg: KTOConfig, model_cfg: ModelConfig):
    """KTO loss of one batch (+ a MoE policy's router aux term over the forward's tokens,
    completions and KL completions alike: `add_router_aux_loss`)."""
    ref, ref_kl = reference_logps(frozen, batch, model_cfg=model_cfg)
    lp, lp_kl, aux = policy_logps(
        trainable,
        frozen,
        batch,
        model_cfg=model_cfg,
        lora_cfg=cfg.lora,
        rng=rng,
        with_aux_loss=True,
    )
    loss, metrics = _loss(
        cfg, (lp, jax.lax.stop_gradient(lp_kl), ref, ref_kl), batch["margin"], batch["pair_mask"]
    )
    return add_router_aux_loss(loss, metrics, aux, model_cfg=model_cfg)


def _loss(cfg: KTOConfig, outputs, labels, pair_mask):
    lp, lp_kl, ref, ref_kl = outputs
    use_kl = cfg.loss_type == "kto"
    return kto_loss(
        lp,
        ref,
        lp_kl if use_kl else None,
        ref_kl if use_kl else None,
        jnp.asarray(labels) > 0.5,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        weights=pair_mask,
    )


def make_train_step(
    cfg: KTOConfig, *, model_cfg: ModelConfig, optimizer: optax.GradientTransformation
):
    def loss_fn(trainable, batch, frozen, rng):
        return kto_objective(trainable, batch, frozen, rng, cfg=cfg, model_cfg=model_cfg)

    return make_batch_step(loss_fn, optimizer)


def make_eval_step(cfg: KTOConfig, *, model_cfg: ModelConfig):
    """`eval(trainable, frozen, batch) -> (lp, lp_kl, ref, ref_kl, label)` [B] each."""

    def step(trainable, frozen, batch):
        ref, ref_kl = reference_logps(frozen, batch, model_cfg=model_cfg)
        lp, lp_kl = policy_logps(trainable, frozen, batch, model_cfg=model_cfg, lora_cfg=cfg.lora)
        return lp, lp_kl, ref, ref_kl, batch["margin"]

    return step


def eval_metrics(cfg: KTOConfig, outputs: tuple, pair_mask, margin=None) -> dict[str, float]:
    """TRL's KTO metrics over the whole eval set (z0 over all its KL pairs), plus
    `rewards/accuracies`: the share of rows whose implied reward β·h has the label's sign."""
    lp, lp_kl, ref, ref_kl, labels = (jnp.asarray(x) for x in outputs)
    w = jnp.asarray(pair_mask)
    _, metrics = _loss(cfg, (lp, lp_kl, ref, ref_kl), labels, w)
    out = {k: float(v) for k, v in metrics.items()}
    right = jnp.where(labels > 0.5, lp - ref > 0, lp - ref < 0).astype(jnp.float32)
    out["rewards/accuracies"] = float(jnp.sum(right * w) / jnp.maximum(jnp.sum(w), 1))
    return out


def kl_block(cfg: KTOConfig) -> int:
    """Rows per KL block: one process's micro-batch (TRL's `per_device_train_batch_size`;
    each process feeds a contiguous slice of every micro-batch)."""
    return max(1, cfg.batch_size // cfg.optim.grad_accum_steps // jax.process_count())


def kl_data(cfg: KTOConfig, data):
    """`PreferenceAlgorithm.prepare_data`: each row's KL completion (`with_kl_completions`)."""
    return with_kl_completions(data, block=kl_block(cfg), max_length=cfg.data.max_length)


ALGORITHM = PreferenceAlgorithm(
    name="kto",
    config=KTOConfig,
    task="CAUSAL_LM",
    heads=(),
    make_train_step=make_train_step,
    make_eval_step=make_eval_step,
    eval_metrics=eval_metrics,
    needs_reference=lambda cfg: True,
    make_reference_step=make_ref_logps_step,
    precompute_reference=lambda cfg: cfg.precompute_ref_logps,
    prepare_rows=lambda cfg, rows: kto_rows(rows),
    prepare_data=kl_data,
    block_batches=lambda cfg: cfg.loss_type == "kto",
    summary_keys=("loss", "kl", "rewards/margins", "rewards/accuracies"),
    bar_keys=("loss", "kl", "rewards/margins"),
)
