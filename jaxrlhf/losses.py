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

Metrics = dict[str, jax.Array]

KL_ESTIMATORS = ("k1", "k2", "k3")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
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
) -> tuple[jax.Array, Metrics]:
    """GRPO clipped objective with an optional k3 KL penalty, as TRL's GRPOTrainer.

    Per token, with one advantage A_i per sequence (group-relative, see
    `jaxrlhf.advantages.group_advantages`):

        ρ_it = exp(log π(y_it) − log π_old(y_it))
        ℓ_it = −min(ρ_it·A_i, clip(ρ_it, 1 − ε, 1 + ε_high)·A_i) + β·k3_it
        k3_it = exp(ref − lp) − (ref − lp) − 1

    Aggregation over the mask m (TRL's `loss_type`; B = batch size, |o_i| = Σ_t m_it):

        "grpo"    (alias "sequence-mean"): (1/B) Σ_i (1/|o_i|) Σ_t ℓ_it m_it
        "bnpo"    (alias "token-mean"):    Σ_it ℓ_it m_it / Σ_it m_it
        "dr_grpo" (Dr. GRPO):               Σ_it ℓ_it m_it / (B · max_completion_length)
        "dapo"    (DAPO):                   Σ_it ℓ_it m_it / Σ_it m_it

    "dapo" normalises by the number of tokens in the *global* batch. Here the sum is over
    the arrays given, so under one `jit` over a sharded batch it equals "bnpo"; TRL
    differs from "bnpo" only when each process averages its own shard, or under
    gradient accumulation (then pass the whole accumulated batch's token count yourself
    by scaling the loss).

    Args:
      logprobs: `[B, T]` log π (differentiated).
      old_logprobs: `[B, T]` log π_old, constant; None means one update per rollout
        (π_old = π, so ρ = 1 with the gradient of ρ = ∇ log π).
      ref_logprobs: `[B, T]` log π_ref, or None when β = 0.
      advantages: `[B]` per sequence (a `[B, T]` per-token array is accepted too).
      mask: `[B, T]` completion mask.
      beta: KL coefficient β; 0 (TRL's default) skips the reference entirely.
      max_completion_length: required for "dr_grpo".

    Metrics: `loss`; `kl` (masked mean of k3, 0 when β = 0); `clip_ratio`, the share of
    tokens where clipping binds: (ρ < 1 − ε and A < 0) or (ρ > 1 + ε_high and A > 0),
    TRL's `clip_ratio/region_mean`; `ratio_mean` = mean ρ.
    """
    loss_type = GRPO_LOSS_ALIASES.get(loss_type, loss_type)
    check_choice("grpo loss_type", loss_type, GRPO_LOSS_TYPES + tuple(GRPO_LOSS_ALIASES))
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

    ratio = jnp.exp(lp - old)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    if use_kl:
        kl = kl_estimate(lp, jax.lax.stop_gradient(_float(ref_logprobs)), "k3")
        per_token = per_token + beta * kl
        kl_mean = masked_mean(kl, mask)
    else:
        kl_mean = jnp.zeros((), jnp.float32)

    if loss_type == "grpo":
        loss = jnp.mean(masked_mean(per_token, mask, axis=-1))
    elif loss_type in ("bnpo", "dapo"):
        loss = masked_mean(per_token, mask)
    else:  # dr_grpo
        loss = masked_sum(per_token, mask) / (lp.shape[0] * max_completion_length)

    region_clipped = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    metrics = {
        "loss": loss,
        "kl": kl_mean,
        "clip_ratio": masked_mean(region_clipped.astype(jnp.float32), mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    return loss, jax.lax.stop_gradient(metrics)
