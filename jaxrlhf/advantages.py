"""Advantages for policy-gradient RLHF: GAE, whitening, group-relative advantages, and the
adaptive KL coefficient of Ziegler et al. (2019).

All functions are pure and jittable. Token-level arrays are `[B, T]` over response tokens
with a `mask` marking real tokens; responses may have different lengths.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxrlhf.losses import check_choice, masked_mean, masked_sum

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


SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-4,
    scale_rewards: str | bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Group-relative advantages of GRPO (Shao et al., 2024), as TRL's GRPOTrainer.

    `rewards` `[B]` hold G = `group_size` consecutive completions per prompt
    (`[p0 s0, p0 s1, …, p0 s_{G−1}, p1 s0, …]`). For completion i of group g:

        A_i = (r_i − mean_g) / (std + eps)

    where std is chosen by TRL's `scale_rewards`:

        "group" (True, TRL's default): std_g, the std of the completion's own group
        "batch":                       the std of all B rewards (PPO Lite)
        "none"  (False, Dr. GRPO):     no division, A_i = r_i − mean_g

    Stds are unbiased (ddof=1, like `torch.std`). `scale_rewards=None` (default) keeps the
    older switch `scale_by_std` (True = "group", False = "none"); a given `scale_rewards`
    overrides it.

    Returns:
      `(advantages [B], std [B // G])`: the std TRL tests for zero per group (the group's
      own for "group"/"none", the batch's for "batch"), so `mean(std == 0)` is TRL's
      `frac_reward_zero_std`.
    """
    if scale_rewards is None:
        scale_rewards = scale_by_std
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
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
    if scale_rewards == "batch":
        std = jnp.broadcast_to(rewards.std(ddof=1), (batch // group_size,))
    else:
        std = grouped.std(axis=1, ddof=1)
    adv = grouped - mean
    if scale_rewards != "none":
        adv = adv / (std[:, None] + eps)
    return adv.reshape(batch), std


# --------------------------------------------------------------------------- KL control


@flax.struct.dataclass
class KLControlState:
    """The current KL coefficient β of the PPO reward `r − β·KL`, and the KL the budget
    controller read last (NaN before its first reading), as a pytree."""

    value: jax.Array
    last_kl: jax.Array


def init_kl_control(init_kl_coef: float) -> KLControlState:
    """Starts the KL coefficient at `init_kl_coef`, with no KL read yet."""
    return KLControlState(
        value=jnp.asarray(init_kl_coef, jnp.float32), last_kl=jnp.asarray(jnp.nan, jnp.float32)
    )


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


# --------------------------------------------------------------------------- RLOO


def rloo_rewards(
    scores: jax.Array,
    old_logprobs: jax.Array | None,
    ref_logprobs: jax.Array | None,
    mask: jax.Array,
    *,
    beta: float = 0.05,
    reward_clip_range: tuple[float, float] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RLOO's sequence reward with the KL folded in, as TRL's RLOOTrainer (1.16).

        s_i ← clip(s_i, lo, hi)                       (only with reward_clip_range)
        r_i = s_i − β · Σ_t (log π_old(y_it) − log π_ref(y_it))·m_it

    The KL is the first-order (k1) estimate summed over the completion, as in Ahmadian et
    al. (2024), so it can be negative per token. TRL has no option to put RLOO's KL in the
    loss instead. π_old is the policy at rollout time. With β = 0 the log-probs may be None.
    TRL's defaults: `beta` 0.05, `reward_clip_range` None.

    Returns:
      `(rewards [B], metrics)`, metrics `kl` = Σ k1·m / Σ m over the batch (TRL's `kl`;
      0 when β = 0).
    """
    r = jnp.asarray(scores, jnp.float32)
    if reward_clip_range is not None:
        r = jnp.clip(r, reward_clip_range[0], reward_clip_range[1])
    if isinstance(beta, int | float) and beta == 0:
        return r, {"kl": jnp.zeros((), jnp.float32)}
    if old_logprobs is None or ref_logprobs is None:
        raise ValueError(f"rloo beta={beta} needs old_logprobs and ref_logprobs, or set beta=0.0")
    k1 = jnp.asarray(old_logprobs, jnp.float32) - jnp.asarray(ref_logprobs, jnp.float32)
    r = r - beta * masked_sum(k1, mask, axis=-1)
    return r, {"kl": masked_mean(k1, mask)}


def rloo_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    normalize_advantages: bool = False,
    eps: float = 1e-4,
) -> jax.Array:
    """Leave-one-out advantages of RLOO (Kool et al., 2019; Ahmadian et al., 2024), as TRL.

    With k = `group_size` consecutive completions per prompt, each is compared with the
    mean of the *other* k − 1:

        A_i = r_i − (Σ_{j∈g} r_j − r_i)/(k − 1) = k/(k − 1) · (r_i − mean_g)

    With `normalize_advantages` (TRL's option, default False) the batch is then whitened:
    A ← (A − mean A)/(std A + eps), std unbiased (ddof=1).

    Returns `[B]` float32.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    (batch,) = rewards.shape
    if group_size < 2:
        raise ValueError(
            f"rloo group_size must be >= 2 (a leave-one-out baseline), got {group_size}"
        )
    if batch % group_size:
        raise ValueError(
            f"batch of {batch} rewards is not a multiple of group_size={group_size}; "
            "generate group_size completions per prompt"
        )
    grouped = rewards.reshape(batch // group_size, group_size)
    baseline = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
    adv = (grouped - baseline).reshape(batch)
    if normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std(ddof=1) + eps)
    return adv


# --------------------------------------------------------------------------- REINFORCE++

REINFORCE_ESTIMATORS = ("reinforce", "reinforce_baseline")


def cumulative_returns(rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> jax.Array:
    """Discounted reward-to-go G_t = r_t·m_t + γ·G_{t+1} (G_T = 0), a reverse `lax.scan`.

    As OpenRLHF's `get_cumulative_returns`; masked positions of the output are 0.
    """
    m = jnp.asarray(mask).astype(jnp.float32)
    r = jnp.asarray(rewards, jnp.float32) * m

    def step(next_return, r_t):
        g = r_t + gamma * next_return
        return g, g

    _, g_time_first = jax.lax.scan(
        step, jnp.zeros(r.shape[:-1], jnp.float32), jnp.moveaxis(r, -1, 0), reverse=True
    )
    return jnp.moveaxis(g_time_first, 0, -1) * m


def reinforce_pp_advantages(
    scores: jax.Array,
    kl: jax.Array,
    mask: jax.Array,
    *,
    kl_coef: float,
    estimator: str = "reinforce",
    group_size: int | None = None,
    gamma: float = 1.0,
    reward_clip_range: tuple[float, float] | None = None,
    std_normalize: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """REINFORCE++ advantages (Hu, 2025), as OpenRLHF's `advantage_estimator`.

    Per sequence score s_i, per-token KL estimate kl_it (e.g. `kl_estimate(lp, ref, "k1")`,
    OpenRLHF's default `kl_estimator`), and the last real token e_i of each row:

        "reinforce_baseline": s_i ← s_i − mean_g s     (group of `group_size`; no std)
        s_i ← clip(s_i, lo, hi)                          (only with reward_clip_range)
        r_it = s_i·[t = e_i] − kl_coef·kl_it             (token-level KL penalty)
        G_it = Σ_{t'≥t} γ^{t'−t} r_it'·m_it'            (`cumulative_returns`)
        A_it = (G_it − μ) / sqrt(max(σ², 1e-8))          μ, σ² over all masked tokens
                                                         of the batch (population var)

    so the normalisation is global over the batch's tokens, not per group. With
    `std_normalize=False` (OpenRLHF's `--no_advantage_std_norm`) only μ is subtracted.
    OpenRLHF forces γ = 1 for "reinforce_baseline"; here another γ is refused.

    Args:
      scores: `[B]` sequence rewards.
      kl: `[B, T]` per-token KL estimate (constant); zeros when the KL goes in the loss
        instead (OpenRLHF's `--use_kl_loss`).
      mask: `[B, T]` response mask (right-padded).
      kl_coef: the KL coefficient (OpenRLHF's `init_kl_coef`, or the adaptive value).
      estimator: "reinforce" or "reinforce_baseline".
      group_size: samples per prompt (`n_samples_per_prompt`); needed for the baseline.

    Returns:
      `(advantages [B, T], returns [B, T])`, masked positions 0.
    """
    check_choice("reinforce++ estimator", estimator, REINFORCE_ESTIMATORS)
    s = jnp.asarray(scores, jnp.float32)
    if estimator == "reinforce_baseline":
        if gamma != 1.0:
            raise ValueError(
                f"reinforce_baseline uses undiscounted returns (OpenRLHF sets gamma to 1.0); "
                f"got gamma={gamma}: set gamma=1.0 or use estimator='reinforce'"
            )
        if group_size is None or group_size < 2:
            raise ValueError(
                f"reinforce_baseline subtracts the mean of each prompt's group: pass "
                f"group_size >= 2, got {group_size}"
            )
        if s.shape[0] % group_size:
            raise ValueError(
                f"batch of {s.shape[0]} scores is not a multiple of group_size={group_size}"
            )
        grouped = s.reshape(-1, group_size)
        s = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(s.shape)
    if reward_clip_range is not None:
        s = jnp.clip(s, reward_clip_range[0], reward_clip_range[1])
    kl_coef = jnp.maximum(kl_coef, 0.0)  # OpenRLHF treats a negative coefficient as 0
    m = jnp.asarray(mask).astype(jnp.float32)
    t = jnp.arange(m.shape[-1])
    last = jnp.max(jnp.where(m != 0, t, -1), axis=-1, keepdims=True)
    token_rewards = jnp.where(t == last, s[:, None], 0.0) - kl_coef * jnp.asarray(kl, jnp.float32)
    returns = cumulative_returns(token_rewards, m, gamma=gamma)
    mean = masked_mean(returns, m)
    centred = returns - mean
    if std_normalize:
        var = masked_mean(jnp.square(centred), m)
        centred = centred * jax.lax.rsqrt(jnp.maximum(var, 1e-8))
    return centred * m, returns


# --------------------------------------------------------------------------- DAPO helpers


def soft_overlong_punishment(
    completion_lengths: jax.Array,
    *,
    max_completion_len: int,
    soft_punish_cache: int,
) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al., 2025, eq. 13), as TRL's reward function
    `get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`.

    With L = max_completion_len, C = soft_punish_cache and |y| the completion length:

        R(y) = 0                     |y| ≤ L − C
             = ((L − C) − |y|) / C   L − C < |y| ≤ L       (linear from 0 down to −1)
             = −1                    |y| > L

    Add it to the task reward before computing advantages. Returns `[B]` float32.
    """
    if soft_punish_cache < 0 or soft_punish_cache > max_completion_len:
        raise ValueError(
            f"soft_punish_cache must be in [0, max_completion_len={max_completion_len}], "
            f"got {soft_punish_cache}"
        )
    n = jnp.asarray(completion_lengths, jnp.float32)
    free = max_completion_len - soft_punish_cache
    ramp = (free - n) / max(soft_punish_cache, 1)  # the ramp is empty when C = 0
    return jnp.where(n <= free, 0.0, jnp.where(n <= max_completion_len, ramp, -1.0))


def mask_truncated_completions(
    completion_ids: jax.Array,
    completion_mask: jax.Array,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Zeroes the completion mask of rows that did not finish, TRL's
    `mask_truncated_completions`.

    A row is truncated when its last real token (the last position with mask ≠ 0) is not
    an EOS (nor the pad token, which TRL counts as a finish as well): generation stopped at
    the length limit. An empty row is not truncated (there is nothing to mask).

    Returns:
      `(mask [B, T] with truncated rows zeroed, is_truncated [B] bool)`.
    """
    m = jnp.asarray(completion_mask)
    ids = jnp.asarray(completion_ids)
    t = jnp.arange(m.shape[-1])
    last = jnp.max(jnp.where(m != 0, t, -1), axis=-1)
    last_token = jnp.take_along_axis(ids, jnp.maximum(last, 0)[:, None], axis=-1)[:, 0]
    finishers = tuple(eos_token_ids) + (() if pad_token_id is None else (pad_token_id,))
    finished = jnp.isin(last_token, jnp.asarray(finishers or (-1,), ids.dtype))
    is_truncated = (last >= 0) & ~finished
    return jnp.where(is_truncated[:, None], jnp.zeros_like(m), m), is_truncated


def dynamic_sampling_keep_mask(rewards: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """DAPO's dynamic sampling filter: drop groups whose rewards are all equal.

    A group where every completion got the same reward (all right, all wrong, or any
    tie) has zero group-relative advantage and gives no gradient; DAPO over-samples and
    keeps only groups with some spread. Equality is exact (max_g = min_g).

    Returns:
      `(keep [B] bool — True for rows of groups to keep, num_dropped_groups int32)`.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    (batch,) = rewards.shape
    if group_size < 1 or batch % group_size:
        raise ValueError(f"batch of {batch} rewards is not a multiple of group_size={group_size}")
    grouped = rewards.reshape(batch // group_size, group_size)
    tied = grouped.max(axis=1) == grouped.min(axis=1)
    keep = jnp.repeat(~tied, group_size)
    return keep, jnp.sum(tied).astype(jnp.int32)


def update_kl_budget(
    state: KLControlState,
    current_kl: jax.Array | float,
    *,
    budget: float,
    floor: float = 0.0,
    headroom: float = 0.8,
    max_step: float = 1.5,
    max_relax: float = 1.2,
    max_coef: float = 10.0,
    lookahead: float = 2.0,
) -> KLControlState:
    """The KL-budget controller: a multiplicative step after each iteration on the KL the
    policy is heading for,

        KL̂    = KL + lookahead · (KL − KL_prev)     (KL_prev: the previous iteration's)
        m     = clip((KL̂ / (headroom · budget))², 1/max_relax, max_step)
        m     = 1 if m > 1 and KL < KL_prev          (the KL is already coming down)
        β_new = clip(β · m, floor, max_coef)

    It reads the trend because it acts late: the KL it reads is of the rollouts drawn before
    the update it steers, and a raised β takes an iteration or two to turn the policy. On the
    demo, steering on the KL alone let a KL climbing 3 nats per iteration run 40% past its
    budget, then doubled β on four more iterations while the KL was already turning (0.06 →
    1.9), and the last update pulled the policy back to half the budget with half of its
    gain. Looking two iterations ahead raises β while the KL is still under the budget;
    holding β while the KL falls stops the wind-up; steps of ×1.5 rather than ×2 keep the
    lagged loop from oscillating (with doubling steps the demo's β reached 0.68 where ~0.3
    held the KL, and the policy recoiled to 40% of the budget). It aims at `headroom` (80%)
    of the budget for the drift during the update. Under its aim β relaxes, never below
    `floor`, the run's own coefficient: a budget is a cap, not a target — without the floor
    β halves on every early iteration while the KL is still small (0.05 to 0.0002 in
    eight) and then needs as many raises to matter again. Ziegler's proportional rule
    (`update_kl_control`) moves β by at most ±20% per horizon: right for a soft target, too
    slow to hold a budget. The cap keeps β finite when the budget is below the KL the
    optimiser's own noise keeps up: 10 nats of penalty per nat of KL dominates any reward.
    It relaxes slower (÷1.2) than it raises (×1.5): relaxing by ÷1.5, β fell from its
    peak to the floor in four iterations once the KL turned, and the KL climbed past the
    budget again (demo, 20 iterations: 7.0 → 11.8 nats)."""
    kl = jnp.asarray(current_kl, jnp.float32)
    first = jnp.isnan(state.last_kl)
    trend = jnp.where(first, 0.0, kl - state.last_kl)
    heading = jnp.maximum(kl + lookahead * trend, 0.0)
    step = jnp.clip(jnp.square(heading / (headroom * budget)), 1.0 / max_relax, max_step)
    step = jnp.where((step > 1.0) & (trend < 0.0), 1.0, step)
    value = jnp.clip(state.value * step, floor, max_coef)
    return KLControlState(value=value, last_kl=kl)
