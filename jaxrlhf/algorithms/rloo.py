"""RLOO with LoRA (REINFORCE Leave-One-Out; Kool et al., 2019; Ahmadian et al., 2024), as
TRL's RLOOTrainer (1.16), on the online driver.

    frozen base ─┬─ + policy adapter (merged for sampling, unmerged for training) → π_θ
                 └─ (no adapter)                                                  → π_ref  (β > 0)

Each prompt is sampled k = `num_generations` times. The KL to the reference is folded into
each completion's reward (first-order estimate, summed over the completion), and each
completion is compared with the mean reward of the *other* k − 1:

    r_i = clip(s_i) − β · Σ_t (log π_old(y_it) − log π_ref(y_it))
    A_i = r_i − (Σ_{j∈g} r_j − r_i)/(k − 1)                 (optionally whitened)
    ρ_i = exp(Σ_t log π(y_it) − log π_old(y_it))            (a sequence-level ratio)
    loss = mean_i −min(ρ_i·A_i, clip(ρ_i, 1 − ε, 1 + ε_high)·A_i)

(`jaxrlhf.advantages.rloo_rewards`, `rloo_advantages`, `jaxrlhf.losses.rloo_loss`). The
log-prob passes, the plan and the trainable layout are GRPO's (`algorithms.grpo`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.advantages import rloo_advantages, rloo_rewards
from jaxrlhf.algorithms.common import add_router_aux_loss, make_minibatch_update
from jaxrlhf.algorithms.grpo import (
    GroupRolloutTraining,
    init_trainable,
    micro_logprobs,
    plan,
    policy_logprobs,
    reference_logprobs,
    rollout_inputs,
)
from jaxrlhf.algorithms.spec import KLControlSettings, OnlineAlgorithm
from jaxrlhf.losses import masked_mean, rloo_loss
from jaxrlhf.models.config import ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOOConfig(GroupRolloutTraining):
    """`jaxrlhf rloo`: REINFORCE Leave-One-Out, as TRL's RLOOTrainer. Names and defaults
    follow TRL's RLOOConfig (num_generations 2, beta 0.05, epsilon 0.2)."""

    command: ClassVar[str] = "rloo"

    num_generations: int = 2
    """k: completions per prompt; each is baselined by the mean of the other k − 1."""
    beta: float = 0.05
    """KL coefficient; the KL (k1, summed over the completion) is subtracted from the reward.
    0 skips the reference pass."""
    normalize_advantages: bool = False
    """Whiten the advantages over the generation batch (mean 0, std 1)."""
    reward_clip_range: tuple[float, float] | None = None
    """Clip the rewards to (min, max) before the KL is subtracted; null: no clipping."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.reward_clip_range is not None and (
            len(self.reward_clip_range) != 2
            or self.reward_clip_range[0] > self.reward_clip_range[1]
        ):
            raise ValueError(
                f"reward_clip_range must be [min, max] with min <= max, got "
                f"{list(self.reward_clip_range)}"
            )


def make_prepare_fn(
    cfg: RLOOConfig, *, model_cfg: ModelConfig, prompt_len: int, adapters: Any = None
):
    """`prepare(trainable, frozen, rollout, scores, kl_coef) -> (batch, metrics)`: the
    KL-penalised rewards and their leave-one-out advantages [B], and `old_logprobs` [B, N]
    when the batch feeds several optimizer steps. β is fixed (`kl_coef` equals it)."""

    def prepare(trainable, frozen, rollout: dict, scores, kl_coef=None):
        ids, mask, resp, scores, finished, length = rollout_inputs(rollout, scores, cfg)
        old = ref = None
        if cfg.beta > 0 or cfg.use_old_logprobs:
            old, _ = policy_logprobs(
                trainable, frozen, ids, mask, prompt_len, model_cfg=model_cfg, cfg=cfg
            )
        if cfg.beta > 0:
            ref = reference_logprobs(frozen, ids, mask, prompt_len, model_cfg=model_cfg, cfg=cfg)
        rewards, kl_metrics = rloo_rewards(
            scores, old, ref, resp, beta=cfg.beta, reward_clip_range=cfg.reward_clip_range
        )
        advantages = rloo_advantages(
            rewards, cfg.num_generations, normalize_advantages=cfg.normalize_advantages
        )
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "response_mask": resp,
            "advantages": advantages,
        }
        if cfg.use_old_logprobs:
            batch["old_logprobs"] = old
        group_std = scores.reshape(-1, cfg.num_generations).std(axis=1, ddof=1)
        metrics = {
            # TRL logs the reward functions' weighted sum, before clipping and the KL.
            "reward": jnp.mean(scores),
            "reward_std": jnp.std(scores, ddof=1),
            "frac_reward_zero_std": jnp.mean((group_std <= 1e-8).astype(jnp.float32)),
            "kl": kl_metrics["kl"],
            "completions/mean_length": jnp.mean(length),
            "completions/clipped_ratio": 1.0 - jnp.mean(finished.astype(jnp.float32)),
        }
        return jax.lax.stop_gradient(batch), jax.lax.stop_gradient(metrics)

    return prepare


def make_update_fn(
    cfg: RLOOConfig,
    *,
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    prompt_len: int,
    adapters: Any = None,
):
    """`update(state, frozen, batch, indices) -> (state, metrics)`: one optimizer step of
    `rloo_loss` on the rows `indices`; the loss is a mean over sequences, so the
    micro-batches' mean is the minibatch's."""

    def loss_fn(trainable, micro, frozen):
        resp = micro["response_mask"]
        lp, entropy, aux = micro_logprobs(
            trainable, micro, frozen, cfg=cfg, model_cfg=model_cfg, prompt_len=prompt_len
        )
        loss, metrics = rloo_loss(
            lp,
            micro.get("old_logprobs"),
            micro["advantages"],
            resp,
            clip_eps=cfg.epsilon,
            clip_eps_high=cfg.epsilon_high,
        )
        if cfg.log_entropy:
            metrics = {**metrics, "entropy": jax.lax.stop_gradient(masked_mean(entropy, resp))}
        return add_router_aux_loss(loss, metrics, aux, model_cfg=model_cfg)

    return make_minibatch_update(loss_fn, optimizer, micro_batches=cfg.optim.grad_accum_steps)


ALGORITHM = OnlineAlgorithm(
    name="rloo",
    config=RLOOConfig,
    plan=plan,
    init_trainable=init_trainable,
    policy=lambda trainable: trainable,
    make_prepare=make_prepare_fn,
    make_update=make_update_fn,
    kl_control=lambda cfg: KLControlSettings(initial=cfg.beta),
    bar_keys=("reward", "kl"),
    drop_metrics=("rewards/total",),
)
