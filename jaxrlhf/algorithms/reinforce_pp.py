"""REINFORCE++ with LoRA (Hu, 2025), as OpenRLHF's `advantage_estimator` "reinforce" /
"reinforce_baseline", on the online driver. TRL has no REINFORCE++ trainer, so the options
take OpenRLHF's meanings with this library's names (`kl_coef` = `init_kl_coef`, `epsilon` =
`eps_clip`, `num_generations` = `n_samples_per_prompt`).

    frozen base ─┬─ + policy adapter (merged for sampling, unmerged for training) → π_θ
                 └─ (no adapter)                                                  → π_ref

No critic and no group-relative std: the score is placed on the last response token, a
per-token KL penalty is subtracted at every token, and the reward-to-go is normalised over
all the response tokens of the batch:

    ("reinforce_baseline": s_i ← s_i − mean of its prompt's group)
    r_it = s_i·[t = last] − β·kl_t(log π_old, log π_ref)
    G_it = Σ_{t' ≥ t} γ^{t'−t} r_it'
    A_it = (G_it − mean G) / std G                       (over the batch's masked tokens)
    loss = PPO's clipped surrogate on A_it, token-mean (`jaxrlhf.losses.ppo_policy_loss`)

(`jaxrlhf.advantages.reinforce_pp_advantages`). The log-prob passes, the plan and the
trainable layout are GRPO's (`algorithms.grpo`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.advantages import REINFORCE_ESTIMATORS, reinforce_pp_advantages
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
from jaxrlhf.config import check_literal
from jaxrlhf.losses import KL_ESTIMATORS, kl_estimate, masked_mean, ppo_policy_loss
from jaxrlhf.models.config import ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReinforcePPConfig(GroupRolloutTraining):
    """`jaxrlhf reinforce_pp`: REINFORCE++ (global advantage normalisation, token-level KL
    penalty, PPO clipping). Defaults are OpenRLHF's (init_kl_coef 0.01, kl_estimator k1,
    gamma 1, eps_clip 0.2, reward_clip_range (−10, 10), one sample per prompt)."""

    command: ClassVar[str] = "reinforce_pp"
    min_generations: ClassVar[int] = 1

    advantage_estimator: Literal["reinforce", "reinforce_baseline"] = "reinforce"
    """`reinforce_baseline` subtracts each prompt's group mean score first (needs
    num_generations >= 2)."""
    num_generations: int = 1
    """Completions per prompt (OpenRLHF's n_samples_per_prompt)."""
    kl_coef: float = 0.01
    """β of the per-token KL penalty in the reward; 0 skips the reference pass."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    gamma: float = 1.0
    """Discount of the reward-to-go (1 for `reinforce_baseline`)."""
    reward_clip_range: tuple[float, float] | None = (-10.0, 10.0)
    """Clip the (baselined) scores to (min, max); null: no clipping."""
    advantage_std_norm: bool = True
    """Divide by the batch std of the returns (false: OpenRLHF's --no_advantage_std_norm)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_literal(self, "advantage_estimator", REINFORCE_ESTIMATORS)
        check_literal(self, "kl_estimator", KL_ESTIMATORS)
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.advantage_estimator == "reinforce_baseline":
            if self.num_generations < 2:
                raise ValueError(
                    f"advantage_estimator: reinforce_baseline subtracts the mean score of a "
                    f"prompt's group: set num_generations >= 2 (got {self.num_generations})"
                )
            if self.gamma != 1.0:
                raise ValueError(
                    f"advantage_estimator: reinforce_baseline uses undiscounted returns: set "
                    f"gamma: 1.0 (got {self.gamma}) or advantage_estimator: reinforce"
                )
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.reward_clip_range is not None and (
            len(self.reward_clip_range) != 2
            or self.reward_clip_range[0] > self.reward_clip_range[1]
        ):
            raise ValueError(
                f"reward_clip_range must be [min, max] with min <= max, got "
                f"{list(self.reward_clip_range)}"
            )


def make_prepare_fn(
    cfg: ReinforcePPConfig, *, model_cfg: ModelConfig, prompt_len: int, adapters: Any = None
):
    """`prepare(trainable, frozen, rollout, scores, kl_coef) -> (batch, metrics)`: per-token
    advantages [B, N] and the rollout-time log-probs `old_logprobs` [B, N] (the KL penalty
    and the ratio's denominator)."""

    def prepare(trainable, frozen, rollout: dict, scores, kl_coef):
        ids, mask, resp, scores, finished, length = rollout_inputs(rollout, scores, cfg)
        old, _ = policy_logprobs(
            trainable, frozen, ids, mask, prompt_len, model_cfg=model_cfg, cfg=cfg
        )
        if cfg.kl_coef > 0:
            ref = reference_logprobs(frozen, ids, mask, prompt_len, model_cfg=model_cfg, cfg=cfg)
            kl = kl_estimate(old, ref, cfg.kl_estimator) * resp
        else:
            kl = jnp.zeros_like(old)
        advantages, returns = reinforce_pp_advantages(
            scores,
            kl,
            resp,
            kl_coef=kl_coef,
            estimator=cfg.advantage_estimator,
            group_size=cfg.num_generations,
            gamma=cfg.gamma,
            reward_clip_range=cfg.reward_clip_range,
            std_normalize=cfg.advantage_std_norm,
        )
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "response_mask": resp,
            "advantages": advantages,
            "old_logprobs": old,
        }
        metrics = {
            "reward": jnp.mean(scores),
            "reward_std": jnp.std(scores, ddof=1) if scores.shape[0] > 1 else jnp.zeros(()),
            # Per sequence (summed over the response), as PPO's objective/kl.
            "objective/kl": jnp.mean(jnp.sum(kl, axis=-1)),
            "kl": masked_mean(kl, resp),
            "return": masked_mean(returns, resp),
            "completions/mean_length": jnp.mean(length),
            "completions/clipped_ratio": 1.0 - jnp.mean(finished.astype(jnp.float32)),
        }
        return jax.lax.stop_gradient(batch), jax.lax.stop_gradient(metrics)

    return prepare


def make_update_fn(
    cfg: ReinforcePPConfig,
    *,
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    prompt_len: int,
    adapters: Any = None,
):
    """`update(state, frozen, batch, indices) -> (state, metrics)`: one optimizer step of the
    token-mean clipped surrogate on the rows `indices`. Token means over micro-batches are
    weighted by their tokens (scale = tokens × n / all tokens), so the minibatch's loss is
    the token mean of the whole minibatch."""
    micro_batches = cfg.optim.grad_accum_steps

    def loss_fn(trainable, micro, frozen):
        resp = micro["response_mask"]
        lp, entropy, aux = micro_logprobs(
            trainable, micro, frozen, cfg=cfg, model_cfg=model_cfg, prompt_len=prompt_len
        )
        loss, m = ppo_policy_loss(
            lp,
            micro["old_logprobs"],
            micro["advantages"],
            resp,
            clip_eps=cfg.epsilon,
            clip_eps_high=cfg.epsilon_high,
        )
        loss = loss * micro["loss_scale"]
        metrics = {**m, "loss": loss}
        if cfg.log_entropy:
            metrics["entropy"] = masked_mean(entropy, resp)
        return add_router_aux_loss(loss, jax.lax.stop_gradient(metrics), aux, model_cfg=model_cfg)

    def loss_scales(mb: dict) -> dict:
        tokens = jnp.sum(mb["response_mask"], axis=(1, 2)).astype(jnp.float32)
        return {**mb, "loss_scale": tokens * micro_batches / jnp.maximum(jnp.sum(tokens), 1.0)}

    return make_minibatch_update(
        loss_fn, optimizer, micro_batches=micro_batches, scale_micro_batches=loss_scales
    )


ALGORITHM = OnlineAlgorithm(
    name="reinforce_pp",
    config=ReinforcePPConfig,
    plan=plan,
    init_trainable=init_trainable,
    policy=lambda trainable: trainable,
    make_prepare=make_prepare_fn,
    make_update=make_update_fn,
    kl_control=lambda cfg: KLControlSettings(initial=cfg.kl_coef),
    bar_keys=("reward", "kl"),
    drop_metrics=("rewards/total",),
)
