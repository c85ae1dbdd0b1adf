"""Offline preference losses: KTO, ORPO, CPO / SimPO, and their sequence log-prob helpers.

Numbers worked out by hand (the comments say how), then TRL 1.16's own code on the same
inputs: `KTOTrainer._compute_loss`, `ORPOTrainer.get_batch_loss_metrics` and
`CPOTrainer.get_batch_loss_metrics`, called unbound with a `SimpleNamespace` standing in
for the trainer (it carries what the method reads; the model forward returns fixed
log-probabilities), so the loss, its gradient and the logged metrics are TRL's.
"""

import collections
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses

torch = pytest.importorskip("torch")


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + eˣ)."""
    return math.log1p(math.exp(x))


def call(fn, *args, **hyper):
    """`fn(*args, **hyper)` compiled with `jax.jit`; config errors still raise at trace time."""
    return jax.jit(functools.partial(fn, **hyper))(*args)


def grads_of(fn, argnums, *args, **hyper):
    return jax.jit(jax.grad(lambda *a: fn(*a, **hyper)[0], argnums=argnums))(*args)


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# float32 on both sides through a few exp/log terms: agreement to ~1e-6 relative.
TRL_TOL = 1e-5


# =========================================================================== helpers


def test_sequence_logps_and_nll_match_trl():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(3, 6))
    labels[:, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding of a shorter completion
    # Token log-probs the jaxrlhf way: position t predicts label t + 1.
    log_softmax = jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), axis=-1)
    target = np.where(labels[:, 1:] == -100, 0, labels[:, 1:])
    token_logps = jnp.take_along_axis(log_softmax, jnp.asarray(target)[..., None], -1)[..., 0]
    mask = jnp.asarray(labels[:, 1:] != -100)
    for average in (False, True):
        expected = CPOTrainer.get_batch_logps(
            torch.tensor(logits), torch.tensor(labels), average_log_prob=average
        )
        close(losses.sequence_logps(token_logps, mask, average=average), expected.numpy(), TRL_TOL)
    # The NLL term is torch's token-mean cross entropy over the non-ignored labels.
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:, :-1]).reshape(-1, 11), torch.tensor(labels[:, 1:]).reshape(-1)
    )
    close(losses.nll_loss(token_logps, mask), expected.item(), TRL_TOL)
    # An empty row averages to 0, not NaN (TRL would give 0/0).
    close(losses.sequence_logps(token_logps, jnp.zeros_like(mask), average=True), [0.0] * 3)


def test_log1mexp_both_branches_and_gradient():
    # log(1 − eˣ) on each side of −log 2, and its derivative −eˣ/(1 − eˣ) is finite.
    x = jnp.array([-5.0, -1.0, -0.6931471805599453, -0.1, -1e-4])
    close(losses.log1mexp(x), np.log(-np.expm1(np.asarray(x, np.float64))), 1e-6)
    g = jax.grad(lambda v: jnp.sum(losses.log1mexp(v)))(x)
    ex = np.exp(np.asarray(x, np.float64))
    close(g, -ex / (1 - ex), 1e-4)


# =========================================================================== KTO by hand


def test_kto_by_hand():
    # KL pairs: gaps log π − log π_ref = [0.2, 0.4, −0.3] → z0 = mean = 0.1.
    # β = 1. Row 0 desirable with h = 0.1 = z0 → 1 − σ(0) = ½, weight λ_D = 2 → 1.
    # Row 1 undesirable with h = 0.1 → 1 − σ(z0 − h) = ½, weight 1 → ½.
    # Row 2 desirable with h = 0.1 + log 3 → 1 − σ(log 3) = 1 − ¾ = ¼, weight 2 → ½.
    # loss = mean over the 3 rows = (1 + ½ + ½)/3 = 2/3.
    ref = jnp.array([-5.0, -4.0, -3.0])
    lp = ref + jnp.array([0.1, 0.1, 0.1 + math.log(3.0)])
    ref_kl = jnp.array([-2.0, -2.0, -2.0])
    lp_kl = ref_kl + jnp.array([0.2, 0.4, -0.3])
    labels = jnp.array([True, False, True])
    hyper = dict(beta=1.0, desirable_weight=2.0)
    loss, m = call(losses.kto_loss, lp, ref, lp_kl, ref_kl, labels, **hyper)
    close(loss, 2 / 3)
    close(m["kl"], 0.1)
    close(m["rewards/chosen"], (0.1 + 0.1 + math.log(3.0)) / 2)  # β·h over desirable rows
    close(m["rewards/rejected"], 0.1)
    close(m["rewards/margins"], (0.2 + math.log(3.0)) / 2 - 0.1)
    close(m["logps/chosen"], (lp[0] + lp[2]) / 2)
    close(m["logps/rejected"], lp[1])
    # z0 is a constant: no gradient reaches the KL pairs. For a desirable row the slope is
    # −λ_D·β·σ(1 − σ): row 0 −2·¼, row 2 −2·(¾·¼); divided by the 3 rows.
    g_lp, g_kl = grads_of(losses.kto_loss, (0, 2), lp, ref, lp_kl, ref_kl, labels, **hyper)
    close(g_kl, [0.0, 0.0, 0.0])
    close(g_lp, [-0.5 / 3, 0.25 / 3, -2 * 0.1875 / 3])  # row 1: +β·σ(1 − σ) = ¼


def test_kto_reference_point_clamped_at_zero():
    # KL gaps with a negative mean (−0.2) give z0 = 0, TRL's clamp(min=0): the losses are
    # then those of β·h alone. h = log 3, β = 1 → desirable 1 − ¾.
    lp, ref = jnp.array([math.log(3.0)]), jnp.zeros(1)
    loss, m = call(
        losses.kto_loss, lp, ref, jnp.array([-0.2]), jnp.zeros(1), jnp.array([True]), beta=1.0
    )
    close(m["kl"], 0.0)
    close(loss, 0.25)


def test_kto_apo_zero_unpaired_by_hand():
    # No reference point: desirable 1 − σ(β·h), undesirable σ(β·h). h = log 3, β = 1:
    # ¼ and ¾, mean ½. No KL pairs needed; kl is reported as 0.
    lp = jnp.array([math.log(3.0), math.log(3.0)])
    loss, m = call(
        losses.kto_loss, lp, jnp.zeros(2), None, None, jnp.array([True, False]), beta=1.0,
        loss_type="apo_zero_unpaired",
    )  # fmt: skip
    close(loss, 0.5)
    close(m["kl"], 0.0)


def test_kto_one_sided_batch_and_padding_rows():
    # Only desirable rows: the rejected metrics have no rows and read 0 (TRL leaves them
    # out); a padding row (weight 0) changes neither the loss, z0 nor the metrics.
    lp, ref = jnp.array([0.5, 0.3, 99.0]), jnp.zeros(3)
    lp_kl, ref_kl = jnp.array([0.1, 0.3, 50.0]), jnp.zeros(3)
    labels = jnp.array([True, True, False])
    w = jnp.array([1.0, 1.0, 0.0])
    loss, m = call(losses.kto_loss, lp, ref, lp_kl, ref_kl, labels, weights=w)
    loss2, m2 = call(losses.kto_loss, lp[:2], ref[:2], lp_kl[:2], ref_kl[:2], labels[:2])
    close(loss, loss2)
    close(m["kl"], 0.2)  # (0.1 + 0.3)/2, the padding row's 50 ignored
    for name in m2:
        close(m[name], m2[name])
    close(m["rewards/rejected"], 0.0)
    close(m["logps/rejected"], 0.0)


def test_kto_errors():
    args = (jnp.zeros(2), jnp.zeros(2), None, None, jnp.array([True, False]))
    with pytest.raises(ValueError, match=r"policy_kl_logps and ref_kl_logps"):
        call(losses.kto_loss, *args)
    with pytest.raises(ValueError, match=r"kto loss_type 'bco'"):
        call(losses.kto_loss, *args, loss_type="bco")
    with pytest.raises(ValueError, match=r"kto beta must be > 0"):
        call(losses.kto_loss, *args, loss_type="apo_zero_unpaired", beta=0.0)


# =========================================================================== KTO data helpers


def test_unpair_matches_trl():
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    prompts, chosen, rejected = ["p0", "p1", "p2"], ["c0", "c1", "c2"], ["r0", "r1", "r2"]
    for batch_size in (1000, 2):
        # Per block: the chosen rows, then the rejected ones; 2 gives [c0 c1 r0 r1 | c2 r2].
        rows = losses.unpair(prompts, chosen, rejected, batch_size=batch_size)
        ds = Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
        expected = unpair_preference_dataset(ds, batch_size=batch_size)
        assert rows == [dict(r) for r in expected]
    assert [r["completion"] for r in losses.unpair(prompts, chosen, rejected, batch_size=2)] == [
        "c0", "c1", "r0", "r1", "c2", "r2",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"as many prompts"):
        losses.unpair(prompts, chosen, rejected[:2])


def test_kto_kl_pair_indices():
    # TRL rotates completions by one inside each block of per_device_train_batch_size rows:
    # (x1, y_n), (x2, y1), …. Blocks of 3 over 5 rows: [0 1 2] → [2 0 1]; the short last
    # block [3 4] → [4 3]. No row is paired with its own completion when a block has ≥ 2.
    np.testing.assert_array_equal(losses.kto_kl_pair_indices(5, 3), [2, 0, 1, 4, 3])
    np.testing.assert_array_equal(losses.kto_kl_pair_indices(4, 4), [3, 0, 1, 2])
    np.testing.assert_array_equal(losses.kto_kl_pair_indices(2, 1), [0, 1])  # one-row blocks
    with pytest.raises(ValueError, match=r"batch_size must be >= 1"):
        losses.kto_kl_pair_indices(3, 0)


# =========================================================================== KTO vs TRL


def _trl_kto(per_token, ref_logps, kl_per_token, ref_kl_logps, labels, *, loss_type, beta, dw, uw):
    """TRL's KTOTrainer._compute_loss with precomputed reference log-probs and a stand-in
    model whose forward returns fixed per-token log-probs: (loss, d loss/d per_token, metrics).
    """
    from trl.trainer.kto_trainer import KTOTrainer

    batch, length = per_token.shape
    seq = length + 1  # input_ids are one longer than the per-token log-probs
    main_ids = torch.zeros(batch, seq, dtype=torch.long)
    kl_ids = torch.ones(batch, seq, dtype=torch.long)
    policy_tokens = torch.tensor(per_token, requires_grad=True)

    def model(input_ids, **kwargs):
        logps = policy_tokens if input_ids is main_ids else torch.tensor(kl_per_token)
        zeros = torch.zeros(batch, length)
        return types.SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)

    calculate_kl = loss_type == "kto"
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t),
        calculate_KL=calculate_kl,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    stub._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, stub)
    ones = torch.ones(batch, seq, dtype=torch.long)
    inputs = {
        "input_ids": main_ids,
        "attention_mask": ones,
        "completion_mask": ones,
        "label": torch.tensor(labels),
        "ref_logps": torch.tensor(ref_logps),
    }
    if calculate_kl:
        inputs |= {
            "KL_input_ids": kl_ids,
            "KL_attention_mask": ones,
            "KL_completion_mask": ones,
            "ref_KL_logps": torch.tensor(ref_kl_logps),
        }
    loss = KTOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss.item(), policy_tokens.grad.numpy(), metrics


KTO_CASES = [
    # loss_type, β, desirable_weight, undesirable_weight, labels, KL gap shift
    ("kto", 0.1, 1.0, 1.0, [True, False, True, False, False], 0.0),
    ("kto", 0.5, 1.33, 1.0, [True, True, True, False, True], 0.0),
    ("kto", 0.1, 1.0, 1.0, [True, False, True, False, False], -3.0),  # z0 clamped to 0
    ("kto", 0.1, 1.0, 1.0, [True, True, True, True, True], 0.0),  # no undesirable row
    ("apo_zero_unpaired", 0.1, 1.0, 2.0, [True, False, True, False, False], 0.0),
]


@pytest.mark.parametrize("loss_type,beta,dw,uw,labels,kl_shift", KTO_CASES)
def test_kto_loss_matches_trl(loss_type, beta, dw, uw, labels, kl_shift):
    rng = np.random.default_rng(3)
    batch, length = len(labels), 4
    per_token = -rng.uniform(0.1, 2.0, (batch, length)).astype(np.float32)
    ref_logps = (per_token.sum(-1) + rng.normal(0, 2.0, batch)).astype(np.float32)
    kl_per_token = -rng.uniform(0.1, 2.0, (batch, length)).astype(np.float32)
    # KL-pair gaps log π − log π_ref are positive (z0 > 0) unless shifted below zero.
    gaps = rng.uniform(0.2, 1.0, batch) + kl_shift
    ref_kl_logps = (kl_per_token.sum(-1) - gaps).astype(np.float32)
    trl_loss, trl_grad, trl_m = _trl_kto(
        per_token, ref_logps, kl_per_token, ref_kl_logps, labels, loss_type=loss_type,
        beta=beta, dw=dw, uw=uw,
    )  # fmt: skip
    use_kl = loss_type == "kto"
    args = (
        jnp.asarray(per_token.sum(-1)),
        jnp.asarray(ref_logps),
        jnp.asarray(kl_per_token.sum(-1)) if use_kl else None,
        jnp.asarray(ref_kl_logps) if use_kl else None,
        jnp.asarray(labels),
    )
    hyper = dict(loss_type=loss_type, beta=beta, desirable_weight=dw, undesirable_weight=uw)
    loss, m = call(losses.kto_loss, *args, **hyper)
    close(loss, trl_loss, TRL_TOL)
    (g,) = grads_of(losses.kto_loss, (0,), *args, **hyper)
    # d loss / d token = d loss / d (Σ tokens), the same for every token of a row.
    close(np.broadcast_to(np.asarray(g)[:, None], trl_grad.shape), trl_grad, TRL_TOL)
    if loss_type == "kto":
        assert (trl_m["kl"] == 0.0) == (kl_shift < 0)  # z0 > 0, or the clamp is exercised
    for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                 "rewards/margins"):  # fmt: skip
        if name in trl_m:
            close(m[name], trl_m[name], TRL_TOL)
    assert ("rewards/rejected" in trl_m) == (not all(labels))


# =========================================================================== ORPO


def test_orpo_by_hand():
    # p̄_c = log ½ → odds 1, log-odds 0; p̄_r = log ¼ → odds ⅓, log-odds −log 3.
    # log_odds = 0 − (−log 3) = log 3; log σ(log 3) = log ¾. With nll = 1 and β = 0.1:
    # loss = 1 − 0.1·log ¾.
    p_c, p_r = jnp.array([math.log(0.5)]), jnp.array([math.log(0.25)])
    loss, m = call(losses.orpo_loss, p_c, p_r, jnp.array(1.0))
    close(loss, 1.0 - 0.1 * math.log(0.75))
    close(m["log_odds_chosen"], math.log(3.0))
    close(m["log_odds_ratio"], math.log(0.75))  # TRL's name for mean log σ(log_odds)
    close(m["nll_loss"], 1.0)
    close(m["rewards/chosen"], 0.1 * math.log(0.5))
    close(m["rewards/margins"], 0.1 * math.log(2.0))
    close(m["rewards/accuracies"], 1.0)


def _stub_pair_trainer(cls, loss_method, chosen, rejected, nll, **attrs):
    """A stand-in ORPO/CPO trainer whose forward returns the given sequence log-probs."""
    batch = chosen.shape[0]
    stub = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t),
        aux_loss_enabled=False,
        concatenated_forward=lambda model, batch_: (
            chosen,
            rejected,
            torch.zeros(batch, 2, 3),
            torch.zeros(batch, 2, 3),
            nll,
        ),
        **attrs,
    )
    setattr(stub, loss_method, functools.partial(getattr(cls, loss_method), stub))
    return stub


def _pair_inputs(seed, batch=5):
    rng = np.random.default_rng(seed)
    # Length-averaged log-probs lie in (−∞, 0); keep some above −log 2 for log1mexp's branch.
    chosen = -rng.uniform(0.05, 3.0, batch).astype(np.float32)
    rejected = -rng.uniform(0.05, 3.0, batch).astype(np.float32)
    return chosen, rejected, np.float32(rng.uniform(0.5, 2.0))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen, rejected, nll = _pair_inputs(4)
    c_t, r_t = torch.tensor(chosen, requires_grad=True), torch.tensor(rejected, requires_grad=True)
    nll_t = torch.tensor(nll, requires_grad=True)
    stub = _stub_pair_trainer(ORPOTrainer, "odds_ratio_loss", c_t, r_t, nll_t, beta=beta)
    trl_loss, trl_m = ORPOTrainer.get_batch_loss_metrics(stub, None, {}, train_eval="train")
    trl_loss.backward()
    args = (jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(nll))
    loss, m = call(losses.orpo_loss, *args, beta=beta)
    close(loss, trl_loss.item(), TRL_TOL)
    g = grads_of(losses.orpo_loss, (0, 1, 2), *args, beta=beta)
    for ours, theirs in zip(g, (c_t, r_t, nll_t), strict=True):
        close(ours, theirs.grad.numpy(), TRL_TOL)
    for name, value in trl_m.items():
        if not name.startswith("logits/"):  # logits are the forward's business, not the loss's
            close(m[name], value, TRL_TOL)


# =========================================================================== CPO / SimPO


def test_cpo_loss_types_by_hand():
    # p_c − p_r = 2, β = 0.5, nll = 0.3 with cpo_alpha = 1:
    #   sigmoid: −log σ(β·2) = softplus(−1)
    #   simpo:   logits 2 − γ/β = 2 − 1 = 1 → −log σ(0.5) = softplus(−0.5)   (γ = 0.5)
    #   hinge:   relu(1 − 0.5·2) = 0
    #   ipo:     (2 − 1/(2·0.5))² = 1
    p_c, p_r, nll = jnp.array([-1.0]), jnp.array([-3.0]), jnp.array(0.3)
    expected = {"sigmoid": softplus(-1.0), "simpo": softplus(-0.5), "hinge": 0.0, "ipo": 1.0}
    for loss_type, value in expected.items():
        loss, m = call(losses.cpo_loss, p_c, p_r, nll, beta=0.5, loss_type=loss_type)
        close(loss, value + 0.3)
        close(m["nll_loss"], 0.3)
        close(m["rewards/chosen"], -0.5)  # β·p_c: CPO's rewards are the policy's own
    # Label smoothing ls = 0.25 on sigmoid: ¾·softplus(−1) + ¼·softplus(1).
    loss, _ = call(losses.cpo_loss, p_c, p_r, None, beta=0.5, label_smoothing=0.25, cpo_alpha=0.0)
    close(loss, 0.75 * softplus(-1.0) + 0.25 * softplus(1.0))


def test_cpo_alphapo_rewards_by_hand():
    # AlphaPO with α = 1: r = (1 − P^{−1})/1. P_c = ½ → r_c = −1; P_r = ¼ → r_r = −3;
    # h = 2 as above, so sigmoid with β = 0.5 is softplus(−1); rewards/chosen = β·r_c.
    p_c, p_r = jnp.array([math.log(0.5)]), jnp.array([math.log(0.25)])
    loss, m = call(losses.cpo_loss, p_c, p_r, None, beta=0.5, cpo_alpha=0.0, alpha=1.0)
    close(loss, softplus(-1.0))
    close(m["rewards/chosen"], -0.5)
    close(m["rewards/rejected"], -1.5)


def test_simpo_is_cpo_simpo_without_nll():
    # SimPO = −log σ(β·(p̄_c − p̄_r) − γ): β = 2, γ = 1, p̄_c − p̄_r = 1 → softplus(−1).
    loss, _ = call(
        losses.simpo_loss, jnp.array([-1.0]), jnp.array([-2.0]), beta=2.0, simpo_gamma=1.0
    )
    close(loss, softplus(-1.0))


@pytest.mark.parametrize(
    "loss_type,label_smoothing,cpo_alpha,alpha",
    [
        ("sigmoid", 0.0, 1.0, 0.0),
        ("sigmoid", 0.1, 0.5, 0.0),
        ("hinge", 0.0, 1.0, 0.0),
        ("ipo", 0.0, 1.0, 0.0),
        ("simpo", 0.0, 0.0, 0.0),
        ("simpo", 0.2, 0.3, 0.0),
        ("simpo", 0.0, 0.0, 0.25),  # AlphaPO
    ],
)
def test_cpo_matches_trl(loss_type, label_smoothing, cpo_alpha, alpha):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    chosen, rejected, nll = _pair_inputs(5)
    c_t, r_t = torch.tensor(chosen, requires_grad=True), torch.tensor(rejected, requires_grad=True)
    nll_t = torch.tensor(nll, requires_grad=True)
    hyper = dict(
        beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
        simpo_gamma=0.5, alpha=alpha,
    )  # fmt: skip
    stub = _stub_pair_trainer(CPOTrainer, "cpo_loss", c_t, r_t, nll_t, **hyper)
    trl_loss, trl_m = CPOTrainer.get_batch_loss_metrics(stub, None, {}, train_eval="train")
    trl_loss.backward()
    args = (jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(nll))
    loss, m = call(losses.cpo_loss, *args, **hyper)
    close(loss, trl_loss.item(), TRL_TOL)
    g = grads_of(losses.cpo_loss, (0, 1, 2), *args, **hyper)
    for ours, theirs in zip(g, (c_t, r_t, nll_t), strict=True):
        close(ours, theirs.grad.numpy(), TRL_TOL)
    for name, value in trl_m.items():
        if not name.startswith("logits/"):
            close(m[name], value, TRL_TOL)


def test_pair_weights_drop_padding_pairs():
    # A padding pair (weight 0) with absurd values changes neither loss nor metrics.
    c, r = jnp.array([-0.5, -1.0, -0.01]), jnp.array([-1.5, -0.7, -9.0])
    w = jnp.array([1.0, 1.0, 0.0])
    for fn, extra in ((losses.orpo_loss, {}), (losses.cpo_loss, {"loss_type": "simpo"})):
        loss, m = call(fn, c, r, jnp.array(0.4), weights=w, **extra)
        loss2, m2 = call(fn, c[:2], r[:2], jnp.array(0.4), **extra)
        close(loss, loss2)
        for name in m2:
            close(m[name], m2[name])


def test_cpo_errors():
    args = (jnp.zeros(1) - 1.0, jnp.zeros(1) - 2.0)
    with pytest.raises(ValueError, match=r"cpo loss_type 'dpo'"):
        call(losses.cpo_loss, *args, jnp.array(0.0), loss_type="dpo")
    with pytest.raises(ValueError, match=r"cpo_alpha=1.0.*chosen_nll_loss"):
        call(losses.cpo_loss, *args, None)
    with pytest.raises(ValueError, match=r"cpo beta must be > 0"):
        call(losses.cpo_loss, *args, None, cpo_alpha=0.0, beta=0.0)
