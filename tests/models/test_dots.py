"""Low-precision products accumulated in float32 (`models.dots`) and the layer loop's two
forms (`ModelConfig.layer_loop`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxrlhf.lora import LoraConfig, init_lora
from jaxrlhf.models import dots
from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.transformer import forward, init_params, scans_layers

BF16 = jnp.bfloat16


def _bf16(rng, shape):
    """Random values that bfloat16 holds exactly, as float32 numpy and as a bf16 array."""
    x = rng.standard_normal(shape).astype(ml_dtypes.bfloat16).astype(np.float32)
    return x, jnp.asarray(x, BF16)


def _assert_rounded_f32(got, exact):
    """`got` (bf16) is the float32 product rounded to bf16: within half a bf16 ulp of the
    exact value, up to the float32 summation order (one ulp in all)."""
    got = np.asarray(got.astype(jnp.float32))
    ulp = np.abs(exact) * 2.0**-7 + 1e-30
    assert got.shape == exact.shape
    assert np.all(np.abs(got - exact) <= ulp), np.max(np.abs(got - exact) / ulp)


@pytest.mark.parametrize(
    "spec, sa, sb",
    [
        ("...i,io->...o", (2, 5, 64), (64, 48)),
        ("...i,oi->...o", (2, 5, 64), (48, 64)),
        # attention's second product: its transposed output made XLA:CPU fail with
        # "Unsupported element type for DotThunk" when asked for float32 directly
        ("bkgts,bksh->btkgh", (2, 3, 2, 8, 16), (2, 3, 16, 32)),
        ("btkgh,bksh->bkgts", (2, 8, 3, 2, 32), (2, 3, 16, 32)),
    ],
)
def test_bf16_products_are_float32_products_rounded(spec, sa, sb):
    rng = np.random.default_rng(0)
    a, a16 = _bf16(rng, sa)
    b, b16 = _bf16(rng, sb)
    exact = np.einsum(spec, a.astype(np.float64), b.astype(np.float64))
    fn = {"...i,io->...o": dots.matmul, "...i,oi->...o": dots.matmul_t}.get(spec)
    got = jax.jit(fn if fn else lambda x, y: dots.einsum(spec, x, y))(a16, b16)
    assert got.dtype == BF16
    _assert_rounded_f32(got, exact)


@pytest.mark.parametrize("transposed", [False, True])
def test_one_bf16_row_is_the_float32_product_rounded(transposed):
    """A single row (a batch-1 decode step) goes through two rows (`_on_two_rows`): the same
    rounded float32 product, of every leading shape of one row."""
    rng = np.random.default_rng(7)
    x, x16 = _bf16(rng, (1, 1, 64))
    w, w16 = _bf16(rng, (48, 64) if transposed else (64, 48))
    fn = dots.matmul_t if transposed else dots.matmul
    exact = x.astype(np.float64) @ (w.T if transposed else w).astype(np.float64)
    got = jax.jit(fn)(x16, w16)
    assert got.dtype == BF16
    _assert_rounded_f32(got, exact)
    _assert_rounded_f32(jax.jit(fn)(x16[0, 0], w16), exact[0, 0])


@pytest.mark.parametrize("transposed", [False, True])
def test_one_row_logits_keep_the_float32_sum(transposed):
    """`row_logits`: one row against the vocabulary table ([V, D] tied, [D, V] lm_head), the
    float32 sum unrounded for bf16 operands, the plain einsum for float32 ones."""
    rng = np.random.default_rng(8)
    x, x16 = _bf16(rng, (1, 1, 96))
    w, w16 = _bf16(rng, (300, 96) if transposed else (96, 300))
    kernel = (w.T if transposed else w).astype(np.float64)
    got = jax.jit(lambda a, b: dots.row_logits(a, b, transposed=transposed))(x16, w16)
    assert got.dtype == jnp.float32 and got.shape == (1, 1, 300)
    exact = x.astype(np.float64) @ kernel
    scale = np.abs(x).max() * np.abs(w).max() * 96
    np.testing.assert_allclose(np.asarray(got), exact, atol=scale * 2.0**-22, rtol=0)
    x32, w32 = jnp.asarray(x), jnp.asarray(w)
    plain = jnp.einsum("...i,io->...o", x32, w32.T if transposed else w32)
    np.testing.assert_array_equal(dots.row_logits(x32, w32, transposed=transposed), plain)


@pytest.mark.parametrize(
    "product",
    [
        dots.matmul,
        dots.matmul_t,
        lambda x, w: dots.row_logits(x, w, transposed=True).astype(x.dtype),
        lambda x, w: dots.row_logits(x, w, transposed=False).astype(x.dtype),
    ],
)
def test_a_one_row_bf16_loop_keeps_no_float32_copy_of_the_weight(product):
    """XLA:CPU runs a one-row bf16 dot on a float32 copy of the weight, and in a loop hoists
    that copy out: a decode loop held a float32 copy of every weight (SmolLM2-135M: 765 vs
    340 MB of temporaries). Through two rows, the loop's temporaries stay a few rows."""
    w = jnp.ones((768, 768), BF16)
    x = jnp.ones((1, 1, 768), BF16)

    def loop(w, x):
        return jax.lax.fori_loop(0, 4, lambda i, x: product(x, w) * 0.5, x)

    compiled = jax.jit(loop).lower(w, x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < w.size  # under a bf16 copy's half


def test_float32_products_are_plain_einsums():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    np.testing.assert_array_equal(dots.matmul(a, w), jnp.einsum("...i,io->...o", a, w))
    np.testing.assert_array_equal(dots.matmul_t(a, w.T), jnp.einsum("...i,oi->...o", a, w.T))


@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_matmul_backward_rounds_the_cotangent_and_accumulates_in_f32(transposed):
    """d/dx and d/dw of Σ c ⊙ (x·W): the cotangent c (bf16) times the other operand,
    accumulated in float32 and rounded, as PyTorch's bf16 backward."""
    rng = np.random.default_rng(2)
    x, x16 = _bf16(rng, (3, 7, 64))
    w, w16 = _bf16(rng, (64, 40))
    c, c16 = _bf16(rng, (3, 7, 40))

    def loss(x, w):
        y = dots.matmul_t(x, w.T) if transposed else dots.matmul(x, w)
        return jnp.sum((y * c16).astype(jnp.float32))

    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x16, w16)
    assert gx.dtype == BF16 and gw.dtype == BF16
    c64, x64, w64 = (v.astype(np.float64) for v in (c, x, w))
    _assert_rounded_f32(gx, c64 @ w64.T)
    _assert_rounded_f32(gw, np.einsum("bti,bto->io", x64, c64))


@pytest.mark.parametrize(
    "spec, sa, sb",
    [
        ("eni,eio->eno", (3, 5, 64), (3, 64, 40)),  # a mixture's stacked experts
        ("end,ne->nd", (4, 6, 32), (6, 4)),  # their routing-weighted combination
    ],
)
def test_bf16_einsum_grad_rounds_the_cotangent_and_accumulates_in_f32(spec, sa, sb):
    """`einsum_grad`: the product and both gradients of Σ c ⊙ einsum(a, b) are float32
    products of bf16 operands (the cotangent c rounded first), rounded to bf16."""
    rng = np.random.default_rng(5)
    a, a16 = _bf16(rng, sa)
    b, b16 = _bf16(rng, sb)
    out_shape = np.einsum(spec, a, b).shape
    c, c16 = _bf16(rng, out_shape)

    def loss(x, y):
        return jnp.sum((dots.einsum_grad(spec, x, y) * c16).astype(jnp.float32))

    value, (ga, gb) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(a16, b16)
    assert ga.dtype == BF16 and gb.dtype == BF16
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    a64, b64, c64 = (v.astype(np.float64) for v in (a, b, c))
    _assert_rounded_f32(dots.einsum_grad(spec, a16, b16), np.einsum(spec, a64, b64))
    _assert_rounded_f32(ga, np.einsum(f"{out},{rhs}->{lhs}", c64, b64))
    _assert_rounded_f32(gb, np.einsum(f"{lhs},{out}->{rhs}", a64, c64))
    a32, b32 = jnp.asarray(a), jnp.asarray(b)
    np.testing.assert_array_equal(dots.einsum_grad(spec, a32, b32), jnp.einsum(spec, a32, b32))


def test_bf16_ragged_dot_is_the_float32_product_rounded():
    rng = np.random.default_rng(6)
    x, x16 = _bf16(rng, (10, 64))
    w, w16 = _bf16(rng, (3, 64, 24))
    sizes = np.array([4, 0, 6], np.int32)
    got = jax.jit(dots.ragged_dot)(x16, w16, jnp.asarray(sizes))
    assert got.dtype == BF16
    group = np.repeat(np.arange(3), sizes)
    exact = np.einsum("ni,nio->no", x.astype(np.float64), w.astype(np.float64)[group])
    _assert_rounded_f32(got, exact)


def test_einsum_f32_keeps_the_float32_accumulation_of_bf16_operands():
    """`einsum_f32`: bf16 operands, the float32 sum unrounded (the LM head's gradient
    direction, which feeds float32 arithmetic); float32 operands, the plain einsum."""
    rng = np.random.default_rng(3)
    p, p16 = _bf16(rng, (2, 3, 300))
    w, w16 = _bf16(rng, (16, 300))
    got = jax.jit(lambda a, b: dots.einsum_f32("bcv,dv->bcd", a, b))(p16, w16)
    assert got.dtype == jnp.float32
    exact = np.einsum("bcv,dv->bcd", p.astype(np.float64), w.astype(np.float64))
    scale = np.abs(p).max() * np.abs(w).max() * 300
    np.testing.assert_allclose(np.asarray(got), exact, atol=scale * 2.0**-22, rtol=0)
    rounded = np.asarray(dots.einsum("bcv,dv->bcd", p16, w16), np.float32)
    assert np.abs(exact - rounded).max() > 100 * np.abs(exact - np.asarray(got)).max()
    p32, w32 = jnp.asarray(p), jnp.asarray(w)
    np.testing.assert_array_equal(
        dots.einsum_f32("bcv,dv->bcd", p32, w32), jnp.einsum("bcv,dv->bcd", p32, w32)
    )


def test_bf16_sum_of_one_operand_is_refused():
    a = jnp.ones((2, 3), BF16)
    with pytest.raises(ValueError, match="sums an axis"):
        dots.einsum("ij,kl->il", a, a)


def _lora_case(cfg):
    params = init_params(jax.random.PRNGKey(0), cfg)
    lcfg = LoraConfig(r=4, alpha=8)
    lora = init_lora(jax.random.PRNGKey(1), params, lcfg, cfg)
    lora = jax.tree.map(lambda x: x + 0.01 if x.ndim else x, lora)  # B ≠ 0: a live adapter
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, cfg.vocab_size)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    return params, lora, lcfg.scale, ids, mask


@pytest.mark.parametrize("remat", ["none", "block"])
def test_unrolled_layer_loop_equals_the_scan(remat):
    """The same logits and the same adapter gradients from both loops, plain and with
    `remat="block"` (checkpointed blocks in the unrolled loop too)."""
    base = tiny_config(num_layers=3, remat=remat)
    params, lora, scale, ids, mask = _lora_case(base)
    out = {}
    for loop in ("scan", "unroll"):
        cfg = dataclasses.replace(base, layer_loop=loop)

        def loss(lora, cfg=cfg):
            logits = forward(params, ids, mask, cfg=cfg, lora=lora, lora_scale=scale)
            return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2) / 1e3, logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)
        out[loop] = (logits, grads)
    np.testing.assert_allclose(out["scan"][0], out["unroll"][0], rtol=1e-5, atol=1e-5)
    for g_scan, g_unroll in zip(
        jax.tree.leaves(out["scan"][1]), jax.tree.leaves(out["unroll"][1]), strict=True
    ):
        np.testing.assert_allclose(g_scan, g_unroll, rtol=1e-4, atol=1e-6)


def test_auto_layer_loop_unrolls_bf16_on_cpu_only():
    cfg = tiny_config()
    assert jax.default_backend() == "cpu"
    assert scans_layers(cfg)
    assert not scans_layers(dataclasses.replace(cfg, dtype="bfloat16"))
    assert scans_layers(dataclasses.replace(cfg, dtype="bfloat16", layer_loop="scan"))
    assert not scans_layers(dataclasses.replace(cfg, layer_loop="unroll"))
    with pytest.raises(ValueError, match="layer_loop"):
        dataclasses.replace(cfg, layer_loop="loop")


def test_bf16_forward_and_grads_follow_float32():
    """The bf16 model (bf16 base, f32-accumulated products, the unrolled loop) computes the
    float32 model's logits and adapter gradients to bfloat16 accuracy."""
    cfg32 = tiny_config(num_layers=2)
    params, lora, scale, ids, mask = _lora_case(cfg32)
    cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(BF16), params)

    def run(cfg, p):
        def loss(lora):
            logits = forward(p, ids, mask, cfg=cfg, lora=lora, lora_scale=scale)
            logits = logits.astype(jnp.float32)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)

    (_, l32), g32 = run(cfg32, params)
    (_, l16), g16 = run(cfg16, params16)
    assert np.max(np.abs(np.asarray(l16) - np.asarray(l32))) < 0.05 * np.max(np.abs(l32))
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) + 1e-6


@pytest.mark.parametrize("dispatch", ["dense", "ragged"])
def test_bf16_mixture_of_experts_follows_float32(dispatch):
    """A bf16 mixture (experts, their LoRA and the combination on `dots`) computes the
    float32 model's logits and adapter gradients to bfloat16 accuracy, both dispatches."""
    cfg32 = tiny_config(num_layers=2, num_experts=4, num_experts_per_tok=2, moe_dispatch=dispatch)
    params = init_params(jax.random.PRNGKey(0), cfg32)
    lcfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "gate_proj", "down_proj"))
    lora = init_lora(jax.random.PRNGKey(1), params, lcfg, cfg32)
    lora = jax.tree.map(lambda x: x + 0.01 if x.ndim else x, lora)
    assert lora["layers"]["experts"]["down_proj"]["lora_A"].shape[:2] == (2, 4)
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, cfg32.vocab_size)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(BF16), params)

    def run(cfg, p):
        def loss(lora):
            logits = forward(p, ids, mask, cfg=cfg, lora=lora, lora_scale=lcfg.scale)
            logits = logits.astype(jnp.float32)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)

    (_, l32), g32 = run(cfg32, params)
    (_, l16), g16 = run(cfg16, params16)
    assert np.max(np.abs(np.asarray(l16) - np.asarray(l32))) < 0.05 * np.max(np.abs(l32))
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) + 1e-6
