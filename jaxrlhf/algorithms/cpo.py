"""Contrastive Preference Optimization (Xu et al., 2024) and SimPO (Meng et al., 2024) as
jit-compiled pure steps, as TRL's CPOTrainer (`jaxrlhf.losses.cpo_loss`): no reference.

    h = r_c − r_r,   r = log π(y|x) summed ("sigmoid", "hinge") or length-averaged
                     ("ipo", "simpo")
    sigmoid: −log σ(β·h)   simpo: −log σ(β·h − γ)   hinge: relu(1 − β·h)   ipo: (h − 1/2β)²
    loss = mean ℓ + cpo_alpha · nll_chosen              (SimPO: loss_type simpo, cpo_alpha 0)

`nll_chosen` is the token-mean cross-entropy over the chosen completions' tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from jaxrlhf.algorithms.common import steps_from_outputs
from jaxrlhf.algorithms.orpo import check_policy_lora
from jaxrlhf.algorithms.pair_logps import chosen_nll_terms, pair_token_logps, sequence_pair_logps
from jaxrlhf.algorithms.spec import PreferenceAlgorithm
from jaxrlhf.config import PreferenceTraining, check_literal
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import CPO_LOSS_TYPES, cpo_loss


@dataclasses.dataclass(frozen=True, kw_only=True)
class CPOConfig(PreferenceTraining):
    """`jaxrlhf cpo`: CPO, or SimPO with `loss_type: simpo, cpo_alpha: 0`, as TRL's
    CPOTrainer (beta 0.1, loss_type sigmoid, cpo_alpha 1.0, simpo_gamma 0.5). Reference-free."""

    lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(task_type="CAUSAL_LM", r=16, alpha=32)
    )
    beta: float = 0.1
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = "sigmoid"
    label_smoothing: float = 0.0
    """The assumed share of flipped labels, in [0, 0.5) (`sigmoid`/`simpo` only)."""
    cpo_alpha: float = 1.0
    """Weight of the NLL term on the chosen completions (0: pure SimPO)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin γ (`simpo` only)."""
    alpha: float = 0.0
    """AlphaPO's reward shape r = (1 − e^{−α·log π})/α; 0: r = log π."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_literal(self, "loss_type", CPO_LOSS_TYPES)
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.cpo_alpha < 0:
            raise ValueError(f"cpo_alpha must be >= 0, got {self.cpo_alpha}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError(
                f"label_smoothing applies to loss_type sigmoid or simpo only; got loss_type: "
                f"{self.loss_type}; set label_smoothing: 0"
            )
        check_policy_lora(self, "CPO")

    @property
    def average_logps(self) -> bool:
        return self.loss_type in ("ipo", "simpo")


def cpo_outputs(
    trainable, frozen, batch, *, cfg: CPOConfig, model_cfg, rng=None, with_aux_loss=False
):
    """(r_c, r_r, nll sum, nll tokens) [B] under the policy (with `with_aux_loss`:
    (them, the MoE router's aux loss or None))."""
    tokens = pair_token_logps(
        trainable, frozen, batch, model_cfg=model_cfg, lora_cfg=cfg.lora, rng=rng
    )
    p_c, p_r = sequence_pair_logps(tokens, average=cfg.average_logps)
    nll_sum, nll_count = chosen_nll_terms(tokens, with_prompt=False)
    outputs = p_c, p_r, nll_sum, nll_count
    return (outputs, tokens["aux_loss"]) if with_aux_loss else outputs


def _loss(cfg: CPOConfig, outputs, pair_mask):
    p_c, p_r, nll_sum, nll_count = outputs
    nll = jnp.sum(nll_sum) / jnp.maximum(jnp.sum(nll_count), 1.0)
    return cpo_loss(
        p_c,
        p_r,
        nll,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        cpo_alpha=cfg.cpo_alpha,
        simpo_gamma=cfg.simpo_gamma,
        alpha=cfg.alpha,
        weights=pair_mask,
    )


make_train_step, make_eval_step, eval_metrics = steps_from_outputs(cpo_outputs, _loss)


ALGORITHM = PreferenceAlgorithm(
    name="cpo",
    config=CPOConfig,
    task="CAUSAL_LM",
    heads=(),
    make_train_step=make_train_step,
    make_eval_step=make_eval_step,
    eval_metrics=eval_metrics,
    needs_reference=lambda cfg: False,
    summary_keys=("loss", "nll_loss", "rewards/accuracies", "rewards/margins"),
    bar_keys=("loss", "rewards/accuracies", "rewards/margins"),
)
