"""Odds Ratio Preference Optimization (Hong et al., 2024) as jit-compiled pure steps, as
TRL's ORPOTrainer: no reference model, an SFT term on the chosen rows plus an odds-ratio
term (`jaxrlhf.losses.orpo_loss`):

    p̄ = mean_t log π(y_t|x, y_<t)                    (length-averaged, per completion)
    log_odds = (p̄_c − p̄_r) − (log(1 − e^p̄_c) − log(1 − e^p̄_r))
    loss = nll_chosen − β · mean log σ(log_odds)

`nll_chosen` is the token-mean cross-entropy over the chosen rows' prompt *and* completion
tokens, as TRL computes it. With LoRA the policy is the base + adapter; nothing else runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxrlhf.algorithms.common import steps_from_outputs
from jaxrlhf.algorithms.pair_logps import chosen_nll_terms, pair_token_logps, sequence_pair_logps
from jaxrlhf.algorithms.spec import PreferenceAlgorithm
from jaxrlhf.config import PreferenceTraining
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import orpo_loss


@dataclasses.dataclass(frozen=True, kw_only=True)
class ORPOConfig(PreferenceTraining):
    """`jaxrlhf orpo`: odds-ratio preference optimisation with an SFT term, as TRL's
    ORPOTrainer (beta 0.1 = the paper's λ). Reference-free: `lora: null` trains every weight
    and keeps no frozen copy."""

    lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(task_type="CAUSAL_LM", r=16, alpha=32)
    )
    beta: float = 0.1
    """Weight of the odds-ratio term against the NLL (λ in the paper)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        check_policy_lora(self, "ORPO")


def check_policy_lora(cfg: Any, name: str) -> None:
    """A reference-free preference policy: a causal-LM adapter with no extra heads."""
    if cfg.lora is None:
        return
    if cfg.lora.task_type != "CAUSAL_LM":
        raise ValueError(
            f"lora.task_type must be CAUSAL_LM for {name} (the policy is read through the lm head)"
        )
    if cfg.lora.modules_to_save:
        raise ValueError(
            f"lora.modules_to_save={list(cfg.lora.modules_to_save)}: {name} uses no "
            f"score/value head; set it to []"
        )


def orpo_outputs(
    trainable, frozen, batch, *, cfg: ORPOConfig, model_cfg, rng=None, with_aux_loss=False
):
    """(p̄_c, p̄_r, nll sum, nll tokens) [B] under the policy (with `with_aux_loss`:
    (them, the MoE router's aux loss or None))."""
    tokens = pair_token_logps(
        trainable, frozen, batch, model_cfg=model_cfg, lora_cfg=cfg.lora, with_prompt=True, rng=rng
    )
    p_c, p_r = sequence_pair_logps(tokens, average=True)
    nll_sum, nll_count = chosen_nll_terms(tokens, with_prompt=True)
    outputs = p_c, p_r, nll_sum, nll_count
    return (outputs, tokens["aux_loss"]) if with_aux_loss else outputs


def _loss(cfg: ORPOConfig, outputs, pair_mask):
    p_c, p_r, nll_sum, nll_count = outputs
    nll = jnp.sum(nll_sum) / jnp.maximum(jnp.sum(nll_count), 1.0)
    return orpo_loss(p_c, p_r, nll, beta=cfg.beta, weights=pair_mask)


make_train_step, make_eval_step, eval_metrics = steps_from_outputs(orpo_outputs, _loss)


ALGORITHM = PreferenceAlgorithm(
    name="orpo",
    config=ORPOConfig,
    task="CAUSAL_LM",
    heads=(),
    make_train_step=make_train_step,
    make_eval_step=make_eval_step,
    eval_metrics=eval_metrics,
    needs_reference=lambda cfg: False,
    summary_keys=("loss", "nll_loss", "rewards/accuracies", "log_odds_ratio"),
    bar_keys=("loss", "rewards/accuracies", "log_odds_ratio"),
)
