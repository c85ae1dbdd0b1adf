"""LoRA as a separate tree: exactness at init, merged == unmerged, gradients, memory, heads."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.lora import (
    LoraConfig,
    init_lora,
    lora_rank,
    merge,
    pad_rank,
    targeted_modules,
    trainable_summary,
    unmerge,
)
from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.transformer import (
    backbone,
    forward,
    init_params,
    last_token_index,
    lora_delta,
)

CFG = tiny_config()
IDS = jax.random.randint(jax.random.key(3), (2, 12), 3, CFG.vocab_size)
MASK = jnp.ones_like(IDS).at[1, 9:].set(0)  # row 1 right-padded


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.key(0), CFG, heads=("lm", "score"))


@pytest.fixture(scope="module")
def lm_params(params):
    """The same model as a plain causal LM (no score head)."""
    return {k: v for k, v in params.items() if k != "score"}


def randomize(lora, seed=0, std=0.1):
    """Give every B (and head copy) random values: a fresh adapter is the base exactly.
    (numpy's generator: no jax program to compile for each tree.)"""
    rng = np.random.default_rng(seed)

    def noise(x):
        return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

    out = dict(lora)
    out["layers"] = {
        p: {"lora_A": ab["lora_A"], "lora_B": noise(ab["lora_B"])}
        for p, ab in lora["layers"].items()
    }
    for head in ("score", "value"):
        if head in lora:
            out[head] = jax.tree.map(lambda x: x + noise(x), lora[head])
    return out


_forward = jax.jit(forward, static_argnames=("cfg", "head"))


def logits(params, lora=None, cfg=None, head="lm"):
    return np.asarray(
        _forward(
            params,
            IDS,
            MASK,
            cfg=CFG,
            head=head,
            lora=lora,
            lora_scale=cfg.scale if cfg is not None else 1.0,
        )
    )


# ----------------------------------------------------------------------------- exactness


def test_fresh_adapter_is_the_base_exactly(params):
    cfg = LoraConfig(r=4, alpha=8)
    lora = init_lora(jax.random.key(1), params, cfg, CFG)
    assert set(lora["layers"]) == set(targeted_modules(cfg, CFG))
    assert all(not np.any(np.asarray(ab["lora_B"])) for ab in lora["layers"].values())
    assert np.array_equal(logits(params, lora, cfg), logits(params))
    assert np.array_equal(logits(merge(params, lora, cfg)), logits(params))


def test_random_adapter_changes_the_model(params):
    cfg = LoraConfig(r=4, alpha=8)
    lora = randomize(init_lora(jax.random.key(1), params, cfg, CFG))
    diff = np.max(np.abs(logits(params, lora, cfg) - logits(params)))
    assert diff > 1e-3, diff


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_equals_unmerged(params, use_rslora):
    cfg = LoraConfig(
        r=4, alpha=8, use_rslora=use_rslora, target_modules=("q_proj", "v_proj", "down_proj")
    )
    lora = randomize(init_lora(jax.random.key(1), params, cfg, CFG))
    unmerged = logits(params, lora, cfg)
    merged = logits(merge(params, lora, cfg))
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5 * np.max(np.abs(unmerged)))


def test_unmerge_inverts_merge(params):
    cfg = LoraConfig(r=4, alpha=8)
    lora = randomize(init_lora(jax.random.key(1), params, cfg, CFG))
    merged = merge(params, lora, cfg, with_heads=False)
    assert not np.allclose(
        merged["layers"]["q_proj"]["kernel"], params["layers"]["q_proj"]["kernel"]
    )
    back = unmerge(merged, lora, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_rslora_scale(params):
    assert LoraConfig(r=16, alpha=32).scale == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scale == 8.0  # alpha / sqrt(r)
    # and the scale is what both application paths use: W + (alpha/sqrt(r))·A·B
    cfg = LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=("o_proj",))
    assert cfg.scale == 4.0
    lora = randomize(init_lora(jax.random.key(1), params, cfg, CFG))
    ab = lora["layers"]["o_proj"]
    want = params["layers"]["o_proj"]["kernel"] + 4.0 * jnp.einsum(
        "lir,lro->lio", ab["lora_A"], ab["lora_B"]
    )
    np.testing.assert_allclose(
        merge(params, lora, cfg)["layers"]["o_proj"]["kernel"], want, rtol=1e-6, atol=1e-7
    )
    plain = dataclasses.replace(cfg, use_rslora=False)
    assert not np.allclose(logits(params, lora, cfg), logits(params, lora, plain))


# ----------------------------------------------------------------------------- gradients


W_LOSS = jax.random.normal(jax.random.key(4), (*IDS.shape, CFG.vocab_size))


def _loss(lora, params, scale):
    out = forward(params, IDS, MASK, cfg=CFG, lora=lora, lora_scale=scale)
    return jnp.sum(out * W_LOSS * MASK[..., None])


_grad = jax.jit(jax.grad(_loss))


@jax.jit
def _loss_at(lora, direction, h, params, scale):
    return _loss(jax.tree.map(lambda x, d: x + h * d, lora, direction), params, scale)


def test_gradient_matches_finite_differences(params):
    """Central differences along unit directions (the gradient's own, and random ones),
    Richardson-extrapolated so the truncation error is O(h⁴). The model computes in float32
    (its norms and softmax cast to it), so float64 would not help; at h=2e-2 the rounding
    noise of the difference quotient is ~5e-4 (measured), well inside atol."""
    cfg = LoraConfig(r=4, alpha=8)
    lora = randomize(init_lora(jax.random.key(1), params, cfg, CFG))
    grad = _grad(lora, params, cfg.scale)
    g_norm = np.sqrt(sum(float(jnp.vdot(g, g)) for g in jax.tree.leaves(grad)))
    directions = [jax.tree.map(lambda g: g / g_norm, grad)]  # along the gradient: d = |g|
    rng = np.random.default_rng(10)
    for _ in range(4):
        d = jax.tree.map(lambda x: rng.standard_normal(x.shape), lora)
        norm = np.sqrt(sum(np.sum(x * x) for x in jax.tree.leaves(d)))
        directions.append(jax.tree.map(lambda x, n=norm: jnp.asarray(x / n, jnp.float32), d))

    def central(d, h):
        plus, minus = (
            _loss_at(lora, d, h, params, cfg.scale),
            _loss_at(lora, d, -h, params, cfg.scale),
        )
        return (float(plus) - float(minus)) / (2 * h)

    h = 2e-2
    for d in directions:
        analytic = sum(
            float(jnp.vdot(g, x))
            for g, x in zip(jax.tree.leaves(grad), jax.tree.leaves(d), strict=True)
        )
        numeric = (4 * central(d, h / 2) - central(d, h)) / 3
        np.testing.assert_allclose(numeric, analytic, rtol=1e-3, atol=3e-3)


def test_gradient_equals_gradient_through_the_merge(params):
    """d/dθ of the unmerged model equals d/dθ of `forward(merge(params, θ))` (autodiff through
    W + s·A·B): the two application paths are the same function of the adapter."""
    cfg = LoraConfig(r=4, alpha=8)
    lora = randomize(init_lora(jax.random.key(1), params, cfg, CFG), seed=7)

    @jax.jit
    @jax.grad
    def via_merge(lora):
        return _loss(None, merge(params, lora, cfg), 1.0)

    g1 = _grad(lora, params, cfg.scale)
    g2 = via_merge(lora)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_hand_written_lora_backward_equals_autodiff():
    """`lora_delta`'s custom backward gives the same gradients for x, A, B and the scale as
    autodiff of the plain formula, with batch dims and a non-trivial cotangent."""
    keys = jax.random.split(jax.random.key(11), 5)
    x = jax.random.normal(keys[0], (3, 5, 7))
    a = jax.random.normal(keys[1], (7, 4))
    b = jax.random.normal(keys[2], (4, 6))
    weights = jax.random.normal(keys[3], (3, 5, 6))
    scale = jnp.asarray(1.7)

    def plain(x, a, b, scale):
        return jnp.sum(jnp.tanh(jnp.einsum("...r,ro->...o", x @ a, b) * scale) * weights)

    def custom(x, a, b, scale):
        return jnp.sum(jnp.tanh(lora_delta(x, a, b, scale)) * weights)

    np.testing.assert_allclose(custom(x, a, b, scale), plain(x, a, b, scale), rtol=1e-6)
    got = jax.grad(custom, argnums=(0, 1, 2, 3))(x, a, b, scale)
    want = jax.grad(plain, argnums=(0, 1, 2, 3))(x, a, b, scale)
    for name, g, w in zip(("x", "A", "B", "scale"), got, want, strict=True):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_lora_step_uses_less_memory_than_full_finetuning():
    """The compiled AdamW step's memory (arguments + outputs + temporaries): LoRA holds the
    frozen params once and gradients/moments only for the adapter; full fine-tuning holds
    params, gradients and two moments of every weight. The model is weight-dominated (few
    tokens), the regime PE-RLHF is for; only shapes are needed, so nothing is run."""
    cfg_model = tiny_config(vocab_size=512, hidden_size=256, intermediate_size=512)
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg_model))
    lora_cfg = LoraConfig(r=8, alpha=16)
    lora = jax.eval_shape(lambda p: init_lora(jax.random.key(2), p, lora_cfg, cfg_model), params)
    ids = jnp.zeros((2, 16), jnp.int32)
    opt = optax.adamw(1e-3)

    def nll(params, lora):
        out = forward(
            params,
            ids[:, :-1],
            jnp.ones_like(ids[:, :-1]),
            cfg=cfg_model,
            lora=lora,
            lora_scale=lora_cfg.scale,
        )
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), ids[:, 1:, None], -1))

    def lora_step(lora, opt_state, params):
        loss, grads = jax.value_and_grad(lambda lo: nll(params, lo))(lora)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    def full_step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: nll(p, None))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def total(compiled):
        m = compiled.memory_analysis()
        return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

    lora_opt = jax.eval_shape(opt.init, lora)
    lora_bytes = total(jax.jit(lora_step).lower(lora, lora_opt, params).compile())
    full_bytes = total(jax.jit(full_step).lower(params, jax.eval_shape(opt.init, params)).compile())
    # Full: params + 2 moments in, the same out, gradients in between. LoRA: ~1 copy of params.
    assert lora_bytes < 0.5 * full_bytes, (lora_bytes, full_bytes)
    summary = trainable_summary(lora, params, lora_opt)
    assert summary.trainable_percent < 5 and "trainable%" in str(summary)
    assert summary.optimizer_bytes == 2 * summary.trainable_bytes + 4  # mu, nu and a count


# ----------------------------------------------------------------------------- ranks


def test_pad_rank_keeps_outputs(params):
    cfg = LoraConfig(r=4, alpha=8)
    lora = randomize(init_lora(jax.random.key(1), params, cfg, CFG))
    padded = pad_rank(lora, 16)
    assert lora_rank(padded) == 16 and lora_rank(lora) == 4
    # The scale stays the one of the adapter's own rank (alpha / 4), not of max_rank. The
    # padded rows and columns contribute exact zeros, so the outputs are bit-identical.
    assert np.array_equal(logits(params, padded, cfg), logits(params, lora, cfg))
    assert np.array_equal(logits(merge(params, padded, cfg)), logits(merge(params, lora, cfg)))
    with pytest.raises(ValueError, match="rank 4 exceeds the rollout engine's max_rank=2"):
        pad_rank(lora, 2)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be an integer >= 1"),
        (dict(r=-3), "r must be an integer >= 1"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(task_type="SEQ_CLS"), "SEQ_CLS adapter must list 'score'"),
        (dict(modules_to_save=("lm_head",)), "unknown module 'lm_head'"),
        (dict(target_modules=()), "target_modules is empty"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "target,match",
    [
        (("qkv",), "matches no module"),
        (("q_proj", "c_attn"), r"\['c_attn'\] match no module"),
        (
            ("q_proj", "attn.q_proj"),
            r"\['attn.q_proj'\] match no module",
        ),  # suffixes are whole names
        (r"model\.layers\.0\.self_attn\.q_proj", r"matches q_proj in layers \[0\] only"),
        (r".*\.wq", "matches no module"),
    ],
)
def test_target_errors(params, target, match):
    cfg = LoraConfig(target_modules=target)
    with pytest.raises(ValueError, match=match):
        targeted_modules(cfg, CFG)
    with pytest.raises(ValueError, match=match):
        init_lora(jax.random.key(0), params, cfg, CFG)


def test_targets_by_suffix_and_regex():
    assert targeted_modules(
        LoraConfig(target_modules=("self_attn.q_proj", "mlp.up_proj")), CFG
    ) == ("q_proj", "up_proj")
    assert targeted_modules(LoraConfig(target_modules=r".*\.(k|v)_proj"), CFG) == (
        "k_proj",
        "v_proj",
    )
    assert targeted_modules(LoraConfig(target_modules=["o_proj"]), CFG) == ("o_proj",)


# ----------------------------------------------------------------------------- heads


def test_modules_to_save_head_is_used_with_the_adapter_only(params):
    cfg = LoraConfig(r=4, alpha=8, task_type="SEQ_CLS", modules_to_save=("score",))
    fresh = init_lora(jax.random.key(1), params, cfg, CFG)
    # The copy starts as the base head (a trained RM's head, say), then trains on its own.
    np.testing.assert_array_equal(fresh["score"]["kernel"], params["score"]["kernel"])
    lora = randomize(fresh)

    @jax.jit
    def manual(head_kernel, lora_or_none):
        hidden, _ = backbone(params, IDS, MASK, cfg=CFG, lora=lora_or_none, lora_scale=cfg.scale)
        last = hidden[jnp.arange(IDS.shape[0]), last_token_index(MASK)]
        return (last @ head_kernel)[:, 0]

    with_adapter = logits(params, lora, cfg, head="score")
    np.testing.assert_allclose(
        with_adapter, manual(lora["score"]["kernel"], lora), rtol=1e-5, atol=1e-6
    )
    reference = logits(params, head="score")  # adapter off: the original head and weights
    np.testing.assert_allclose(
        reference, manual(params["score"]["kernel"], None), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(with_adapter, reference)
    # merge() puts the adapter's head into the merged params; with_heads=False keeps the base's.
    np.testing.assert_array_equal(
        merge(params, lora, cfg)["score"]["kernel"], lora["score"]["kernel"]
    )
    np.testing.assert_array_equal(
        merge(params, lora, cfg, with_heads=False)["score"]["kernel"], params["score"]["kernel"]
    )


def test_head_missing_from_the_base_is_created_by_the_adapter(lm_params):
    base = lm_params  # a causal LM: no value head
    cfg = LoraConfig(r=4, alpha=8, modules_to_save=("value",))
    lora = init_lora(jax.random.key(1), base, cfg, CFG)
    assert lora["value"]["kernel"].shape == (CFG.hidden_size, 1)
    assert logits(base, lora, cfg, head="value").shape == IDS.shape
    with pytest.raises(KeyError, match="no 'value' head"):
        logits(base, head="value")


def test_two_adapters_on_one_base_in_one_jit(params, lm_params):
    """PPO's policy and critic share the frozen base: one compiled function running both
    adapters gives what each gives alone."""
    base = lm_params
    policy_cfg = LoraConfig(r=4, alpha=16, target_modules=("q_proj", "v_proj"))
    value_cfg = LoraConfig(r=4, alpha=4, modules_to_save=("value",), use_rslora=True)
    policy = randomize(init_lora(jax.random.key(1), base, policy_cfg, CFG), seed=1)
    critic = randomize(init_lora(jax.random.key(2), base, value_cfg, CFG), seed=2)

    @jax.jit
    def both(base, policy, critic):
        return (
            forward(base, IDS, MASK, cfg=CFG, lora=policy, lora_scale=policy_cfg.scale),
            forward(
                base, IDS, MASK, cfg=CFG, head="value", lora=critic, lora_scale=value_cfg.scale
            ),
            forward(base, IDS, MASK, cfg=CFG),
        )

    lm_both, values_both, ref_both = both(base, policy, critic)
    lm_alone = jax.jit(
        lambda b, lo: forward(b, IDS, MASK, cfg=CFG, lora=lo, lora_scale=policy_cfg.scale)
    )(base, policy)
    values_alone = jax.jit(
        lambda b, lo: forward(
            b, IDS, MASK, cfg=CFG, head="value", lora=lo, lora_scale=value_cfg.scale
        )
    )(base, critic)
    np.testing.assert_allclose(lm_both, lm_alone, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(values_both, values_alone, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref_both, logits(params), rtol=1e-6, atol=1e-6)  # same weights
    assert not np.allclose(lm_both, ref_both)
