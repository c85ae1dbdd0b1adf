"""Advantages against hand computations and plain numpy loops.

Functions are called through `jax.jit` (hyperparameters bound with `functools.partial`),
which shows each is jittable and is faster on CPU than op-by-op dispatch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import advantages as adv_lib


def call(fn, *args, **hyper):
    """`fn(*args, **hyper)` compiled with `jax.jit`; config errors still raise at trace time."""
    return jax.jit(functools.partial(fn, **hyper))(*args)


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- GAE


def gae_loop(rewards, values, lengths, gamma, lam):
    """The textbook loop, one response at a time, over its own valid tokens only."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b, length in enumerate(lengths):
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1] if t + 1 < length else 0.0  # episode ends: V = 0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    mask = np.arange(rewards.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return adv, (adv + values) * mask


def test_gae_monte_carlo_when_gamma_lam_one():
    # γ = λ = 1: the TD errors telescope, A_t = Σ_{s≥t} r_s − V_t.
    rewards = jnp.array([[0.0, 0.0, 1.0]])
    values = jnp.array([[0.5, 0.5, 0.5]])
    adv, ret = call(adv_lib.gae, rewards, values, jnp.ones((1, 3)), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.5, 0.5]])  # 1 − 0.5 at every step
    close(ret, [[1.0, 1.0, 1.0]])  # returns = the episode's total reward


def test_gae_td0_when_lam_zero():
    # λ = 0: A_t = δ_t = r_t + γ V_{t+1} − V_t, with V after the end = 0.
    rewards = jnp.array([[0.0, 0.0, 1.0]])
    values = jnp.array([[0.5, 0.5, 0.5]])
    adv, _ = call(adv_lib.gae, rewards, values, jnp.ones((1, 3)), gamma=0.5, lam=0.0)
    close(adv, [[0.25 - 0.5, 0.25 - 0.5, 1.0 - 0.5]])


def test_gae_ignores_padding():
    # Token 2 is padding with garbage reward/value: it must not bootstrap token 1.
    rewards = jnp.array([[0.0, 1.0, 100.0]])
    values = jnp.array([[0.5, 0.5, 7.0]])
    adv, ret = call(adv_lib.gae, rewards, values, jnp.array([[1, 1, 0]]), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.5, 0.0]])
    close(ret, [[1.0, 1.0, 0.0]])


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_numpy_loop(gamma, lam):
    rng = np.random.default_rng(0)
    batch, time = 6, 9
    lengths = [9, 1, 4, 0, 6, 8]  # different response lengths, one empty
    mask = np.arange(time)[None, :] < np.array(lengths)[:, None]
    rewards = rng.normal(size=(batch, time)).astype(np.float32)
    values = rng.normal(size=(batch, time)).astype(np.float32)
    # Garbage after each end: masked positions must not matter.
    rewards = np.where(mask, rewards, 1e3).astype(np.float32)
    values = np.where(mask, values, -1e3).astype(np.float32)

    adv, ret = call(adv_lib.gae, rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = gae_loop(rewards, values, lengths, gamma, lam)
    close(adv, want_adv, tol=1e-5)
    close(ret, want_ret, tol=1e-5)


# --------------------------------------------------------------------------- whitening


def test_whiten_by_hand():
    x = jnp.array([[1.0, 2.0, 3.0, 99.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    # valid [1, 2, 3]: mean 2, unbiased var (1 + 0 + 1)/(3 − 1) = 1 → [−1, 0, 1]
    close(call(adv_lib.whiten, x, mask), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-6)
    close(call(adv_lib.whiten, x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-6)


def test_whiten_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(loc=3.0, scale=2.0, size=(4, 7)).astype(np.float32)
    mask = rng.random((4, 7)) < 0.7
    valid = x[mask].astype(np.float64)
    want = (x - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
    out = np.asarray(call(adv_lib.whiten, x, mask))
    close(out[mask], want[mask], tol=1e-5)
    assert np.all(out[~mask] == 0.0)
    # whitened valid entries have mean 0 and unbiased std 1
    close(out[mask].mean(), 0.0, tol=1e-5)
    close(out[mask].std(ddof=1), 1.0, tol=1e-5)


# --------------------------------------------------------------------------- groups


def test_group_advantages_by_hand():
    rewards = jnp.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, std = call(adv_lib.group_advantages, rewards, group_size=3)
    # group 0: mean 2, std (ddof 1) sqrt((1 + 0 + 1)/2) = 1; group 1: all equal, std 0
    close(std, [1.0, 0.0])
    close(adv, [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])
    adv, _ = call(adv_lib.group_advantages, rewards, group_size=3, scale_by_std=False)
    close(adv, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_numpy(scale_by_std):
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=16).astype(np.float32)
    grouped = rewards.reshape(4, 4).astype(np.float64)
    want_std = grouped.std(axis=1, ddof=1)
    want = grouped - grouped.mean(axis=1, keepdims=True)
    if scale_by_std:
        want = want / (want_std[:, None] + 1e-4)
    adv, std = call(adv_lib.group_advantages, rewards, group_size=4, scale_by_std=scale_by_std)
    close(adv, want.reshape(16), tol=1e-5)
    close(std, want_std, tol=1e-5)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        call(adv_lib.group_advantages, jnp.zeros(7), group_size=3)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        call(adv_lib.group_advantages, jnp.zeros(4), group_size=1)


# --------------------------------------------------------------------------- KL control


def test_adaptive_kl_controller_by_hand():
    state = adv_lib.init_kl_control(0.2)
    update = functools.partial(adv_lib.update_kl_control, target=6.0, horizon=10000)
    # KL 9 vs target 6: error 0.5 clipped to 0.2 → β · (1 + 0.2·512/10000) = 0.2 · 1.01024
    state = jax.jit(update)(state, 9.0, 512)
    close(state.value, 0.2 * 1.01024)
    # KL 5.4: error 5.4/6 − 1 = −0.1 (inside the clip) → × (1 − 0.1·512/10000) = × 0.99488
    state = jax.jit(update)(state, 5.4, 512)
    close(state.value, 0.2 * 1.01024 * 0.99488, tol=1e-6)
    # a pytree: β and the budget controller's last reading (untouched by this rule)
    assert jax.tree.leaves(state) == [state.value, state.last_kl]
    assert jnp.isnan(state.last_kl)


def test_fixed_kl_controller():
    state = adv_lib.init_kl_control(0.05)
    same = adv_lib.update_kl_control(state, 100.0, 512, target=None, horizon=10000)
    close(same.value, 0.05)
