"""RLHF losses as small pure functions of arrays.

Every loss takes arrays plus keyword-only hyperparameters and returns `(loss, metrics)`:
`loss` is a scalar to differentiate, `metrics` a flat dict of scalar arrays whose names
follow TRL (`rewards/chosen`, `clipfrac`, `clip_ratio`, ...) so logs read the same.

Shapes: `B` sequences (or preference pairs), `T` response tokens. Token-level inputs are
log-probabilities of the *sampled* token, `[B, T]`, with a `mask` `[B, T]` (bool or 0/1)
marking real response tokens; nothing at a masked position reaches a loss or a metric.

Masked means divide by the mask sum; an all-masked reduction gives 0, not NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]

KL_ESTIMATORS = ("k1", "k2", "k3")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# TRL warns that these sum per-token terms, so a sequence-level ratio weights each sequence by its
# length instead of optimising GSPO's per-sequence objective; here that combination is refused.
GRPO_TOKEN_SUM_LOSS_TYPES = ("bnpo", "dr_grpo", "dapo", "cispo")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
# Names used in papers and some libraries, mapped onto TRL's.
GRPO_LOSS_ALIASES = {"sequence-mean": "grpo", "token-mean": "bnpo"}


# --------------------------------------------------------------------------- helpers


def check_choice(what: str, value: str, choices: Sequence[str]) -> str:
    """Returns `value` if it is one of `choices`, else raises a ValueError naming them.

    >>> check_choice("kl estimator", "k4", KL_ESTIMATORS)
    Traceback (most recent call last):
    ValueError: kl estimator 'k4' is not supported; choose from 'k1', 'k2', 'k3'
    """
    if value not in choices:
        names = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{what} {value!r} is not supported; choose from {names}")
    return value


def _float(x: jax.Array) -> jax.Array:
    """At least float32, so sums over many bf16 tokens stay exact enough."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """`Σ x·m` over `axis`. Masked entries are dropped even if `x` is NaN/inf there."""
    x = _float(x)
    m = jnp.broadcast_to(jnp.asarray(mask), x.shape).astype(x.dtype)
    return jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """`Σ x·m / Σ m` over `axis`; 0 where `Σ m = 0` (an empty row gives no NaN)."""
    x = _float(x)
    total = masked_sum(x, mask, axis)
    count = masked_sum(jnp.ones_like(x), mask, axis)
    return total / jnp.where(count > 0, count, 1.0)


def _masked_std(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population standard deviation `sqrt(mean((x − mean x)²))` over masked entries."""
    mean = masked_mean(x, mask)
    return jnp.sqrt(masked_mean(jnp.square(_float(x) - mean), mask))


def _ones_like_pairs(x: jax.Array, weights: jax.Array | None) -> jax.Array:
    return jnp.ones(jnp.shape(x), jnp.float32) if weights is None else jnp.asarray(weights)


# --------------------------------------------------------------------------- reward model


def bradley_terry_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    center_rewards_coefficient: float | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Pairwise Bradley-Terry loss of a reward model, as TRL's RewardTrainer.

        loss = mean_i[ −log σ(r_c,i − r_r,i − margin_i) ]
               + coef · mean_i[ (r_c,i + r_r,i)² ]        (only if coef is not None)

    The second term (Eisenstein et al., 2023) pulls rewards towards zero mean.

    Args:
      chosen_rewards, rejected_rewards: `[B]` scalar rewards of each pair.
      margin: optional `[B]` (or scalar) required preference margin.
      center_rewards_coefficient: weight of the centering term; None disables it.
      weights: optional `[B]` pair mask (0 drops a padding pair from loss and metrics).

    Metrics: `loss`, `accuracy` (share of pairs with r_c > r_r), `rewards/chosen_mean`,
    `rewards/rejected_mean`, `rewards/chosen_std`, `rewards/rejected_std` (population std,
    ddof=0), `rewards/margin` (mean of r_c − r_r).
    """
    r_c, r_r = _float(chosen_rewards), _float(rejected_rewards)
    w = _ones_like_pairs(r_c, weights)
    diff = r_c - r_r
    logits = diff if margin is None else diff - margin
    loss = masked_mean(-jax.nn.log_sigmoid(logits), w)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * masked_mean(jnp.square(r_c + r_r), w)
    metrics = {
        "loss": loss,
        "accuracy": masked_mean((r_c > r_r).astype(jnp.float32), w),
        "rewards/chosen_mean": masked_mean(r_c, w),
        "rewards/rejected_mean": masked_mean(r_r, w),
        "rewards/chosen_std": _masked_std(r_c, w),
        "rewards/rejected_std": _masked_std(r_r, w),
        "rewards/margin": masked_mean(diff, w),
    }
    return loss, jax.lax.stop_gradient(metrics)


# --------------------------------------------------------------------------- KL


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π (Schulman, 2020).

    With `log r = log π_ref(y) − log π(y)` at the sampled token `y ~ π`:

        k1 = −log r              = log π − log π_ref      unbiased, high variance, can be < 0
        k2 = ½ (log r)²                                    biased, low variance, ≥ 0
        k3 = (r − 1) − log r     = exp(ref − lp) − (ref − lp) − 1   unbiased, ≥ 0

    The names match TRL's `kl_estimator` option ("k1", "k3"); "k2" is added.
    Returns an array of the inputs' shape; reduce it with `masked_mean`.
    """
    check_choice("kl estimator", kind, KL_ESTIMATORS)
    log_r = _float(ref_logprobs) - _float(logprobs)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * jnp.square(log_r)
    return jnp.expm1(log_r) - log_r


# --------------------------------------------------------------------------- PPO


def ppo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """PPO clipped surrogate (Schulman et al., 2017), token-mean over the mask, as TRL.

        ρ_t   = exp(log π(y_t) − log π_old(y_t))
        loss  = mean_t∈mask[ max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε_high)) ]

    `ε_high` defaults to `ε`; a larger one is DAPO's "clip-higher".

    Args:
      logprobs: `[B, T]` log π of the sampled tokens (differentiated).
      old_logprobs: `[B, T]` log π at rollout time (treated as constant).
      advantages: `[B, T]` per-token advantages (constant).
      mask: `[B, T]` response mask.

    Metrics: `policy_loss`; `clipfrac`, the share of tokens where the clipped term is the
    larger loss (TRL's `(pg_losses2 > pg_losses)`); `approx_kl` = ½·mean((lp − old)²);
    `ratio_mean` = mean ρ.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    old = jax.lax.stop_gradient(_float(old_logprobs))
    adv = jax.lax.stop_gradient(_float(advantages))
    log_ratio = _float(logprobs) - old
    ratio = jnp.exp(log_ratio)
    pg_losses = -adv * ratio
    pg_losses_clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    loss = masked_mean(jnp.maximum(pg_losses, pg_losses_clipped), mask)
    metrics = {
        "policy_loss": loss,
        "clipfrac": masked_mean((pg_losses_clipped > pg_losses).astype(jnp.float32), mask),
        "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    return loss, jax.lax.stop_gradient(metrics)


def ppo_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_range: float = 0.2,
) -> tuple[jax.Array, Metrics]:
    """Clipped value loss, as TRL's PPO (`cliprange_value`).

        v_clip = clip(v, v_old − c, v_old + c)
        loss   = ½ · mean_t∈mask[ max((v − R)², (v_clip − R)²) ]

    Args:
      values: `[B, T]` critic predictions (differentiated).
      old_values: `[B, T]` predictions at rollout time (constant).
      returns: `[B, T]` GAE returns `A + V_old` (constant).
      mask: `[B, T]` response mask.

    Metrics: `value_loss`; `value_clipfrac`, share of tokens where the clipped error is larger.
    """
    v = _float(values)
    v_old = jax.lax.stop_gradient(_float(old_values))
    ret = jax.lax.stop_gradient(_float(returns))
    v_clipped = jnp.clip(v, v_old - clip_range, v_old + clip_range)
    err = jnp.square(v - ret)
    err_clipped = jnp.square(v_clipped - ret)
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    metrics = {
        "value_loss": loss,
        "value_clipfrac": masked_mean((err_clipped > err).astype(jnp.float32), mask),
    }
    return loss, jax.lax.stop_gradient(metrics)


# --------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Direct Preference Optimization losses, as TRL's DPOTrainer.

    With sequence log-probabilities (summed over response tokens):

        h = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))

        sigmoid (Rafailov et al., 2023; cDPO label smoothing ls):
            −(1 − ls)·log σ(β·h) − ls·log σ(−β·h)
        ipo (Azar et al., 2023):  (h − 1/(2β))²
        hinge (SLiC, Zhao et al., 2023):  relu(1 − β·h)

    loss = mean over pairs. For "ipo", TRL feeds length-*averaged* log-probabilities;
    pass those yourself if you want that behaviour.

    Args:
      policy_chosen_logps, policy_rejected_logps: `[B]` (differentiated).
      ref_chosen_logps, ref_rejected_logps: `[B]` from the reference (constant).
      beta: temperature β > 0.
      loss_type: "sigmoid", "ipo" or "hinge".
      label_smoothing: ls ∈ [0, 0.5), the assumed share of flipped labels ("sigmoid" only).
      weights: optional `[B]` pair mask.

    Metrics: `loss`; `rewards/chosen` = mean β·(log π(y_c) − log π_ref(y_c)),
    `rewards/rejected` likewise; `rewards/accuracies` (share with chosen reward >
    rejected reward); `rewards/margins` (mean chosen − rejected reward); `logps/chosen`,
    `logps/rejected` (mean policy log-probabilities).
    """
    check_choice("dpo loss_type", loss_type, DPO_LOSS_TYPES)
    if isinstance(beta, int | float) and beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    pi_c, pi_r = _float(policy_chosen_logps), _float(policy_rejected_logps)
    ref_c = jax.lax.stop_gradient(_float(ref_chosen_logps))
    ref_r = jax.lax.stop_gradient(_float(ref_rejected_logps))
    w = _ones_like_pairs(pi_c, weights)

    logits = (pi_c - pi_r) - (ref_c - ref_r)
    if loss_type == "sigmoid":
        losses = (
            -jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "ipo":
        losses = jnp.square(logits - 1.0 / (2.0 * beta))
    else:  # hinge
        losses = jax.nn.relu(1.0 - beta * logits)
    loss = masked_mean(losses, w)

    chosen_rewards = beta * jax.lax.stop_gradient(pi_c - ref_c)
    rejected_rewards = beta * jax.lax.stop_gradient(pi_r - ref_r)
    metrics = {
        "loss": loss,
        "rewards/chosen": masked_mean(chosen_rewards, w),
        "rewards/rejected": masked_mean(rejected_rewards, w),
        "rewards/accuracies": masked_mean(
            (chosen_rewards > rejected_rewards).astype(jnp.float32), w
        ),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, w),
        "logps/chosen": masked_mean(pi_c, w),
        "logps/rejected": masked_mean(pi_r, w),
    }
    return loss, jax.lax.stop_gradient(metrics)


# --------------------------------------------------------------------------- GRPO


def grpo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array | None,
    ref_logprobs: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = False,
) -> tuple[jax.Array, Metrics]:
    """GRPO clipped objective with an optional k3 KL penalty, as TRL's GRPOTrainer (1.16).

    Per token, with one advantage A_i per sequence (group-relative, see
    `jaxrlhf.advantages.group_advantages`) and log-ratio d_it = log π(y_it) − log π_old(y_it):

        importance weight (TRL's `importance_sampling_level`):
            "token":    w_it = exp(d_it)
            "sequence": w_i  = exp( Σ_t d_it m_it / max(Σ_t m_it, 1) )     (GSPO)
        k3_it = exp(ref − lp) − (ref − lp) − 1      (times w if use_bias_correction_kl)

        loss_type "grpo" | "bnpo" | "dr_grpo" | "dapo" (clipped surrogate):
            ℓ_it = −min(w̃·A_i, clip(w, 1 − ε, 1 + ε_high)·A_i) + β·k3_it,
            w̃ = min(w, δ) if `delta` is set (INTELLECT-2 two-sided clipping), else w
        loss_type "cispo" (MiniMax-M1): the weight is clipped and detached, the log-prob
            carries the gradient; `clip_eps_high` is the absolute cap ε_max on w (left at
            None it is ε = 0.2, as in TRL, which scales every gradient by 0.2: set it,
            ScaleRL uses 5.0):
            ℓ_it = −sg(min(w, ε_high))·A_i·log π(y_it) + β·k3_it
        loss_type "sapo" (soft gate): with τ = τ_pos if A_i > 0 else τ_neg,
            ℓ_it = −σ(τ·(w − 1))·(4/τ)·A_i + β·k3_it

    The sequence-level weight is differentiated as it stands, as TRL 1.16 does (no
    stop-gradient rewrite): ∇w_i = w_i · mean_t ∇log π(y_it), GSPO's sequence gradient.

    Aggregation over the mask m (TRL's `loss_type`; B = batch size, |o_i| = Σ_t m_it):

        "grpo", "sapo" (alias "sequence-mean"): (1/B) Σ_i (1/max(|o_i|, 1)) Σ_t ℓ_it m_it
        "bnpo"    (alias "token-mean"):    Σ_it ℓ_it m_it / Σ_it m_it
        "dr_grpo" (Dr. GRPO):               Σ_it ℓ_it m_it / (B · max_completion_length)
        "dapo", "cispo":                    Σ_it ℓ_it m_it / Σ_it m_it

    "dapo"/"cispo" normalise by the number of tokens in the *global* batch. Here the sum is
    over the arrays given, so under one `jit` over a sharded batch it equals "bnpo"; TRL
    differs from "bnpo" only when each process averages its own shard, or under
    gradient accumulation (then pass the whole accumulated batch's token count yourself
    by scaling the loss).

    Defaults that differ from TRL's GRPOConfig (kept so existing runs are unchanged):
    `loss_type` "grpo" (TRL: "dapo"), `use_bias_correction_kl` False (TRL: True).
    `importance_sampling_level="sequence"` is refused with a token-sum aggregation
    ("bnpo", "dr_grpo", "dapo", "cispo"), where TRL only warns that it weights sequences by
    length instead of optimising GSPO's per-sequence objective.

    Args:
      logprobs: `[B, T]` log π (differentiated).
      old_logprobs: `[B, T]` log π_old, constant; None means one update per rollout
        (π_old = π, so ρ = 1 with the gradient of ρ = ∇ log π).
      ref_logprobs: `[B, T]` log π_ref, or None when β = 0.
      advantages: `[B]` per sequence (a `[B, T]` per-token array is accepted too).
      mask: `[B, T]` completion mask.
      clip_eps, clip_eps_high: TRL's `epsilon` (0.2) and `epsilon_high` (None → ε).
      beta: KL coefficient β; 0 (TRL's default) skips the reference entirely.
      max_completion_length: required for "dr_grpo".
      importance_sampling_level: "token" (default) or "sequence" (GSPO).
      delta: TRL's `delta`, upper cap on the unclipped weight (None disables it).
      sapo_temperature_pos, sapo_temperature_neg: TRL's SAPO temperatures (1.0, 1.05).
      use_bias_correction_kl: multiply k3 by the (differentiable) weight w, TRL's option.

    Metrics: `loss`; `kl` (masked mean of the KL term, 0 when β = 0); `clip_ratio` (=
    `clip_ratio/region_mean`), `clip_ratio/low_mean` (w < 1 − ε and A < 0),
    `clip_ratio/high_mean` (w > 1 + ε_high and A > 0) as TRL logs them; for "cispo" also
    `cispo_clip_ratio` (w > ε_high and A > 0); `ratio_mean` = mean w. Token-level means are
    over the mask; sequence-level ones over the B rows, as TRL.
    """
    loss_type = GRPO_LOSS_ALIASES.get(loss_type, loss_type)
    check_choice("grpo loss_type", loss_type, GRPO_LOSS_TYPES + tuple(GRPO_LOSS_ALIASES))
    check_choice(
        "grpo importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS
    )
    sequence_level = importance_sampling_level == "sequence"
    if sequence_level and loss_type in GRPO_TOKEN_SUM_LOSS_TYPES:
        raise ValueError(
            f"grpo importance_sampling_level='sequence' with loss_type={loss_type!r} sums "
            "per-token terms and weights each sequence by its length instead of optimising the "
            "per-sequence (GSPO) objective; use loss_type='grpo' (or 'sapo') with it, or "
            "importance_sampling_level='token'"
        )
    if delta is not None and loss_type in ("cispo", "sapo"):
        raise ValueError(
            f"grpo delta={delta} caps the unclipped ratio of the clipped losses; loss_type="
            f"{loss_type!r} has no such term: set delta=None"
        )
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError(
            "grpo loss_type 'dr_grpo' normalises by batch_size * max_completion_length; "
            "pass max_completion_length=..."
        )
    use_kl = not (isinstance(beta, int | float) and beta == 0)
    if use_kl and ref_logprobs is None:
        raise ValueError(f"grpo beta={beta} needs ref_logprobs; pass them or set beta=0.0")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high

    lp = _float(logprobs)
    old = jax.lax.stop_gradient(lp if old_logprobs is None else _float(old_logprobs))
    adv = jax.lax.stop_gradient(_float(advantages))
    if adv.ndim == lp.ndim - 1:
        adv = adv[..., None]
    mask = jnp.asarray(mask)

    log_ratio = lp - old
    if sequence_level:
        # Masked tokens are dropped even where the log-ratio is not finite.
        log_weight = masked_mean(log_ratio, mask, axis=-1)[..., None]  # [B, 1]
    else:
        log_weight = log_ratio
    ratio = jnp.exp(log_weight)

    if loss_type == "cispo":
        capped = jax.lax.stop_gradient(jnp.minimum(ratio, eps_high))
        per_token = -capped * adv * lp
    elif loss_type == "sapo":
        temperature = jnp.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -jax.nn.sigmoid(temperature * (ratio - 1.0)) * 4.0 / temperature * adv
    else:
        clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
        unclipped = (ratio if delta is None else jnp.minimum(ratio, delta)) * adv
        per_token = -jnp.minimum(unclipped, clipped)
    per_token = jnp.broadcast_to(per_token, mask.shape)
    if use_kl:
        kl = kl_estimate(lp, jax.lax.stop_gradient(_float(ref_logprobs)), "k3")
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        kl_mean = masked_mean(kl, mask)
    else:
        kl_mean = jnp.zeros((), jnp.float32)

    if loss_type in ("grpo", "sapo"):
        loss = jnp.mean(masked_mean(per_token, mask, axis=-1))
    elif loss_type in ("bnpo", "dapo", "cispo"):
        loss = masked_mean(per_token, mask)
    else:  # dr_grpo
        loss = masked_sum(per_token, mask) / (lp.shape[0] * max_completion_length)

    # TRL averages token-level flags over the mask, one-per-sequence flags over the rows.
    def flag_mean(flags: jax.Array) -> jax.Array:
        flags = flags.astype(jnp.float32)
        per_row = sequence_level and flags.shape[-1] == 1
        return jnp.mean(flags) if per_row else masked_mean(flags, mask)

    # TRL reads its clip flags off the weight after the `delta` cap.
    capped_ratio = ratio if delta is None else jnp.minimum(ratio, delta)
    low_clipped = (capped_ratio < 1.0 - clip_eps) & (adv < 0)
    high_clipped = (capped_ratio > 1.0 + eps_high) & (adv > 0)
    region_clipped = flag_mean(low_clipped | high_clipped)
    metrics = {
        "loss": loss,
        "kl": kl_mean,
        "clip_ratio": region_clipped,
        "clip_ratio/low_mean": flag_mean(low_clipped),
        "clip_ratio/high_mean": flag_mean(high_clipped),
        "clip_ratio/region_mean": region_clipped,
        "ratio_mean": flag_mean(ratio),
    }
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = flag_mean((ratio > eps_high) & (adv > 0))
    return loss, jax.lax.stop_gradient(metrics)


# --------------------------------------------------------------------------- RLOO


def rloo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """RLOO's clipped objective at the sequence level, as TRL's RLOOTrainer (1.16).

    The ratio is of whole sequences (log-probs *summed* over the completion), and the
    KL to the reference is not a loss term: it is already folded into the reward (see
    `jaxrlhf.advantages.rloo_rewards`):

        ρ_i  = exp( Σ_t (log π(y_it) − log π_old(y_it))·m_it )
        loss = (1/B) Σ_i −min(ρ_i·A_i, clip(ρ_i, 1 − ε, 1 + ε_high)·A_i)

    Args:
      logprobs: `[B, T]` log π (differentiated).
      old_logprobs: `[B, T]` log π at rollout time (constant); None for one update per
        rollout (ρ = 1 with ∇ρ = Σ_t ∇ log π).
      advantages: `[B]` leave-one-out advantages (`jaxrlhf.advantages.rloo_advantages`).
      mask: `[B, T]` completion mask.
      clip_eps, clip_eps_high: TRL's `epsilon` (0.2) and `epsilon_high` (None → ε).

    Metrics (TRL's names, shares of sequences): `loss`, `clip_ratio/low_mean` (ρ < 1 − ε and
    A < 0), `clip_ratio/high_mean` (ρ > 1 + ε_high and A > 0), `clip_ratio/region_mean`
    (either), `clip_ratio/low_min`, `clip_ratio/high_max` (min/max of the per-sequence flags),
    `ratio_mean`.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    lp = _float(logprobs)
    old = jax.lax.stop_gradient(lp if old_logprobs is None else _float(old_logprobs))
    adv = jax.lax.stop_gradient(_float(advantages))
    log_ratio = masked_sum(lp, mask, axis=-1) - masked_sum(old, mask, axis=-1)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
    loss = jnp.mean(-jnp.minimum(ratio * adv, clipped))
    low = ((ratio < 1.0 - clip_eps) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "clip_ratio/low_mean": jnp.mean(low),
        "clip_ratio/low_min": jnp.min(low),
        "clip_ratio/high_mean": jnp.mean(high),
        "clip_ratio/high_max": jnp.max(high),
        "clip_ratio/region_mean": jnp.mean(jnp.maximum(low, high)),
        "ratio_mean": jnp.mean(ratio),
    }
    return loss, jax.lax.stop_gradient(metrics)


# --------------------------------------------------------------------------- sequence log-probs


def sequence_logps(token_logps: jax.Array, mask: jax.Array, *, average: bool = False) -> jax.Array:
    """`[B, T]` token log-probs → `[B]` sequence log-probs, TRL's `get_batch_logps`.

    sum:     Σ_t lp_t m_t                 (DPO, KTO, CPO "sigmoid"/"hinge")
    average: Σ_t lp_t m_t / Σ_t m_t       (ORPO, SimPO, CPO "ipo"; 0 for an empty row)
    """
    if average:
        return masked_mean(token_logps, mask, axis=-1)
    return masked_sum(token_logps, mask, axis=-1)


def nll_loss(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
    """Token-mean negative log-likelihood over all masked tokens of the batch.

        nll = −Σ_bt lp_bt m_bt / Σ_bt m_bt

    That is torch's `CrossEntropyLoss` (mean over non-ignored labels) as ORPO and CPO apply
    it to the chosen rows. ORPO's mask covers prompt *and* completion; CPO's only the
    completion (TRL builds them so).
    """
    return -masked_mean(token_logps, mask)


def _pair_reward_metrics(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    w: jax.Array,
) -> Metrics:
    return {
        "rewards/chosen": masked_mean(chosen_rewards, w),
        "rewards/rejected": masked_mean(rejected_rewards, w),
        "rewards/accuracies": masked_mean(
            (chosen_rewards > rejected_rewards).astype(jnp.float32), w
        ),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, w),
        "logps/chosen": masked_mean(chosen_logps, w),
        "logps/rejected": masked_mean(rejected_logps, w),
    }


# --------------------------------------------------------------------------- ORPO


def log1mexp(x: jax.Array) -> jax.Array:
    """`log(1 − eˣ)` for x < 0, stable on both sides of −log 2 (Mächler, 2012), as TRL."""
    x = _float(x)
    # Each branch is evaluated at a safe argument so neither produces NaN gradients.
    near_zero = x >= -0.6931471805599453
    x_near = jnp.where(near_zero, x, -1.0)
    x_far = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def orpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_nll_loss: jax.Array,
    *,
    beta: float = 0.1,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Odds Ratio Preference Optimization (Hong et al., 2024), as TRL's ORPOTrainer.

    With *length-averaged* log-probs p̄ = mean_t log π(y_t) (`sequence_logps(...,
    average=True)`) and odds(y) = P/(1 − P), P = exp(p̄):

        log_odds = (p̄_c − p̄_r) − (log(1 − e^p̄_c) − log(1 − e^p̄_r))
        loss     = nll_chosen − β · mean_i log σ(log_odds_i)

    `chosen_nll_loss` is the SFT term: TRL's token-mean cross-entropy over the chosen rows'
    prompt *and* completion tokens (`nll_loss(token_logps, prompt_and_completion_mask)`).
    No reference model. TRL's default β = 0.1 (ORPOConfig `beta`, λ in the paper).
    `weights` (pair mask) drops padding pairs from the odds-ratio term and the metrics; the
    NLL's own mask must leave them out too.

    Metrics (TRL's names): `loss`, `nll_loss`, `log_odds_ratio` = mean log σ(log_odds),
    `log_odds_chosen` = mean log_odds, `rewards/chosen` = mean β·p̄_c, `rewards/rejected`,
    `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`.
    """
    p_c, p_r = _float(policy_chosen_logps), _float(policy_rejected_logps)
    w = _ones_like_pairs(p_c, weights)
    log_odds = (p_c - p_r) - (log1mexp(p_c) - log1mexp(p_r))
    log_sigmoid_odds = jax.nn.log_sigmoid(log_odds)
    nll = _float(chosen_nll_loss)
    loss = nll - beta * masked_mean(log_sigmoid_odds, w)
    chosen_rewards = beta * jax.lax.stop_gradient(p_c)
    rejected_rewards = beta * jax.lax.stop_gradient(p_r)
    metrics = {
        "loss": loss,
        "nll_loss": nll,
        "log_odds_ratio": masked_mean(log_sigmoid_odds, w),
        "log_odds_chosen": masked_mean(log_odds, w),
        **_pair_reward_metrics(chosen_rewards, rejected_rewards, p_c, p_r, w),
    }
    return loss, jax.lax.stop_gradient(metrics)


# --------------------------------------------------------------------------- CPO / SimPO


def cpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_nll_loss: jax.Array | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Contrastive Preference Optimization (Xu et al., 2024) and SimPO, as TRL's CPOTrainer.

    Reference-free. With policy sequence log-probs p_c, p_r (summed for "sigmoid"/"hinge",
    length-averaged for "ipo"/"simpo", as TRL's `get_batch_logps` is called) and rewards
    r = p, or r = (1 − e^{−α·p})/α with AlphaPO's `alpha` ≠ 0, h = r_c − r_r:

        sigmoid: −(1 − ls)·log σ(β·h) − ls·log σ(−β·h)            (CPO eq. 3)
        simpo:   the same with h − γ/β in place of h               (SimPO, γ = simpo_gamma)
        hinge:   relu(1 − β·h)
        ipo:     (h − 1/(2β))²

        loss = mean_i ℓ_i + cpo_alpha · nll_chosen

    `chosen_nll_loss` is TRL's token-mean cross-entropy over the chosen *completion* tokens
    (`nll_loss`); it may be None when `cpo_alpha` = 0 (TRL then uses 0). SimPO is
    `loss_type="simpo", cpo_alpha=0` (see `simpo_loss`). TRL's defaults: β = 0.1,
    loss_type "sigmoid", label_smoothing 0, cpo_alpha 1.0, simpo_gamma 0.5, alpha 0.

    Metrics (TRL's names): `loss`, `nll_loss`, `rewards/chosen` = mean β·r_c,
    `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`,
    `logps/rejected`.
    """
    check_choice("cpo loss_type", loss_type, CPO_LOSS_TYPES)
    if isinstance(beta, int | float) and beta <= 0:
        raise ValueError(f"cpo beta must be > 0, got {beta}")
    if chosen_nll_loss is None and cpo_alpha != 0:
        raise ValueError(
            f"cpo cpo_alpha={cpo_alpha} weights an NLL term: pass chosen_nll_loss or set cpo_alpha=0"
        )
    p_c, p_r = _float(policy_chosen_logps), _float(policy_rejected_logps)
    w = _ones_like_pairs(p_c, weights)
    if alpha != 0.0:
        r_c = (1.0 - jnp.exp(-alpha * p_c)) / alpha  # (1 − P^−α)/α with P = e^p
        r_r = (1.0 - jnp.exp(-alpha * p_r)) / alpha
    else:
        r_c, r_r = p_c, p_r
    logits = r_c - r_r
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            logits = logits - simpo_gamma / beta
        losses = (
            -jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * logits)
    else:  # ipo
        losses = jnp.square(logits - 1.0 / (2.0 * beta))
    nll = jnp.zeros((), jnp.float32) if chosen_nll_loss is None else _float(chosen_nll_loss)
    loss = masked_mean(losses, w) + cpo_alpha * nll
    chosen_rewards = beta * jax.lax.stop_gradient(r_c)
    rejected_rewards = beta * jax.lax.stop_gradient(r_r)
    metrics = {
        "loss": loss,
        "nll_loss": nll,
        **_pair_reward_metrics(chosen_rewards, rejected_rewards, p_c, p_r, w),
    }
    return loss, jax.lax.stop_gradient(metrics)


def simpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """SimPO (Meng et al., 2024): TRL's `CPOTrainer(loss_type="simpo", cpo_alpha=0)`.

        loss = mean_i −log σ(β·(p̄_c − p̄_r) − γ)        (label_smoothing 0)

    with length-averaged log-probs p̄ (`sequence_logps(..., average=True)`). β defaults to
    TRL's CPOConfig 0.1; the SimPO paper uses β ≈ 2–2.5 and γ/β ≈ 0.5. (CPO-SimPO is
    `cpo_loss(loss_type="simpo", cpo_alpha=...)`.) Metrics as `cpo_loss`.
    """
    return cpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        None,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        cpo_alpha=0.0,
        simpo_gamma=simpo_gamma,
        weights=weights,
    )


# --------------------------------------------------------------------------- KTO


def unpair(
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    batch_size: int = 1000,
) -> list[dict]:
    """Preference pairs → unpaired KTO rows `{"prompt", "completion", "label"}`.

    The same order as TRL's `unpair_preference_dataset` (a batched `datasets.map`, whose
    default batch is 1000 rows): within each block of `batch_size` pairs, first every
    chosen completion (label True), then every rejected one (label False).
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(
            f"unpair needs as many prompts as chosen and rejected completions, got "
            f"{len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    if batch_size < 1:
        raise ValueError(f"unpair batch_size must be >= 1, got {batch_size}")
    rows = []
    for start in range(0, len(prompts), batch_size):
        block = range(start, min(start + batch_size, len(prompts)))
        rows += [{"prompt": prompts[i], "completion": chosen[i], "label": True} for i in block]
        rows += [{"prompt": prompts[i], "completion": rejected[i], "label": False} for i in block]
    return rows


def kto_kl_pair_indices(num_rows: int, batch_size: int) -> np.ndarray:
    """Which row's completion is paired with row i's prompt for KTO's KL estimate.

    TRL's KTOTrainer rotates the completions by one within each consecutive block of
    `batch_size` rows (`per_device_train_batch_size`; the last block may be shorter):
    (x_1, y_n), (x_2, y_1), …, (x_n, y_{n−1}). So for row i in a block starting at s of
    length n, the KL completion is that of row s + (i − s − 1) mod n. A one-row block
    pairs a row with itself.

    Returns an int array `[num_rows]` to gather completions with.
    """
    if batch_size < 1:
        raise ValueError(f"kto batch_size must be >= 1, got {batch_size}")
    i = np.arange(num_rows)
    start = (i // batch_size) * batch_size
    length = np.minimum(batch_size, num_rows - start)
    return start + (i - start - 1) % length


def kto_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    policy_kl_logps: jax.Array | None,
    ref_kl_logps: jax.Array | None,
    labels: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024), as TRL's KTOTrainer (1.16).

    Unpaired rows: completion y for prompt x with a label (True = desirable). With summed
    log-probs, the implied reward ratio h = log π(y|x) − log π_ref(y|x), and the reference
    point estimated from mismatched pairs (x_i, y'_i) of the same batch
    (`kto_kl_pair_indices`):

        z0 = max(0, sg(mean_i [log π(y'_i|x_i) − log π_ref(y'_i|x_i)]))
        "kto":               desirable  λ_D·(1 − σ(β·(h − z0)))
                             undesirable λ_U·(1 − σ(β·(z0 − h)))
        "apo_zero_unpaired": desirable  λ_D·(1 − σ(β·h)),  undesirable λ_U·σ(β·h)
        loss = mean over the batch's rows

    λ_D, λ_U are `desirable_weight`, `undesirable_weight`. "apo_zero_unpaired" needs no KL
    pairs (pass None). TRL's defaults: β = 0.1, loss_type "kto", both weights 1.0.

    Args:
      policy_logps, ref_logps: `[B]` summed completion log-probs (policy differentiated).
      policy_kl_logps, ref_kl_logps: `[B]` the same for the KL pairs (both constant).
      labels: `[B]` bool, True for desirable.
      weights: optional `[B]` row mask (0 drops a padding row from loss, z0 and metrics).

    Metrics (TRL's names): `loss`; `kl` = z0; `rewards/chosen`, `rewards/rejected` = mean
    β·h over desirable / undesirable rows; `logps/chosen`, `logps/rejected` likewise of
    log π; `rewards/margins` = their difference. TRL omits a metric whose rows are absent
    from the batch; here it is 0 then.
    """
    check_choice("kto loss_type", loss_type, KTO_LOSS_TYPES)
    if isinstance(beta, int | float) and beta <= 0:
        raise ValueError(f"kto beta must be > 0, got {beta}")
    use_kl = loss_type == "kto"
    if use_kl and (policy_kl_logps is None or ref_kl_logps is None):
        raise ValueError(
            "kto loss_type 'kto' estimates its reference point z0 from KL pairs: pass "
            "policy_kl_logps and ref_kl_logps, or use loss_type='apo_zero_unpaired'"
        )
    lp = _float(policy_logps)
    ref = jax.lax.stop_gradient(_float(ref_logps))
    w = _ones_like_pairs(lp, weights)
    desirable = jnp.asarray(labels).astype(bool)
    if use_kl:
        kl_gap = jax.lax.stop_gradient(_float(policy_kl_logps) - _float(ref_kl_logps))
        z0 = jnp.maximum(masked_mean(kl_gap, w), 0.0)
    else:
        z0 = jnp.zeros((), jnp.float32)

    logratios = lp - ref
    if use_kl:
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * (logratios - z0))
        rejected_losses = 1.0 - jax.nn.sigmoid(beta * (z0 - logratios))
    else:
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * logratios)
        rejected_losses = jax.nn.sigmoid(beta * logratios)
    losses = jnp.where(
        desirable, desirable_weight * chosen_losses, undesirable_weight * rejected_losses
    )
    loss = masked_mean(losses, w)

    rewards = beta * jax.lax.stop_gradient(logratios)
    w_chosen = jnp.where(desirable, w, 0.0)
    w_rejected = jnp.where(desirable, 0.0, w)
    metrics = {
        "loss": loss,
        "kl": z0,
        "rewards/chosen": masked_mean(rewards, w_chosen),
        "rewards/rejected": masked_mean(rewards, w_rejected),
        "logps/chosen": masked_mean(lp, w_chosen),
        "logps/rejected": masked_mean(lp, w_rejected),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, jax.lax.stop_gradient(metrics)
