"""Losses against numbers worked out by hand (the comments say how).

Every loss is called through `jax.jit` (hyperparameters bound with `functools.partial`),
which shows each one is jittable and is faster on CPU than op-by-op dispatch.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + eˣ), in plain python for the expected values."""
    return math.log1p(math.exp(x))


def call(fn, *args, **hyper):
    """`fn(*args, **hyper)` compiled with `jax.jit`; config errors still raise at trace time."""
    return jax.jit(functools.partial(fn, **hyper))(*args)


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- helpers


def test_masked_mean_and_sum():
    x = jnp.array([[1.0, 2.0, jnp.nan], [4.0, jnp.inf, 6.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    # NaN/inf sit under the mask and must not leak: (1 + 2 + 4) / 3.
    close(call(losses.masked_sum, x, mask), 7.0)
    close(call(losses.masked_mean, x, mask), 7.0 / 3.0)
    close(call(losses.masked_mean, x, mask, axis=-1), [1.5, 4.0])
    # An empty mask gives 0 rather than 0/0.
    close(call(losses.masked_mean, x, jnp.zeros_like(mask)), 0.0)
    close(call(losses.masked_mean, x, jnp.array([[1, 1, 0], [0, 0, 0]]), axis=-1), [1.5, 0.0])


def test_check_choice_message():
    with pytest.raises(ValueError, match=r"kl estimator 'k4'.*choose from 'k1', 'k2', 'k3'"):
        call(losses.kl_estimate, jnp.zeros(3), jnp.zeros(3), kind="k4")


# --------------------------------------------------------------------------- Bradley-Terry

R_C = jnp.array([2.0, 0.0, 1.0])
R_R = jnp.array([1.0, 0.5, 1.0])  # differences r_c − r_r = [1, −0.5, 0]


def test_bradley_terry_loss_and_metrics():
    loss, m = call(losses.bradley_terry_loss, R_C, R_R)
    # −log σ(d) = softplus(−d): softplus(−1) + softplus(0.5) + softplus(0) over 3 pairs.
    expected = (softplus(-1.0) + softplus(0.5) + softplus(0.0)) / 3
    close(loss, expected)
    close(m["loss"], expected)
    close(m["accuracy"], 1 / 3)  # only pair 0 is strictly ahead; a tie is not a win
    close(m["rewards/chosen_mean"], 1.0)  # (2 + 0 + 1) / 3
    close(m["rewards/rejected_mean"], 2.5 / 3)
    close(m["rewards/chosen_std"], math.sqrt(2 / 3))  # deviations ±1, 0 → var 2/3 (ddof 0)
    # rejected deviations from 5/6: 1/6, −1/3, 1/6 → var = (1/36 + 1/9 + 1/36) / 3 = 1/18
    close(m["rewards/rejected_std"], math.sqrt(1 / 18))
    close(m["rewards/margin"], 0.5 / 3)  # (1 − 0.5 + 0) / 3


def test_bradley_terry_margin_center_and_weights():
    loss, _ = call(losses.bradley_terry_loss, R_C, R_R, margin=jnp.array([0.5, 0.0, 0.0]))
    # pair 0's logit drops from 1 to 0.5
    close(loss, (softplus(-0.5) + softplus(0.5) + softplus(0.0)) / 3)

    loss, _ = call(losses.bradley_terry_loss, R_C, R_R, center_rewards_coefficient=0.01)
    # (r_c + r_r)² = 9, 0.25, 4 → mean 13.25/3, times 0.01
    base = (softplus(-1.0) + softplus(0.5) + softplus(0.0)) / 3
    close(loss, base + 0.01 * 13.25 / 3)

    # A zero weight drops pair 2 from the loss and from every metric.
    loss, m = call(losses.bradley_terry_loss, R_C, R_R, weights=jnp.array([1.0, 1.0, 0.0]))
    close(loss, (softplus(-1.0) + softplus(0.5)) / 2)
    close(m["accuracy"], 0.5)
    close(m["rewards/chosen_mean"], 1.0)
    close(m["rewards/chosen_std"], 1.0)  # 2 and 0
    close(m["rewards/margin"], 0.25)  # (1 − 0.5) / 2


def test_bradley_terry_gradient_is_sigmoid():
    # d/dr_c of −log σ(r_c − r_r) = −σ(−d) = −(1 − σ(d)), divided by the batch size.
    g = jax.grad(lambda rc: call(losses.bradley_terry_loss, rc, R_R)[0])(R_C)
    d = np.array([1.0, -0.5, 0.0])
    close(g, -(1 / (1 + np.exp(d))) / 3)


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    lp = jnp.array([-1.0, -2.0, -0.5])
    ref = jnp.array([-1.0, -1.0, -1.5])  # log r = ref − lp = [0, 1, −1]
    close(call(losses.kl_estimate, lp, ref, kind="k1"), [0.0, -1.0, 1.0])  # lp − ref
    close(call(losses.kl_estimate, lp, ref, kind="k2"), [0.0, 0.5, 0.5])  # ½ (log r)²
    # k3 = eˡᵒᵍ ʳ − log r − 1
    close(call(losses.kl_estimate, lp, ref, kind="k3"), [0.0, math.e - 2.0, math.exp(-1.0)])


def test_kl_k3_zero_when_equal_and_nonnegative():
    key_a, key_b = jax.random.split(jax.random.key(0))
    lp = -jnp.abs(jax.random.normal(key_a, (64,))) * 3
    ref = -jnp.abs(jax.random.normal(key_b, (64,))) * 3
    assert np.all(np.asarray(call(losses.kl_estimate, lp, lp, kind="k3")) == 0.0)
    assert np.all(np.asarray(call(losses.kl_estimate, lp, ref, kind="k3")) >= 0.0)
    assert np.all(np.asarray(call(losses.kl_estimate, lp, ref, kind="k2")) >= 0.0)
    # k1 has the same expectation but is signed: it is exactly lp − ref.
    close(call(losses.kl_estimate, lp, ref, kind="k1"), lp - ref)


# --------------------------------------------------------------------------- PPO

# Tokens (ρ, A): (1.5, 1), (0.5, −1) / (1.1, 2), (0.7, 1) with the last one masked.
PPO_RATIO = jnp.array([[1.5, 0.5], [1.1, 0.7]])
PPO_OLD = jnp.array([[-1.0, -2.0], [-0.5, -3.0]])
PPO_LP = PPO_OLD + jnp.log(PPO_RATIO)
PPO_ADV = jnp.array([[1.0, -1.0], [2.0, 1.0]])
PPO_MASK = jnp.array([[1, 1], [1, 0]])


def test_ppo_policy_loss_by_hand():
    loss, m = call(losses.ppo_policy_loss, PPO_LP, PPO_OLD, PPO_ADV, PPO_MASK, clip_eps=0.2)
    # token 0: max(−1.5, −1·1.2)   = −1.2  (clipped term larger: clipped)
    # token 1: max(0.5, −(−1)·0.8) =  0.8  (clipped)
    # token 2: max(−2.2, −2·1.1)   = −2.2  (ρ inside [0.8, 1.2]: equal, not clipped)
    close(loss, (-1.2 + 0.8 - 2.2) / 3, tol=1e-5)
    close(m["policy_loss"], loss)
    close(m["clipfrac"], 2 / 3)
    log_r = np.log([1.5, 0.5, 1.1])
    close(m["approx_kl"], 0.5 * np.mean(log_r**2), tol=1e-5)
    close(m["ratio_mean"], (1.5 + 0.5 + 1.1) / 3, tol=1e-5)


def test_ppo_policy_loss_clip_higher_and_gradient():
    # With ε_high = 0.6, token 0 (ρ = 1.5 < 1.6) is no longer clipped.
    loss, m = call(
        losses.ppo_policy_loss, PPO_LP, PPO_OLD, PPO_ADV, PPO_MASK, clip_eps=0.2, clip_eps_high=0.6
    )
    close(loss, (-1.5 + 0.8 - 2.2) / 3, tol=1e-5)
    close(m["clipfrac"], 1 / 3)
    # Gradient: clipped tokens and masked tokens get none; token 2 gets
    # d(−A·ρ)/d lp / n = −A·ρ / 3 = −2·1.1/3.
    g = jax.grad(lambda lp: call(losses.ppo_policy_loss, lp, PPO_OLD, PPO_ADV, PPO_MASK)[0])(PPO_LP)
    close(g, [[0.0, 0.0], [-2.2 / 3, 0.0]], tol=1e-5)


def test_ppo_value_loss_by_hand():
    values = jnp.array([[1.0, 0.0, 2.0, 5.0]])
    old = jnp.array([[0.5, 0.0, 1.0, 0.0]])
    returns = jnp.array([[2.0, 1.0, 1.5, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]])  # the huge error of token 3 is padding
    loss, m = call(losses.ppo_value_loss, values, old, returns, mask, clip_range=0.2)
    # token 0: v_clip = 0.7; errors (1−2)² = 1, (0.7−2)² = 1.69 → 1.69 (clipped larger)
    # token 1: v_clip = 0;   errors 1, 1                       → 1
    # token 2: v_clip = 1.2; errors 0.25, 0.09                 → 0.25
    close(loss, 0.5 * (1.69 + 1.0 + 0.25) / 3)
    close(m["value_loss"], loss)
    close(m["value_clipfrac"], 1 / 3)


# --------------------------------------------------------------------------- DPO

PI_C = jnp.array([-1.0, -2.0])
PI_R = jnp.array([-3.0, -1.0])
REF_C = jnp.array([-1.5, -1.5])
REF_R = jnp.array([-1.5, -1.5])
# h = (π_c − π_r) − (ref_c − ref_r) = [2, −1]; with β = 0.5, β·h = [1, −0.5].


def dpo(**kw):
    return call(losses.dpo_loss, PI_C, PI_R, REF_C, REF_R, **{"beta": 0.5, **kw})


def test_dpo_sigmoid_and_metrics():
    loss, m = dpo()
    close(loss, (softplus(-1.0) + softplus(0.5)) / 2)  # −log σ(x) = softplus(−x)
    close(m["loss"], loss)
    # chosen rewards β(π_c − ref_c) = 0.5·[0.5, −0.5]; rejected 0.5·[−1.5, 0.5]
    close(m["rewards/chosen"], 0.0)
    close(m["rewards/rejected"], -0.25)
    close(m["rewards/accuracies"], 0.5)  # 0.25 > −0.75 yes; −0.25 > 0.25 no
    close(m["rewards/margins"], 0.25)  # (1.0 + (−0.5)) / 2
    close(m["logps/chosen"], -1.5)
    close(m["logps/rejected"], -2.0)


def test_dpo_label_smoothing():
    loss, _ = dpo(label_smoothing=0.1)
    # each pair: 0.9·(−log σ(βh)) + 0.1·(−log σ(−βh))
    pair0 = 0.9 * softplus(-1.0) + 0.1 * softplus(1.0)
    pair1 = 0.9 * softplus(0.5) + 0.1 * softplus(-0.5)
    close(loss, (pair0 + pair1) / 2)


def test_dpo_ipo_and_hinge():
    loss, _ = dpo(loss_type="ipo")
    close(loss, ((2 - 1) ** 2 + (-1 - 1) ** 2) / 2)  # (h − 1/(2β))², 1/(2β) = 1
    loss, _ = dpo(loss_type="hinge")
    close(loss, (0.0 + 1.5) / 2)  # relu(1 − βh) = relu(0), relu(1.5)


def test_dpo_weights_and_gradient():
    loss, m = dpo(weights=jnp.array([1.0, 0.0]))
    close(loss, softplus(-1.0))
    close(m["rewards/accuracies"], 1.0)
    # d/dπ_c of −log σ(βh) = −β·σ(−βh), averaged over 2 pairs; the reference gets nothing.
    g_pi, g_ref = jax.grad(
        lambda pc, rc: call(losses.dpo_loss, pc, PI_R, rc, REF_R, beta=0.5)[0], argnums=(0, 1)
    )(PI_C, REF_C)
    close(g_pi, -0.5 / (1 + np.exp([1.0, -0.5])) / 2)
    close(g_ref, [0.0, 0.0])


def test_dpo_errors():
    with pytest.raises(ValueError, match=r"dpo loss_type 'kto'.*'sigmoid', 'ipo', 'hinge'"):
        dpo(loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo(beta=0.0)


# --------------------------------------------------------------------------- GRPO

# Two completions of lengths 3 and 1 (the second padded): the aggregation modes differ.
GRPO_MASK = jnp.array([[1, 1, 1], [1, 0, 0]])
GRPO_RATIO = jnp.array([[1.5, 0.7, 1.0], [0.5, 9.0, 1.0]])  # 9.0 is padding
GRPO_OLD = jnp.array([[-1.0, -2.0, -0.5], [-1.5, -0.2, -1.0]])
GRPO_LP = GRPO_OLD + jnp.log(GRPO_RATIO)
GRPO_ADV = jnp.array([1.0, -1.0])
# Per-token loss −min(ρA, clip(ρ, 0.8, 1.2)A):
#   row 0 (A = 1):  −min(1.5, 1.2) = −1.2 (clipped), −min(0.7, 0.8) = −0.7, −1
#   row 1 (A = −1): −min(−0.5, −0.8) = 0.8 (clipped)
ROW0, ROW1 = -1.2 - 0.7 - 1.0, 0.8


def grpo(**kw):
    return call(losses.grpo_loss, GRPO_LP, GRPO_OLD, None, GRPO_ADV, GRPO_MASK, **kw)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (ROW0 / 3 + ROW1 / 1) / 2),  # mean of per-sequence means
        ("sequence-mean", (ROW0 / 3 + ROW1 / 1) / 2),
        ("bnpo", (ROW0 + ROW1) / 4),  # all 4 tokens weigh the same
        ("token-mean", (ROW0 + ROW1) / 4),
        ("dapo", (ROW0 + ROW1) / 4),
        ("dr_grpo", (ROW0 + ROW1) / (2 * 5)),  # B · max_completion_length
    ],
)
def test_grpo_aggregation_modes(loss_type, expected):
    loss, m = grpo(loss_type=loss_type, max_completion_length=5)
    close(loss, expected, tol=1e-5)
    close(m["loss"], loss)
    close(m["kl"], 0.0)  # β = 0
    close(m["clip_ratio"], 2 / 4)  # row0 t0 (ρ > 1.2, A > 0) and row1 t0 (ρ < 0.8, A < 0)
    close(m["ratio_mean"], (1.5 + 0.7 + 1.0 + 0.5) / 4, tol=1e-5)


def test_grpo_modes_differ():
    values = {
        t: float(grpo(loss_type=t, max_completion_length=5)[0]) for t in ("grpo", "bnpo", "dr_grpo")
    }
    assert len({round(v, 6) for v in values.values()}) == 3, values


def test_grpo_kl_penalty():
    # log r = ref − lp: row 0 → [0, 1, −1], row 1 → [0.5, ·, ·]
    ref = GRPO_LP + jnp.array([[0.0, 1.0, -1.0], [0.5, 3.0, 3.0]])
    k3 = [0.0, math.e - 2.0, math.exp(-1.0), math.exp(0.5) - 1.5]
    loss, m = call(
        losses.grpo_loss, GRPO_LP, GRPO_OLD, ref, GRPO_ADV, GRPO_MASK, beta=0.1, loss_type="bnpo"
    )
    close(m["kl"], sum(k3) / 4, tol=1e-5)
    close(loss, (ROW0 + ROW1 + 0.1 * sum(k3)) / 4, tol=1e-5)


def test_grpo_clip_higher_and_token_advantages():
    loss, m = grpo(loss_type="bnpo", clip_eps_high=0.6)
    # row0 t0: ρ = 1.5 < 1.6 is no longer clipped → −1.5 instead of −1.2
    close(loss, (ROW0 - 0.3 + ROW1) / 4, tol=1e-5)
    close(m["clip_ratio"], 1 / 4)
    # A per-token [B, T] advantage equal to the broadcast one gives the same loss.
    per_token_adv = jnp.broadcast_to(GRPO_ADV[:, None], GRPO_MASK.shape)
    loss2, _ = call(
        losses.grpo_loss,
        GRPO_LP,
        GRPO_OLD,
        None,
        per_token_adv,
        GRPO_MASK,
        loss_type="bnpo",
        clip_eps_high=0.6,
    )
    close(loss2, loss)


def test_grpo_single_update_gradient():
    # old_logprobs=None: ρ = 1 in value, ∇ρ = ∇ log π, so ℓ = −A per token.
    adv = jnp.array([1.0, -2.0])
    loss_fn = lambda lp: call(losses.grpo_loss, lp, None, None, adv, GRPO_MASK)[0]
    close(loss_fn(GRPO_LP), (-1.0 + 2.0) / 2)  # sequence means −1 and 2
    # d/d lp = −A / |o_i| / B: row 0 → −1/6 per token, row 1 → 2/1/2 = 1, padding 0.
    close(jax.grad(loss_fn)(GRPO_LP), [[-1 / 6, -1 / 6, -1 / 6], [1.0, 0.0, 0.0]])


def test_grpo_errors():
    with pytest.raises(ValueError, match=r"grpo loss_type 'ppo'.*'grpo', 'bnpo', 'dr_grpo'"):
        grpo(loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo(beta=0.04)
