"""Advantages for policy-gradient RLHF: GAE, whitening, group-relative advantages, and the
adaptive KL coefficient of Ziegler et al. (2019).

All functions are pure and jittable. Token-level arrays are `[B, T]` over response tokens
with a `mask` marking real tokens; responses may have different lengths.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxrlhf.losses import masked_mean, masked_sum

# --------------------------------------------------------------------------- GAE


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised Advantage Estimation (Schulman et al., 2016) as a reverse `lax.scan`.

    GAE is the exponentially weighted sum of TD errors,

        A_t = Σ_{l≥0} (γλ)^l δ_{t+l},     δ_t = r_t + γ·V_{t+1} − V_t,

    which satisfies the backward recursion A_t = δ_t + γλ·A_{t+1}. A response ends at its
    last valid token, after which the episode is over: the value there is 0 and nothing
    flows back. Writing m_t for the mask, both facts become one multiplication:

        δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t
        A_t = (δ_t + γλ·m_{t+1}·A_{t+1}) · m_t          (A_T = V_T = m_T = 0)
        R_t = (A_t + V_t) · m_t                          (the critic's regression target)

    so one scan from t = T−1 down to 0 handles every row's length at once. Masked
    positions of the advantages and returns are 0. (TRL bootstraps the last token from
    the value at the first padding position; here that value is 0, the episode's end.)

    Gradients flow through the inputs; call it on constants (e.g. under
    `jax.lax.stop_gradient`) as PPO does.

    Args:
      rewards: `[B, T]` per-token rewards (e.g. the score at the last token minus a KL
        penalty on every token).
      values: `[B, T]` critic values V(s_t).
      mask: `[B, T]` response mask.
      gamma: discount γ.
      lam: GAE λ.

    Returns:
      `(advantages, returns)`, both `[B, T]` float32.
    """
    m = jnp.asarray(mask).astype(jnp.float32)
    r = jnp.asarray(rewards, jnp.float32) * m
    v = jnp.asarray(values, jnp.float32) * m

    def step(carry, x):
        next_adv, next_value, next_mask = carry
        r_t, v_t, m_t = x
        delta = r_t + gamma * next_value * next_mask - v_t
        adv = (delta + gamma * lam * next_mask * next_adv) * m_t
        return (adv, v_t, m_t), adv

    zeros = jnp.zeros(r.shape[:-1], jnp.float32)
    # Scan over time: move T to the front, run backwards, move it back.
    time_first = tuple(jnp.moveaxis(a, -1, 0) for a in (r, v, m))
    _, adv_time_first = jax.lax.scan(step, (zeros, zeros, zeros), time_first, reverse=True)
    advantages = jnp.moveaxis(adv_time_first, 0, -1)
    returns = (advantages + v) * m
    return advantages, returns


# --------------------------------------------------------------------------- whitening


def whiten(
    x: jax.Array,
    mask: jax.Array,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> jax.Array:
    """Masked whitening over all valid entries, as TRL's `masked_whiten`.

        μ  = Σ x·m / Σ m
        σ² = Σ (x − μ)²·m / Σ m · n/(n − 1)          (unbiased; n = Σ m)
        y  = (x − μ) / sqrt(σ² + eps)        (+ μ back if shift_mean is False)

    Masked positions of the output are 0. With n = 1 the Bessel factor is taken as 1
    (TRL raises instead; that check cannot run under `jit`).
    """
    x = jnp.asarray(x, jnp.float32)
    mean = masked_mean(x, mask)
    n = masked_sum(jnp.ones_like(x), mask)
    var = masked_mean(jnp.square(x - mean), mask)
    var = var * n / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(jnp.asarray(mask) != 0, out, 0.0)


# --------------------------------------------------------------------------- GRPO


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-4,
) -> tuple[jax.Array, jax.Array]:
    """Group-relative advantages of GRPO (Shao et al., 2024), as TRL's GRPOTrainer.

    `rewards` `[B]` hold G = `group_size` consecutive completions per prompt
    (`[p0 s0, p0 s1, …, p0 s_{G−1}, p1 s0, …]`). For completion i of group g:

        A_i = (r_i − mean_g) / (std_g + eps)     (scale_by_std=True, TRL's scale_rewards)
        A_i =  r_i − mean_g                      (scale_by_std=False, Dr. GRPO)

    std_g is the unbiased sample std (ddof=1, like `torch.std`).

    Returns:
      `(advantages [B], group_std [B // G])`; `mean(group_std == 0)` is TRL's
      `frac_reward_zero_std`, the share of groups that carry no learning signal.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    (batch,) = rewards.shape
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (the std of one sample is undefined), got {group_size}"
        )
    if batch % group_size:
        raise ValueError(
            f"batch of {batch} rewards is not a multiple of group_size={group_size}; "
            "generate group_size completions per prompt"
        )
    grouped = rewards.reshape(batch // group_size, group_size)
    mean = grouped.mean(axis=1, keepdims=True)
    std = grouped.std(axis=1, ddof=1)
    adv = grouped - mean
    if scale_by_std:
        adv = adv / (std[:, None] + eps)
    return adv.reshape(batch), std


# --------------------------------------------------------------------------- KL control


@flax.struct.dataclass
class KLControlState:
    """The current KL coefficient β of the PPO reward `r − β·KL`, as a pytree."""

    value: jax.Array


def init_kl_control(init_kl_coef: float) -> KLControlState:
    """Starts the KL coefficient at `init_kl_coef`."""
    return KLControlState(value=jnp.asarray(init_kl_coef, jnp.float32))


def update_kl_control(
    state: KLControlState,
    current_kl: jax.Array | float,
    n_steps: int | jax.Array,
    *,
    target: float | None,
    horizon: float,
) -> KLControlState:
    """Adaptive KL controller of Ziegler et al. (2019), TRL's `AdaptiveKLController`.

        e     = clip(KL / target − 1, −0.2, 0.2)
        β_new = β · (1 + e · n_steps / horizon)

    `n_steps` is the number of samples (episodes) seen since the last update. With
    `target=None` the coefficient is fixed (TRL's `FixedKLController`) and the state is
    returned unchanged.
    """
    if target is None:
        return state
    error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * n_steps / horizon
    return state.replace(value=state.value * mult)
