"""Online RL losses and advantages (GRPO family, RLOO, REINFORCE++, DAPO helpers).

Two kinds of evidence: numbers worked out by hand (the comments say how), and TRL 1.16's
own code run on the same inputs. TRL inlines its GRPO/RLOO losses and advantages in trainer
methods, so those methods are called unbound with a `SimpleNamespace` standing in for the
trainer: it carries exactly the attributes the method reads, and its model forward returns
fixed log-probabilities. Every jaxrlhf function runs under `jax.jit`.
"""

import collections
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import advantages as adv_lib
from jaxrlhf import losses

torch = pytest.importorskip("torch")


def call(fn, *args, **hyper):
    """`fn(*args, **hyper)` compiled with `jax.jit`; config errors still raise at trace time."""
    return jax.jit(functools.partial(fn, **hyper))(*args)


def grad_of(fn, argnum, *args, **hyper):
    """d loss / d args[argnum] under jit (the loss is the first output)."""
    return jax.jit(jax.grad(lambda *a: fn(*a, **hyper)[0], argnums=argnum))(*args)


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# float32 on both sides through exp/log/sums of a few terms: agreement to ~1e-6 relative.
TRL_TOL = 1e-5


# =========================================================================== GRPO: by hand


def test_grpo_cispo_by_hand():
    # One row, two tokens with log-ratios log 2 and 0 → weights w = [2, 1]; ε_max = 1.5 caps
    # the first at 1.5. ℓ = −sg(min(w, 1.5))·A·lp with A = 1, lp = [−1, −2] → [1.5, 2];
    # "cispo" is a token mean: 1.75. The gradient is −capped·A / 2 tokens = [−0.75, −0.5]:
    # the clipped weight scales the gradient instead of zeroing it (unlike PPO's clip).
    lp = jnp.array([[-1.0, -2.0]])
    old = lp - jnp.array([[math.log(2.0), 0.0]])
    hyper = dict(loss_type="cispo", clip_eps_high=1.5)
    loss, m = call(losses.grpo_loss, lp, old, None, jnp.array([1.0]), jnp.ones((1, 2)), **hyper)
    close(loss, 1.75)
    close(m["cispo_clip_ratio"], 0.5)  # w = 2 > 1.5 with A > 0 on one token of two
    g = grad_of(losses.grpo_loss, 0, lp, old, None, jnp.array([1.0]), jnp.ones((1, 2)), **hyper)
    close(g, [[-0.75, -0.5]])


def test_grpo_sapo_by_hand():
    # On-policy w = 1, so the gate σ(τ(w − 1))·4/τ = σ(0)·4/τ = 2/τ: ℓ = −(2/τ)·A.
    # Row 0: A = 1 > 0 → τ_pos = 1 → ℓ = −2. Row 1: A = −1 → τ_neg = 1.05 → ℓ = 2/1.05.
    # "sapo" aggregates like "grpo" (mean of per-sequence means).
    lp = jnp.array([[-1.0, -2.0], [-0.5, -0.5]])
    mask = jnp.ones((2, 2))
    a = jnp.array([1.0, -1.0])
    loss, _ = call(losses.grpo_loss, lp, None, None, a, mask, loss_type="sapo")
    close(loss, (-2.0 + 2.0 / 1.05) / 2)
    # The gate's slope at w = 1 is τ·σ'(0)·4/τ = 1, so the on-policy gradient equals GRPO's.
    g_sapo = grad_of(losses.grpo_loss, 0, lp, None, None, a, mask, loss_type="sapo")
    g_grpo = grad_of(losses.grpo_loss, 0, lp, None, None, a, mask, loss_type="grpo")
    close(g_sapo, g_grpo)


def test_grpo_sequence_level_gspo_by_hand():
    # Log-ratios log 2 and log 8 on the two real tokens (the third is padding with a huge
    # ratio that must not count): the length-normalised sequence weight is
    # exp((log 2 + log 8)/2) = exp(log 4) = 4.
    lp = jnp.array([[-1.0, -1.0, -1.0]])
    old = lp - jnp.array([[math.log(2.0), math.log(8.0), 100.0]])
    mask = jnp.array([[1, 1, 0]])
    hyper = dict(importance_sampling_level="sequence")
    # A = 1: clip binds, ℓ = −1.2 for the sequence.
    loss, m = call(losses.grpo_loss, lp, old, None, jnp.array([1.0]), mask, **hyper)
    close(loss, -1.2)
    close(m["ratio_mean"], 4.0)
    close(m["clip_ratio/high_mean"], 1.0)  # a per-sequence flag: the one row is clipped
    # A = −1: min(−4, −1.2) = −4 → ℓ = 4 = w; ∂w/∂lp_t = w · 1/|o| = 2 on each real token.
    loss, _ = call(losses.grpo_loss, lp, old, None, jnp.array([-1.0]), mask, **hyper)
    close(loss, 4.0)
    g = grad_of(losses.grpo_loss, 0, lp, old, None, jnp.array([-1.0]), mask, **hyper)
    close(g, [[2.0, 2.0, 0.0]])


def test_grpo_sequence_equals_token_on_policy():
    # With π_old = π every weight is 1 at either level, and the gradient of "grpo" is
    # −A_i/(B·|o_i|) per real token at both (B = 2 rows): GSPO and GRPO part only once the
    # policy moves.
    lp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.1, -9.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    a = jnp.array([0.7, -1.3])
    g_seq = grad_of(
        losses.grpo_loss, 0, lp, None, None, a, mask, importance_sampling_level="sequence"
    )
    g_tok = grad_of(losses.grpo_loss, 0, lp, None, None, a, mask)
    close(g_seq, g_tok)
    close(g_tok, [[-0.7 / 6] * 3, [1.3 / 4, 1.3 / 4, 0.0]])


def test_grpo_delta_caps_the_unclipped_ratio():
    # w = 3, A = −1, ε = 0.2: plain GRPO takes min(−3, −1.2) = −3 → ℓ = 3. With δ = 2
    # (INTELLECT-2) the unclipped term is min(3, 2)·A = −2 → ℓ = 2.
    lp = jnp.array([[-1.0]])
    old = lp - math.log(3.0)
    args = (lp, old, None, jnp.array([-1.0]), jnp.ones((1, 1)))
    close(call(losses.grpo_loss, *args)[0], 3.0)
    close(call(losses.grpo_loss, *args, delta=2.0)[0], 2.0)


def test_grpo_bias_corrected_kl_by_hand():
    # One token with ref − lp = log 2: k3 = e^{log 2} − log 2 − 1 = 1 − log 2, and
    # ∂k3/∂lp = 1 − e^{ref − lp} = −1. On-policy the weight is 1 with ∂w/∂lp = 1, so the
    # bias-corrected term w·k3 has gradient k3 + ∂k3/∂lp = −log 2 (plain k3: −1). A = 0
    # leaves only the KL term, times β = 0.5.
    lp = jnp.array([[-2.0]])
    ref = lp + math.log(2.0)
    args = (lp, None, ref, jnp.array([0.0]), jnp.ones((1, 1)))
    loss, m = call(losses.grpo_loss, *args, beta=0.5, use_bias_correction_kl=True)
    close(loss, 0.5 * (1 - math.log(2.0)))
    close(m["kl"], 1 - math.log(2.0))
    g = grad_of(losses.grpo_loss, 0, *args, beta=0.5, use_bias_correction_kl=True)
    close(g, [[-0.5 * math.log(2.0)]])
    close(grad_of(losses.grpo_loss, 0, *args, beta=0.5), [[-0.5]])


def test_grpo_empty_row_adds_nothing():
    # An all-masked row (zero-length completion) contributes 0 to "grpo"'s mean of row
    # means (it still counts in B, as in TRL) and nothing to the token-mean types.
    lp = jnp.array([[-1.0, -1.0], [-1.0, -1.0]])
    mask = jnp.array([[1, 1], [0, 0]])
    a = jnp.array([2.0, 5.0])
    close(call(losses.grpo_loss, lp, None, None, a, mask)[0], (-2.0 + 0.0) / 2)
    for loss_type in ("bnpo", "dapo", "cispo"):
        loss, m = call(
            losses.grpo_loss, lp, None, None, a, mask, loss_type=loss_type, clip_eps_high=4.0
        )
        expected = 2.0 if loss_type == "cispo" else -2.0  # cispo: −1·2·(−1) per token
        close(loss, expected)
        assert np.isfinite(np.asarray(m["ratio_mean"]))
    loss, _ = call(losses.grpo_loss, lp, None, None, a, mask, importance_sampling_level="sequence")
    close(loss, -1.0)


def test_grpo_option_errors():
    args = (jnp.zeros((1, 2)), None, None, jnp.zeros(1), jnp.ones((1, 2)))
    for loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        with pytest.raises(ValueError, match=r"importance_sampling_level='sequence'.*loss_type"):
            call(
                losses.grpo_loss,
                *args,
                loss_type=loss_type,
                importance_sampling_level="sequence",
                max_completion_length=2,
            )
    with pytest.raises(ValueError, match=r"importance_sampling_level 'sentence'"):
        call(losses.grpo_loss, *args, importance_sampling_level="sentence")
    with pytest.raises(ValueError, match=r"delta=2.0.*set delta=None"):
        call(losses.grpo_loss, *args, loss_type="cispo", delta=2.0)
    with pytest.raises(ValueError, match=r"grpo loss_type 'vespo'"):
        call(losses.grpo_loss, *args, loss_type="vespo")


# =========================================================================== GRPO vs TRL


def _grpo_inputs(seed=0, batch=4, length=5):
    rng = np.random.default_rng(seed)
    lp = -rng.uniform(0.1, 3.0, (batch, length)).astype(np.float32)
    old = (lp + rng.normal(0.0, 0.3, (batch, length))).astype(np.float32)
    ref = (lp + rng.normal(0.0, 0.3, (batch, length))).astype(np.float32)
    a = rng.normal(0.0, 1.0, batch).astype(np.float32)
    # Lengths 5, 3, 1 and 0: ragged rows and an empty completion.
    mask = (np.arange(length)[None] < np.array([5, 3, 1, 0])[:batch, None]).astype(np.int64)
    return lp, old, ref, a, mask


def _trl_grpo(lp, old, ref, a, mask, *, loss_type, level, beta, eps, eps_high, delta, bias_kl):
    """TRL's GRPOTrainer._compute_loss on fixed log-probs: (loss, d loss/d lp, metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    per_token_logps = torch.tensor(lp, requires_grad=True)
    batch, length = lp.shape
    accelerator = types.SimpleNamespace(
        num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t
    )
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (
            per_token_logps,
            torch.zeros(batch, length),
            None,
        ),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps,
        epsilon_high=eps_high,
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=length,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
        accelerator=accelerator,
        args=types.SimpleNamespace(
            use_bias_correction_kl=bias_kl,
            delta=delta,
            sapo_temperature_pos=1.0,
            sapo_temperature_neg=1.05,
            steps_per_generation=1,
        ),
    )
    mask_t = torch.tensor(mask)
    inputs = {
        "prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": mask_t,
        "advantages": torch.tensor(a),
        "num_items_in_batch": mask_t.sum(),
    }
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old)
    if beta != 0.0:
        inputs["ref_per_token_logps"] = torch.tensor(ref)
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss.item(), per_token_logps.grad.numpy(), metrics


GRPO_TRL_CASES = [
    # loss_type, level, beta, eps_high, delta, bias-corrected KL, on-policy
    ("grpo", "token", 0.0, None, None, False, False),
    ("grpo", "token", 0.04, 0.28, None, True, False),
    ("grpo", "token", 0.04, None, None, False, True),
    ("bnpo", "token", 0.04, 0.28, None, False, False),
    ("dr_grpo", "token", 0.0, None, None, False, False),
    ("dapo", "token", 0.04, 0.28, 1.5, True, False),
    ("grpo", "token", 0.0, 0.28, 1.1, False, False),  # δ below 1 + ε_high: flags read w capped
    ("dapo", "token", 0.0, None, None, False, True),
    ("cispo", "token", 0.0, 5.0, None, False, False),
    ("cispo", "token", 0.04, 1.1, None, True, False),
    ("sapo", "token", 0.0, None, None, False, False),
    ("sapo", "token", 0.04, None, None, True, False),
    ("grpo", "sequence", 0.0, None, None, False, False),
    ("grpo", "sequence", 0.04, 0.28, 1.5, True, False),
    ("sapo", "sequence", 0.0, None, None, False, False),
    ("grpo", "sequence", 0.0, None, None, False, True),
]


@pytest.mark.parametrize("loss_type,level,beta,eps_high,delta,bias_kl,on_policy", GRPO_TRL_CASES)
def test_grpo_loss_matches_trl(loss_type, level, beta, eps_high, delta, bias_kl, on_policy):
    lp, old, ref, a, mask = _grpo_inputs()
    old = None if on_policy else old
    eps = 0.2
    trl_loss, trl_grad, trl_m = _trl_grpo(
        lp, old, ref, a, mask, loss_type=loss_type, level=level, beta=beta, eps=eps,
        eps_high=eps if eps_high is None else eps_high, delta=delta, bias_kl=bias_kl,
    )  # fmt: skip
    hyper = dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        clip_eps=eps,
        clip_eps_high=eps_high,
        delta=delta,
        use_bias_correction_kl=bias_kl,
        max_completion_length=lp.shape[1],
    )
    args = (jnp.asarray(lp), None if old is None else jnp.asarray(old), jnp.asarray(ref))
    args = args + (jnp.asarray(a), jnp.asarray(mask))
    loss, m = call(losses.grpo_loss, *args, **hyper)
    close(loss, trl_loss, TRL_TOL)
    close(grad_of(losses.grpo_loss, 0, *args, **hyper), trl_grad, TRL_TOL)
    if beta != 0.0:
        close(m["kl"], trl_m["kl"], TRL_TOL)
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    names = {"cispo": ["cispo_clip_ratio"], "sapo": []}.get(loss_type, names)
    for name in names:
        close(m[name], trl_m[name], TRL_TOL)


# =========================================================================== group advantages


def test_group_advantages_scale_rewards_modes():
    r = jnp.array([0.0, 1.0, 2.0, 3.0])
    # Group means 0.5 and 2.5 → centred [−½, ½, −½, ½] in every mode.
    centred = np.array([-0.5, 0.5, -0.5, 0.5])
    a, std = call(adv_lib.group_advantages, r, group_size=2, scale_rewards="none")
    close(a, centred)
    close(std, [math.sqrt(0.5)] * 2)  # the group stds, still returned for frac_reward_zero_std
    a, std = call(adv_lib.group_advantages, r, group_size=2, scale_rewards="group")
    close(a, centred / (math.sqrt(0.5) + 1e-4))  # std of {0, 1} with ddof 1 = √½
    # "batch": one std over all four rewards, var = (2.25 + .25 + .25 + 2.25)/3 = 5/3.
    a, std = call(adv_lib.group_advantages, r, group_size=2, scale_rewards="batch")
    close(a, centred / (math.sqrt(5 / 3) + 1e-4))
    close(std, [math.sqrt(5 / 3)] * 2)
    # bools are TRL's aliases, and the old scale_by_std switch still works.
    for alias, name in ((True, "group"), (False, "none")):
        close(
            call(adv_lib.group_advantages, r, group_size=2, scale_rewards=alias)[0],
            call(adv_lib.group_advantages, r, group_size=2, scale_rewards=name)[0],
        )
    close(
        call(adv_lib.group_advantages, r, group_size=2, scale_by_std=False)[0],
        call(adv_lib.group_advantages, r, group_size=2, scale_rewards="none")[0],
    )


def test_group_advantages_tied_group_is_zero():
    # A group of equal rewards has mean = each reward and std 0: advantages exactly 0 and
    # the std that TRL counts in frac_reward_zero_std is 0.
    a, std = call(adv_lib.group_advantages, jnp.array([1.0, 1.0, 0.0, 1.0]), group_size=2)
    close(a[:2], [0.0, 0.0])
    close(std[0], 0.0)
    with pytest.raises(ValueError, match=r"scale_rewards 'global'"):
        call(adv_lib.group_advantages, jnp.zeros(4), group_size=2, scale_rewards="global")


# =========================================================================== RLOO


def test_rloo_advantages_by_hand():
    # Group [1, 2, 3]: the others' means are 2.5, 2, 1.5 → A = [−1.5, 0, 1.5]
    # (= k/(k−1)·(r − mean) = 1.5·[−1, 0, 1]). A tied group [2, 2, 2] gives zeros.
    r = jnp.array([1.0, 2.0, 3.0, 2.0, 2.0, 2.0])
    a = call(adv_lib.rloo_advantages, r, group_size=3)
    close(a, [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # normalize_advantages whitens the batch: mean 0, unbiased std of [−1.5, 0, 1.5, 0, 0, 0]
    # is sqrt(4.5/5) = √0.9.
    a = call(adv_lib.rloo_advantages, r, group_size=3, normalize_advantages=True)
    close(a, np.array([-1.5, 0, 1.5, 0, 0, 0]) / (math.sqrt(0.9) + 1e-4))


def test_rloo_rewards_fold_k1_kl():
    # KL per row = Σ (old − ref)·m: row 0 has 0.5 + 0.5 (the 9 is padding) = 1, row 1 has
    # 1 − 0.5 = 0.5 (k1 may be negative per token). r = s − 0.1·KL. The kl metric is the
    # token mean: (0.5 + 0.5 + 1 − 0.5) / 4 = 0.375.
    old = jnp.array([[-1.0, -1.0, 0.0], [-1.0, -2.0, -1.0]])
    ref = jnp.array([[-1.5, -1.5, -9.0], [-2.0, -1.5, -1.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0]])
    r, m = call(adv_lib.rloo_rewards, jnp.array([1.0, 0.0]), old, ref, mask, beta=0.1)
    close(r, [1.0 - 0.1, 0.0 - 0.05])
    close(m["kl"], 0.375)
    # Clipping applies to the score before the KL term.
    r, _ = call(
        adv_lib.rloo_rewards, jnp.array([5.0, -5.0]), old, ref, mask, beta=0.1,
        reward_clip_range=(-1.0, 1.0),
    )  # fmt: skip
    close(r, [1.0 - 0.1, -1.0 - 0.05])


def test_rloo_loss_by_hand():
    # Sequence log-ratio 0.1 + 0.2 = 0.3 (padding excluded) → ρ = e^0.3 ≈ 1.35 > 1.2.
    # Row 0, A = 1: the clip binds, ℓ = −1.2. Row 1, A = −2, ρ = e^0 = 1: ℓ = 2.
    lp = jnp.array([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    old = lp - jnp.array([[0.1, 0.2, 50.0], [0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    loss, m = call(losses.rloo_loss, lp, old, jnp.array([1.0, -2.0]), mask)
    close(loss, (-1.2 + 2.0) / 2)
    close(m["clip_ratio/high_mean"], 0.5)
    close(m["clip_ratio/high_max"], 1.0)
    close(m["clip_ratio/low_min"], 0.0)
    # Gradient: row 0 is clipped (0); row 1 is −A·ρ·∂(Σ lp)/∂lp_t / B = 2·1/2 = 1 per token.
    g = grad_of(losses.rloo_loss, 0, lp, old, jnp.array([1.0, -2.0]), mask)
    close(g, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


def _trl_rloo_loss(lp, old_logps, a, mask, eps, eps_high):
    from trl.trainer.rloo_trainer import RLOOTrainer

    per_token_logps = torch.tensor(lp, requires_grad=True)
    batch, length = lp.shape
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (
            per_token_logps,
            torch.zeros(batch, length),
            None,
        ),
        epsilon_low=eps,
        epsilon_high=eps_high,
        aux_loss_enabled=False,
        model=types.SimpleNamespace(training=True),
        _metrics={"train": collections.defaultdict(list)},
        accelerator=types.SimpleNamespace(reduce=lambda t, reduction: t, gather=lambda t: t),
    )
    inputs = {
        "prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": torch.tensor(mask),
        "old_logps": torch.tensor(old_logps),
        "advantages": torch.tensor(a),
    }
    loss = RLOOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss.item(), per_token_logps.grad.numpy(), metrics


@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_rloo_loss_matches_trl(eps_high):
    lp, old, _, a, mask = _grpo_inputs(seed=1)
    old = (lp + (old - lp) * 0.3).astype(np.float32)  # keep summed log-ratios near the clip range
    old_logps = (old * mask).sum(-1)  # TRL stores old sequence log-probs
    trl_loss, trl_grad, trl_m = _trl_rloo_loss(lp, old_logps, a, mask, 0.2, eps_high)
    args = (jnp.asarray(lp), jnp.asarray(old), jnp.asarray(a), jnp.asarray(mask))
    loss, m = call(losses.rloo_loss, *args, clip_eps_high=eps_high)
    close(loss, trl_loss, TRL_TOL)
    close(grad_of(losses.rloo_loss, 0, *args, clip_eps_high=eps_high), trl_grad, TRL_TOL)
    for name in trl_m:
        if name.startswith("clip_ratio/"):
            close(m[name], trl_m[name], TRL_TOL)


def _trl_rloo_advantages(scores, old, ref, mask, *, group_size, beta, normalize, clip_range):
    """TRL's RLOOTrainer._generate_and_score_completions on fixed rollouts and rewards."""
    from trl.trainer import rloo_trainer

    batch, length = old.shape
    logps = iter([torch.tensor(old), torch.tensor(ref)])  # policy first, then reference
    stub = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(
            device="cpu", process_index=0, reduce=lambda t, reduction: t, gather=lambda t: t
        ),
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        ref_model=object(),
        args=types.SimpleNamespace(
            per_device_train_batch_size=batch, gradient_checkpointing_kwargs=None
        ),
        _generate=lambda prompts: (
            [[1]] * batch,
            [[7] * int(n) for n in mask.sum(-1)],
            ["c"] * batch,
        ),
        _tokenizer=types.SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: (next(logps), None, None),
        _calculate_rewards=lambda *a: torch.tensor(scores)[:, None],
        num_generations=group_size,
        reward_weights=torch.ones(1),
        reward_clip_range=clip_range,
        beta=beta,
        normalize_advantages=normalize,
        reward_func_names=["r"],
        _metrics={"train": collections.defaultdict(list)},
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": {"r": []},
            "advantages": [],
            "extra": collections.defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    out = rloo_trainer.RLOOTrainer._generate_and_score_completions(stub, [{"prompt": "p"}] * batch)
    kl = stub._metrics["train"]["kl"][-1] if beta else 0.0
    return out["advantages"].numpy(), kl


@pytest.mark.parametrize(
    "beta,normalize,clip_range",
    [(0.0, False, None), (0.05, False, None), (0.05, True, None), (0.1, False, (-0.5, 0.5))],
)
def test_rloo_advantages_match_trl(monkeypatch, beta, normalize, clip_range):
    from trl.trainer import rloo_trainer

    # Single process: accelerate's gathers are the identity.
    monkeypatch.setattr(rloo_trainer, "gather", lambda t: t)
    monkeypatch.setattr(rloo_trainer, "gather_object", lambda x: x)
    rng = np.random.default_rng(2)
    batch, length, k = 6, 4, 3
    # TRL pads completions itself, so the rows are left-aligned with lengths ≥ 1.
    mask = (np.arange(length)[None] < np.array([4, 2, 1, 3, 4, 4])[:, None]).astype(np.int64)
    old = (-rng.uniform(0.1, 2.0, (batch, length)) * mask).astype(np.float32)
    ref = (old + rng.normal(0, 0.5, (batch, length)) * mask).astype(np.float32)
    scores = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0], np.float32)  # last group tied
    trl_adv, trl_kl = _trl_rloo_advantages(
        scores, old, ref, mask, group_size=k, beta=beta, normalize=normalize, clip_range=clip_range
    )
    r, m = call(
        adv_lib.rloo_rewards, jnp.asarray(scores), jnp.asarray(old), jnp.asarray(ref),
        jnp.asarray(mask), beta=beta, reward_clip_range=clip_range,
    )  # fmt: skip
    a = call(adv_lib.rloo_advantages, r, group_size=k, normalize_advantages=normalize)
    close(a, trl_adv, TRL_TOL)
    close(m["kl"], trl_kl, TRL_TOL)


# =========================================================================== REINFORCE++


MASK_2x3 = jnp.array([[1, 1, 0], [1, 1, 1]])


def test_reinforce_pp_by_hand():
    # Scores [1, 0], no KL: the score sits on each row's last real token → returns (γ = 1)
    # [[1, 1, ·], [0, 0, 0]]. Over the 5 real tokens μ = 2/5 = 0.4 and the population
    # variance is (2·0.6² + 3·0.4²)/5 = 0.24, so A = (G − 0.4)/√0.24 (padding → 0).
    a, g = call(
        adv_lib.reinforce_pp_advantages, jnp.array([1.0, 0.0]), jnp.zeros((2, 3)), MASK_2x3,
        kl_coef=0.1,
    )  # fmt: skip
    close(g, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    s = math.sqrt(0.24)
    close(a, [[0.6 / s, 0.6 / s, 0.0], [-0.4 / s, -0.4 / s, -0.4 / s]], 1e-5)


def test_reinforce_pp_token_kl_and_gamma():
    # KL 0.5 on row 0's first token and 1 on row 1's last, coefficient 0.1: token rewards
    # [[−0.05, 1, ·], [0, 0, −0.1]] → reward-to-go [[0.95, 1], [−0.1, −0.1, −0.1]].
    kl = jnp.array([[0.5, 0.0, 7.0], [0.0, 0.0, 1.0]])  # the 7 is under padding
    _, g = call(adv_lib.reinforce_pp_advantages, jnp.array([1.0, 0.0]), kl, MASK_2x3, kl_coef=0.1)
    close(g, [[0.95, 1.0, 0.0], [-0.1, -0.1, -0.1]])
    # γ = 0.5: G_0 = −0.05 + 0.5·1 = 0.45 for row 0; row 1: [−0.025, −0.05, −0.1].
    _, g = call(
        adv_lib.reinforce_pp_advantages, jnp.array([1.0, 0.0]), kl, MASK_2x3, kl_coef=0.1,
        gamma=0.5,
    )  # fmt: skip
    close(g, [[0.45, 1.0, 0.0], [-0.025, -0.05, -0.1]])
    # Without std normalisation only the token mean is subtracted: μ = (0.95 + 1 − 0.3)/5.
    a, _ = call(
        adv_lib.reinforce_pp_advantages, jnp.array([1.0, 0.0]), kl, MASK_2x3, kl_coef=0.1,
        std_normalize=False,
    )  # fmt: skip
    mu = 1.65 / 5
    close(a, [[0.95 - mu, 1.0 - mu, 0.0], [-0.1 - mu] * 3])


def test_reinforce_baseline_subtracts_group_mean():
    # Groups of 2: [1, 0] → [½, −½]; a tied group [3, 3] → [0, 0] (no signal). One token
    # each, so returns are those numbers; μ = 0, σ² = (¼ + ¼)/4 = 1/8.
    mask = jnp.ones((4, 1))
    a, g = call(
        adv_lib.reinforce_pp_advantages, jnp.array([1.0, 0.0, 3.0, 3.0]), jnp.zeros((4, 1)),
        mask, kl_coef=0.0, estimator="reinforce_baseline", group_size=2,
    )  # fmt: skip
    close(g[:, 0], [0.5, -0.5, 0.0, 0.0])
    close(a[:, 0], np.array([0.5, -0.5, 0.0, 0.0]) * math.sqrt(8.0), 1e-5)


def test_reinforce_pp_empty_row_and_errors():
    # A zero-length row gets no reward, no return, no advantage and no say in μ, σ.
    mask = jnp.array([[1, 1], [0, 0]])
    a, g = call(
        adv_lib.reinforce_pp_advantages, jnp.array([1.0, 5.0]), jnp.zeros((2, 2)), mask,
        kl_coef=0.0, std_normalize=False,
    )  # fmt: skip
    close(g, [[1.0, 1.0], [0.0, 0.0]])
    close(a, [[0.0, 0.0], [0.0, 0.0]])  # μ = 1 over row 0's two tokens
    with pytest.raises(ValueError, match=r"gamma=0.9"):
        call(
            adv_lib.reinforce_pp_advantages, jnp.zeros(2), jnp.zeros((2, 2)), mask, kl_coef=0.0,
            estimator="reinforce_baseline", group_size=2, gamma=0.9,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"group_size >= 2"):
        call(
            adv_lib.reinforce_pp_advantages, jnp.zeros(2), jnp.zeros((2, 2)), mask, kl_coef=0.0,
            estimator="reinforce_baseline",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"estimator 'grpo'"):
        call(
            adv_lib.reinforce_pp_advantages, jnp.zeros(2), jnp.zeros((2, 2)), mask, kl_coef=0.0,
            estimator="grpo",
        )  # fmt: skip


# =========================================================================== DAPO helpers


def test_soft_overlong_punishment_by_hand_and_trl():
    # L = 100, C = 20: free up to 80; 90 is halfway down the ramp (−0.5); 100 is at −1;
    # beyond L is −1; an empty completion is never punished.
    lengths = np.array([0, 80, 81, 90, 100, 101])
    got = call(adv_lib.soft_overlong_punishment, jnp.asarray(lengths), max_completion_len=100,
               soft_punish_cache=20)  # fmt: skip
    close(got, [0.0, 0.0, -0.05, -0.5, -1.0, -1.0])
    from trl.rewards import get_soft_overlong_punishment

    for cache in (0, 1, 20, 100):
        trl_fn = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=cache)
        expected = trl_fn([[1] * int(n) for n in lengths])
        got = call(
            adv_lib.soft_overlong_punishment, jnp.asarray(lengths), max_completion_len=100,
            soft_punish_cache=cache,
        )  # fmt: skip
        close(got, expected)
    with pytest.raises(ValueError, match=r"soft_punish_cache"):
        adv_lib.soft_overlong_punishment(jnp.asarray(lengths), max_completion_len=10,
                                         soft_punish_cache=20)  # fmt: skip


def test_mask_truncated_completions():
    # EOS = 2, pad = 0. Row 0 ends on EOS; row 1 ran to the limit without one (truncated);
    # row 2 is empty (not truncated: nothing to mask); row 3 is a lone EOS.
    ids = jnp.array([[5, 2, 0], [5, 6, 7], [0, 0, 0], [2, 0, 0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]])
    fn = functools.partial(adv_lib.mask_truncated_completions, eos_token_ids=(2,), pad_token_id=0)
    new_mask, truncated = jax.jit(fn)(ids, mask)
    np.testing.assert_array_equal(truncated, [False, True, False, False])
    np.testing.assert_array_equal(new_mask, [[1, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]])
    # Several EOS ids: 7 also finishes, so row 1 is then complete.
    _, truncated = adv_lib.mask_truncated_completions(ids, mask, (2, 7))
    np.testing.assert_array_equal(truncated, [False, False, False, False])


def test_dynamic_sampling_keep_mask():
    # Groups of 2: [1, 1] tied (all right), [0, 1] mixed, [0.5, 0.5] tied → keep only the
    # middle group's rows; two groups dropped.
    keep, dropped = jax.jit(adv_lib.dynamic_sampling_keep_mask, static_argnums=1)(
        jnp.array([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2
    )
    np.testing.assert_array_equal(keep, [False, False, True, True, False, False])
    assert int(dropped) == 2
    # The dropped groups are exactly those whose GRPO advantages are all zero.
    a, _ = adv_lib.group_advantages(jnp.array([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2)
    np.testing.assert_array_equal(np.asarray(a) != 0, np.asarray(keep))


# =========================================================================== GRPO prepare vs TRL


def _trl_grpo_prepare(scores, completion_ids_list, *, group_size, scale_rewards, mask_truncated):
    """TRL's GRPOTrainer._generate_and_score_completions on fixed completions and rewards
    (β = 0, one update per rollout, so no model forward): (advantages, mask, metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    batch = len(scores)
    stub = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(
            device="cpu",
            process_index=0,
            num_processes=1,
            reduce=lambda t, reduction: t,
            gather=lambda t: t,
        ),  # fmt: skip
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None,
        tools=None,
        environments=None,
        _generate=lambda prompts: (
            [[1]] * batch,
            completion_ids_list,
            None,
            ["c"] * batch,
            None,
            {},
            None,
            None,
        ),  # fmt: skip
        _tokenizer=types.SimpleNamespace(pad_token_id=0),
        eos_token_ids=[2],
        pad_to_multiple_of=None,
        mask_truncated_completions=mask_truncated,
        args=types.SimpleNamespace(
            per_device_train_batch_size=batch,
            gradient_checkpointing_kwargs=None,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
        ),  # fmt: skip
        num_iterations=1,
        use_vllm=False,
        beta=0.0,
        _calculate_rewards=lambda *a: torch.tensor(scores, dtype=torch.float32)[:, None],
        num_generations=group_size,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.ones(1),
        scale_rewards=scale_rewards,
        reward_func_names=["r"],
        _metrics={"train": collections.defaultdict(list)},
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": {"r": []},
            "advantages": [],
            "extra": collections.defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    out = GRPOTrainer._generate_and_score_completions(stub, [{"prompt": "p"}] * batch)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return out["advantages"].numpy(), out["completion_mask"].numpy(), metrics


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_and_truncation_match_trl(monkeypatch, scale_rewards):
    from trl.trainer import grpo_trainer

    monkeypatch.setattr(grpo_trainer, "gather", lambda t: t)
    monkeypatch.setattr(grpo_trainer, "gather_object", lambda x: x)
    # Groups of 3; the middle group is tied. EOS = 2, pad = 0: rows 1 and 4 end without EOS
    # (truncated), row 6 is a lone EOS.
    completions = [
        [5, 2],
        [5, 6, 7, 8],
        [9, 2],
        [3, 3, 2],
        [4, 4, 4, 4],
        [2],
        [2],
        [6, 6, 2],
        [1, 2],
    ]
    scores = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0, -1.0, 3.0, 0.25]
    trl_adv, trl_mask, trl_m = _trl_grpo_prepare(
        scores, completions, group_size=3, scale_rewards=scale_rewards, mask_truncated=True
    )
    a, std = call(
        adv_lib.group_advantages, jnp.asarray(scores), group_size=3, scale_rewards=scale_rewards
    )
    close(a, trl_adv, TRL_TOL)
    close(jnp.mean(std == 0), trl_m["frac_reward_zero_std"])
    # Right-padded ids and mask as jaxrlhf's sampler produces them.
    length = max(map(len, completions))
    ids = np.array([c + [0] * (length - len(c)) for c in completions])
    mask = np.array([[1] * len(c) + [0] * (length - len(c)) for c in completions])
    new_mask, truncated = adv_lib.mask_truncated_completions(ids, mask, (2,), 0)
    np.testing.assert_array_equal(new_mask, trl_mask)
    np.testing.assert_array_equal(truncated, [False, True, False, False, True] + [False] * 4)
