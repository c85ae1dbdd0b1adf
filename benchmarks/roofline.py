"""The machine's own ceilings, measured with JAX: the matmul rate (fp32, bf16) and the memory
bandwidth (a copy and a sum of an array much larger than the caches). Every other benchmark
states its achieved rate as a share of these."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C


def _median_time(fn, *args, repeats: int) -> float:
    C.block(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        C.block(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_fp32_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The fp32 matmul rate alone (a few seconds), re-measured before each benchmark: on a
    shared machine the ceiling moves with other jobs' load, and the best seen is kept."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    t = _median_time(jax.jit(lambda x, y: x @ y), a, a, repeats=repeats)
    return round(2 * n**3 / t / 1e9, 2)


def run(*, quick: bool = False) -> dict:
    n = 2048
    repeats = 3 if quick else 7
    out: dict = {"benchmark": "roofline", "matmul_n": n, "repeats": repeats}
    matmul = jax.jit(lambda a, b: a @ b)
    for tag, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
        t = _median_time(matmul, a, b, repeats=repeats)
        out[f"matmul_{tag}_gflops"] = round(2 * n**3 / t / 1e9, 2)
    size = (1 << 23) if quick else (1 << 26)  # 32 MiB / 256 MiB of float32
    # In place (donated), so the copy is one read + one write per element and no fresh
    # pages are faulted in on every call.
    scale = jax.jit(lambda v: v * 1.0000001, donate_argnums=0)
    total = jax.jit(jnp.sum)  # one read per element
    buf = {"x": jnp.arange(size, dtype=jnp.float32)}

    def copy_once():
        buf["x"] = scale(buf["x"])
        return buf["x"]

    t_copy = _median_time(copy_once, repeats=repeats)
    t_sum = _median_time(total, buf["x"], repeats=repeats)
    out.update(
        array_bytes=size * 4,
        copy_gb_per_s=round(2 * size * 4 / t_copy / 1e9, 2),
        sum_gb_per_s=round(size * 4 / t_sum / 1e9, 2),
    )
    out["bandwidth_gb_per_s"] = max(out["copy_gb_per_s"], out["sum_gb_per_s"])
    return out


def render(result: dict) -> str:
    n = result["matmul_n"]
    rows = [
        [f"matmul {n}×{n} fp32", f"{result['matmul_fp32_gflops']:.1f} GFLOP/s"],
        [f"matmul {n}×{n} bf16", f"{result['matmul_bf16_gflops']:.1f} GFLOP/s"],
        [
            f"copy (2 × {C.fmt_bytes(result['array_bytes'])} moved)",
            f"{result['copy_gb_per_s']:.1f} GB/s",
        ],
        [f"sum ({C.fmt_bytes(result['array_bytes'])} read)", f"{result['sum_gb_per_s']:.1f} GB/s"],
    ]
    return (
        f"Median of {result['repeats']} runs each. The fp32 matmul rate is the roofline "
        "that the training tables' “% fp32 matmul roofline” refers to; the larger of the "
        "two bandwidths is the one the decode table uses.\n\n" + C.table(["kernel", "rate"], rows)
    )
