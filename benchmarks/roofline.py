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


class SameRoundLimits:
    """The two ceilings as thunks to time inside another benchmark's interleaved rounds
    (`common.interleaved`), so a share is taken against the machine as it ran in those same
    minutes: on this shared VM both ceilings moved by up to 30% between runs a few minutes
    apart. `read`: 16 chained matrix-vector products over a 256 MiB float32 matrix (what a
    batch-1 decode step does, at its best); `matmul`: 8 chained 2048² fp32 products;
    `bf16=True` adds `matmul_bf16`: the same products of bf16 matrices accumulated in fp32
    and rounded to bf16 (`models/dots.py`'s form)."""

    READ_N, READ_REPS, MM_N, MM_REPS = 8192, 16, 2048, 8

    def __init__(self, bf16: bool = False):
        k1, k2 = jax.random.split(jax.random.PRNGKey(3))
        self.w = jax.random.normal(k1, (self.READ_N, self.READ_N), jnp.float32) / self.READ_N**0.5
        self.x = jax.random.normal(k2, (self.READ_N,), jnp.float32)
        self.a = jax.random.normal(k1, (self.MM_N, self.MM_N), jnp.float32) / self.MM_N**0.5

        def chain(f, reps):
            return jax.jit(lambda m, v: jax.lax.fori_loop(0, reps, lambda _, y: f(m, y), v))

        self._read = chain(lambda w, y: w @ y, self.READ_REPS)
        self._matmul = chain(lambda a, y: a @ y, self.MM_REPS)
        self.bf16 = bf16
        if bf16:
            from jaxrlhf.models import dots

            self.a16 = self.a.astype(jnp.bfloat16)
            self._matmul16 = chain(dots.matmul, self.MM_REPS)

    def thunks(self) -> dict:
        out = {
            "limit/read": lambda: C.block(self._read(self.w, self.x)),
            "limit/matmul": lambda: C.block(self._matmul(self.a, self.a)),
        }
        if self.bf16:
            out["limit/matmul_bf16"] = lambda: C.block(self._matmul16(self.a16, self.a16))
        return out

    def rates(self, timed: dict) -> dict:
        """{read_gb_per_s, matmul_fp32_gflops} from `interleaved`'s medians."""
        read_bytes = self.READ_REPS * self.w.size * 4
        flops = self.MM_REPS * 2 * self.MM_N**3
        out = {
            "read_gb_per_s": round(read_bytes / timed["limit/read"]["median_s"] / 1e9, 2),
            "matmul_fp32_gflops": round(flops / timed["limit/matmul"]["median_s"] / 1e9, 2),
        }
        if "limit/matmul_bf16" in timed:
            out["matmul_bf16_gflops"] = round(
                flops / timed["limit/matmul_bf16"]["median_s"] / 1e9, 2
            )
        return out


def run(*, quick: bool = False) -> dict:
    n = 2048
    repeats = 3 if quick else 7
    out: dict = {"benchmark": "roofline", "matmul_n": n, "repeats": repeats}
    from jaxrlhf.models import dots

    # bf16 as the library multiplies it (`dots.matmul`: float32 accumulation, rounded after):
    # XLA:CPU's dot that returns bf16 itself misses the fast bf16 kernels and ran at about
    # half the rate of the one that returns float32, so it measured no product we run.
    products = {"fp32": (jnp.float32, lambda a, b: a @ b), "bf16": (jnp.bfloat16, dots.matmul)}
    for tag, (dtype, product) in products.items():
        k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
        t = _median_time(jax.jit(product), a, b, repeats=repeats)
        out[f"matmul_{tag}_gflops"] = round(2 * n**3 / t / 1e9, 2)
    # 256 MiB of float32 even for --quick: a 32 MiB array fits in one AMD EPYC L3 (32 MiB a
    # CCD) and its copy ran at 78 GB/s there, twice the 38-45 GB/s of main memory.
    size = 1 << 26
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
        [
            f"matmul {n}×{n} bf16 (float32 accumulation)",
            f"{result['matmul_bf16_gflops']:.1f} GFLOP/s",
        ],
        [
            f"copy (2 × {C.fmt_bytes(result['array_bytes'])} moved)",
            f"{result['copy_gb_per_s']:.1f} GB/s",
        ],
        [f"sum ({C.fmt_bytes(result['array_bytes'])} read)", f"{result['sum_gb_per_s']:.1f} GB/s"],
    ]
    return (
        f"Median of {result['repeats']} runs each. The fp32 matmul rate is the roofline "
        "that the training tables' “% fp32 matmul roofline” refers to; the larger of the two "
        "bandwidths is the headline's memory figure. The decode table times its own limits in "
        "its rounds (`SameRoundLimits`).\n\n" + C.table(["kernel", "rate"], rows)
    )
