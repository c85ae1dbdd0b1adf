"""Products of low-precision operands, accumulated in float32.

`x·W` with bfloat16 `x` and `W` is what `torch.nn.Linear` computes in bfloat16: float32
accumulation, the result rounded to bfloat16. On the CPU, XLA reaches its fast bfloat16
kernels (AMX and AVX-512-BF16 on Intel) only when the dot itself returns float32; a dot that
returns bfloat16 runs 3–6× slower than one that returns float32 and is then rounded
(docs/speed.md, "bfloat16 on the CPU"). So every low-precision product here asks for
float32 and rounds after, and its backward does the same with the cotangent rounded to the
operands' dtype (as PyTorch's bfloat16 backward does), instead of JAX's default transpose,
which multiplies the float32 cotangent by the bfloat16 weight and so leaves the fast path.
Float32 operands take plain `jnp.einsum`, bit for bit what they took before.

GPUs and TPUs accumulate bfloat16 dots in float32 inside the kernel already, so there these
functions emit the plain dot (the same numbers, and the program XLA tunes for those chips).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _accumulate_in_f32(*operands: jax.Array) -> bool:
    """True where a product of these operands should ask XLA for a float32 result: low
    precision operands on the CPU."""
    low = any(jnp.dtype(a.dtype).itemsize < 4 for a in operands)
    return low and jax.default_backend() == "cpu"


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` in a's dtype, accumulated in float32. The backward is JAX's
    own (float32 cotangents): use it where no gradient flows, such as attention in a
    rollout, or where the backward is written by hand (`lora_delta`)."""
    if not _accumulate_in_f32(a, b):
        return jnp.einsum(spec, a, b)
    return _dot(spec, a, b, a.dtype)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` accumulated and returned in float32, for products whose
    result feeds float32 arithmetic (the LM head's gradient direction). JAX's own backward."""
    if not _accumulate_in_f32(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _dot(spec, a, b, jnp.float32)


def einsum_grad(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` in a's dtype, accumulated in float32, with the backward
    described above for any spec: the cotangent rounded to the operands' dtype, each
    gradient a float32-accumulated product. For products that gradients flow through and
    that `matmul` does not cover (a mixture's stacked experts, their LoRA)."""
    if not _accumulate_in_f32(a, b):
        return jnp.einsum(spec, a, b)
    return _lowp_einsum(spec, a, b)


def ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot(x, w, group_sizes)` (rows sorted by group, each through its own
    w[g]) in x's dtype, accumulated in float32; JAX's own backward. In bf16 on the CPU the
    float32-result form ran the forward 2.4× faster (8 experts, 512 rows, 576 -> 256)."""
    if not _accumulate_in_f32(x, w):
        return jax.lax.ragged_dot(x, w, group_sizes)
    y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x · w` for x [..., in] and w [in, out], in x's dtype, accumulated in float32 (with the
    backward described above)."""
    if not _accumulate_in_f32(x, w):
        return jnp.einsum("...i,io->...o", x, w)
    return _on_two_rows(_lowp_matmul, x, w) if _is_one_row(x) else _lowp_matmul(x, w)


def matmul_t(x: jax.Array, w_t: jax.Array) -> jax.Array:
    """`x · w_tᵀ` for a weight stored [out, in] (the rollout layout), accumulated in float32."""
    if not _accumulate_in_f32(x, w_t):
        return jnp.einsum("...i,oi->...o", x, w_t)
    return _on_two_rows(_lowp_matmul_t, x, w_t) if _is_one_row(x) else _lowp_matmul_t(x, w_t)


def row_logits(x: jax.Array, table: jax.Array, *, transposed: bool) -> jax.Array:
    """One row's vocabulary logits in float32: `x · table` for an lm_head kernel [D, V], or
    `x · tableᵀ` for a tied embedding [V, D] (`transposed`), x [..., D] a single row. Low
    precision on the CPU goes through two rows (`_on_two_rows`); otherwise the plain
    einsum (for float32, the same program as before)."""
    if not _accumulate_in_f32(x, table):
        w = table.T if transposed else table
        return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)
    spec = "ni,oi->no" if transposed else "ni,io->no"
    return _on_two_rows(lambda r, w: _dot(spec, r, w, jnp.float32), x, table)


def _is_one_row(x: jax.Array) -> bool:
    return x.size == x.shape[-1]


def _on_two_rows(product, x: jax.Array, w: jax.Array) -> jax.Array:
    """`product(x, w)` for a single row x [..., in] (a batch-1 decode step), computed on that
    row and a row of zeros, which adds nothing to the first. XLA:CPU runs a one-row bf16 →
    f32 dot as a float32 one, on a float32 copy of the whole weight (inside a decode loop
    it hoists that conversion out: a float32 copy of every weight per call), while two rows
    take its bf16 kernel on the weight as it lies. On an AVX-512 EPYC the bare products of
    SmolLM2-135M's shapes ran 3–11× faster (38 vs 3.3–3.6 ms for its 49,152 × 576 table),
    and its bf16 batch-1 generate (32 tokens) 1.27 → 0.96 s with 765 → 340 MB of temporaries."""
    rows = jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0)))
    y = product(rows, w)[:1]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _dot(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """The product asked for in float32 with its dimensions in `dot_general`'s own order
    (batch, a's free, b's free), rounded to `dtype`, and only then transposed to `spec`'s
    output: XLA:CPU runs a bf16 × bf16 → f32 dot whose result it would lay out transposed
    in a kernel that has no such dot ("Unsupported element type for DotThunk")."""
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    if "..." in lhs:  # leading dims of a, kept in front
        n = a.ndim - len(lhs.replace("...", ""))
        dims = "".join(chr(0x3B1 + i) for i in range(n))  # Greek letters: not in any spec
        lhs, rhs, out = (x.replace("...", dims) for x in (lhs, rhs, out))
    if sorted(set(lhs) | set(rhs)) != sorted(set(out) | (set(lhs) & set(rhs))):
        raise ValueError(f"dots: {spec!r} sums an axis of one operand alone; not supported")
    batch = [c for c in lhs if c in rhs and c in out]
    contract = [c for c in lhs if c in rhs and c not in out]
    free_a = [c for c in lhs if c not in rhs]
    free_b = [c for c in rhs if c not in lhs]
    y = jax.lax.dot_general(
        a,
        b,
        (
            (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
            (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)),
        ),
        preferred_element_type=jnp.float32,
    ).astype(dtype)
    natural = batch + free_a + free_b
    return jnp.transpose(y, tuple(natural.index(c) for c in out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lowp_einsum(spec, a, b):
    return _dot(spec, a, b, a.dtype)


def _lowp_einsum_fwd(spec, a, b):
    return _lowp_einsum(spec, a, b), (a, b)


def _lowp_einsum_bwd(spec, res, g):
    a, b = res
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    g = g.astype(a.dtype)
    return _dot(f"{out},{rhs}->{lhs}", g, b, a.dtype), _dot(f"{lhs},{out}->{rhs}", a, g, b.dtype)


_lowp_einsum.defvjp(_lowp_einsum_fwd, _lowp_einsum_bwd)


@jax.custom_vjp
def _lowp_matmul(x, w):
    return _dot("...i,io->...o", x, w, x.dtype)


def _lowp_matmul_fwd(x, w):
    return _lowp_matmul(x, w), (x, w)


def _lowp_matmul_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    g_x = _dot("...o,io->...i", g, w, x.dtype)
    tokens_x = x.reshape(-1, x.shape[-1])
    tokens_g = g.reshape(-1, g.shape[-1])
    g_w = _dot("ni,no->io", tokens_x, tokens_g, w.dtype)
    return g_x, g_w


_lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


@jax.custom_vjp
def _lowp_matmul_t(x, w_t):
    return _dot("...i,oi->...o", x, w_t, x.dtype)


def _lowp_matmul_t_fwd(x, w_t):
    return _lowp_matmul_t(x, w_t), (x, w_t)


def _lowp_matmul_t_bwd(res, g):
    x, w_t = res
    g = g.astype(x.dtype)
    g_x = _dot("...o,oi->...i", g, w_t, x.dtype)
    tokens_x = x.reshape(-1, x.shape[-1])
    tokens_g = g.reshape(-1, g.shape[-1])
    g_w = _dot("no,ni->oi", tokens_g, tokens_x, w_t.dtype)
    return g_x, g_w


_lowp_matmul_t.defvjp(_lowp_matmul_t_fwd, _lowp_matmul_t_bwd)
