"""What every benchmark shares: the machine, timing, compiled-program statistics, peak RSS,
FLOP estimates, the model sizes and the results files.

Conventions (see BENCHMARKS.md):
- A "step" is one call of a compiled program (or a fixed sequence of them), blocked until its
  outputs are ready. Compilation happens before any timing.
- Variants compared with each other (LoRA vs full, jaxrlhf vs TRL) are timed in the same process,
  interleaved round by round, and summarised by the median, so that load from other processes
  on a shared machine hits both sides alike.
- XLA's cost analysis counts the body of a loop once, and the decoder runs its layers with
  `lax.scan`, so FLOPs are counted on a lowering with every scan unrolled (`xla_flops`).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
MIB = 1024 * 1024

# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU, cores, memory, library versions, the XLA environment, the date and the load."""
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        mem = None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "memory_gib": round(mem / 2**30, 1) if mem else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "peft": _version("peft"),
        "jax_devices": len(jax.devices()),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "NPROC": os.environ.get("NPROC", ""),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": load_average(),
    }


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (`/proc/stat`'s `cpu` line), in clock ticks."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None


def steal_share(start: list[int] | None, end: list[int] | None) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two `cpu_times()`.

    The guest's load average does not see it: on a shared VM host an idle-looking machine can
    lose a third of its cycles, and every absolute time measured then is that much slower.
    """
    if not start or not end or len(start) < 8 or len(end) < 8:
        return None
    delta = [b - a for a, b in zip(start[:8], end[:8], strict=True)]
    total = sum(delta)  # user nice system idle iowait irq softirq steal (guest is in user)
    return delta[7] / total if total > 0 else None


def machine_line(m: dict) -> str:
    load = m.get("loadavg_start")
    load_s = f"; 1-min load average at start {load[0]:.1f}" if load else ""
    if m.get("cpu_steal") is not None:
        load_s += f"; CPU time stolen by the VM host during the run {100 * m['cpu_steal']:.0f}%"
    parts = [f"{m['cpu']}, {m['cores']} cores, {m.get('memory_gib')} GiB", f"jax {m['jax']}"]
    for pkg in ("torch", "transformers", "trl", "peft"):
        if m.get(pkg):
            parts.append(f"{pkg} {m[pkg]}")
    return "; ".join(parts) + load_s


# ----------------------------------------------------------------------------- timing


def block(tree: Any) -> None:
    jax.block_until_ready(tree)


def summarize(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
        "times_s": [round(t, 5) for t in times],
    }


def interleaved(
    thunks: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1
) -> dict[str, dict]:
    """Time each thunk (one step, blocking) `repeats` times after `warmup` calls, round-robin:
    A B A B … with the order reversed every other round, so drift and other processes' load
    are shared. Returns name -> `summarize(times)`."""
    names = list(thunks)
    for _ in range(warmup):
        for n in names:
            thunks[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            thunks[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: summarize(t) for n, t in times.items()}


# ----------------------------------------------------------------------------- memory


def tree_bytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def copy_tree(tree: Any) -> Any:
    """Fresh device buffers (so donating one case's state never frees another's arrays)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# ----------------------------------------------------------------------------- compiled programs


def compile_program(
    fn: Callable,
    *args: Any,
    donate_argnums: tuple[int, ...] = (),
    static_argnums: tuple[int, ...] = (),
) -> tuple[Any, dict]:
    """(compiled executable, stats): compile time and `memory_analysis()` in bytes. `footprint`
    is argument + output + temp − aliased (donated) bytes: the program's peak working set."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate_argnums, static_argnums=static_argnums).lower(*args)
    compiled = lowered.compile()
    stats = {"compile_s": round(time.perf_counter() - t0, 2)}
    ma = compiled.memory_analysis()
    if ma is not None:
        arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
        temp, alias = int(ma.temp_size_in_bytes), int(ma.alias_size_in_bytes)
        stats.update(
            argument_bytes=arg,
            output_bytes=out,
            temp_bytes=temp,
            alias_bytes=alias,
            footprint_bytes=arg + out + temp - alias,
        )
    return compiled, stats


_orig_scan, _orig_map = jax.lax.scan, jax.lax.map


@contextlib.contextmanager
def _unrolled_scans():
    def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
        return _orig_scan(f, init, xs, length=length, reverse=reverse, unroll=True, **kw)

    def lax_map(f, xs, **kw):
        return scan(lambda _, x: ((), f(x)), (), xs)[1]

    jax.lax.scan, jax.lax.map = scan, lax_map
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.map = _orig_scan, _orig_map


def entry_float_buffers(compiled_text: str, shape: tuple[int, ...]) -> list[str]:
    """Instructions of an optimized HLO module's entry computation that make a float32
    array of `shape` (or a transpose of it), parameters left out: the weight-sized buffers
    the program puts in memory (a fusion's inner instructions are computed element by
    element and are not among them)."""
    import re

    entry = compiled_text[compiled_text.index("\nENTRY") :]
    found = []
    for line in entry.splitlines()[2:]:
        m = re.match(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]*)\]\S* (\w[\w-]*)\(", line)
        if m and m.group(2) != "parameter":
            dims = [int(d) for d in m.group(1).split(",") if d]
            if sorted(dims) == sorted(shape):
                found.append(line.strip())
    return found


def xla_flops(fn: Callable, *args: Any) -> float | None:
    """FLOPs of `fn(*args)` from XLA's HLO cost analysis of a lowering with every `lax.scan`
    unrolled (the analysis counts a loop body once). Not compiled; while loops (generation)
    are not covered, use the analytic estimates there."""
    try:
        with _unrolled_scans():
            # A fresh function object: jit caches traces per function, and a cached trace
            # would keep its rolled loops.
            lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
        cost = lowered.cost_analysis()
    except Exception as e:  # noqa: BLE001 - a missing figure must not stop the suite
        print(f"  (cost analysis failed: {type(e).__name__}: {e})")
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


# ----------------------------------------------------------------------------- FLOP models


def matmul_params(cfg) -> int:
    """Weights that take part in a matmul per token, excluding the vocabulary projection (a
    mixture of experts: the router and the k experts a token is routed to)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    attn = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d
    mlp = 3 * d * f * max(cfg.num_experts_per_tok, 1) + d * cfg.num_experts
    return cfg.num_layers * (attn + mlp)


def forward_flops(
    cfg, *, tokens: int, context: int, lm_tokens: int = 0, lora_r: int | None = None
) -> float:
    """Analytic FLOPs of one forward pass over `tokens` tokens (in rows of `context` keys):
    2·N_matmul per token, attention scores and mix (4·context·q_size per token and layer,
    dense as computed), the vocabulary projection for `lm_tokens`, and the LoRA side path."""
    flops = 2.0 * matmul_params(cfg) * tokens
    flops += 4.0 * cfg.num_layers * context * cfg.q_size * tokens
    flops += 2.0 * cfg.hidden_size * cfg.vocab_size * lm_tokens
    if lora_r:
        d, f = cfg.hidden_size, cfg.intermediate_size
        io = (d + cfg.q_size) * 2 + (d + cfg.kv_size) * 2
        io += (d + f) * 3 * max(cfg.num_experts_per_tok, 1)  # LoRA on each routed expert
        flops += 2.0 * lora_r * io * cfg.num_layers * tokens
    return flops


def train_flops(cfg, *, lora: bool, **kw) -> float:
    """Forward + backward: 3× the forward with full fine-tuning (activation and weight
    gradients), ~2× with LoRA (activation gradients only through the frozen weights)."""
    return (2.0 if lora else 3.0) * forward_flops(cfg, lora_r=16 if lora else None, **kw)


# ----------------------------------------------------------------------------- model sizes


SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    pad_token_id=2,
    bos_token_id=1,
    eos_token_id=(2,),
)

SIZES: dict[str, dict] = {
    # Random Llama-family configs; tied embeddings like SmolLM2. "2M" is for --quick only.
    "2M": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=(2,),
    ),
    "10M": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_layers=10,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=(2,),
    ),
    "60M": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=14,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=(2,),
    ),
    # SmolLM2-135M(-Instruct)'s own config (as loaded from its GGUF), random weights.
    "135M": SMOLLM2_135M,
    # Other families at SmolLM2-135M's shape (benchmarks/families.py): Qwen3 (per-head q/k
    # RMSNorm), and a Qwen3-MoE whose 8 experts of half the MLP width, top-2, keep the
    # active parameters per token equal to the dense model's (total ~374M).
    "135M-qwen3": {**SMOLLM2_135M, "model_type": "qwen3", "qk_norm": "head"},
    "135M-moe": {
        **SMOLLM2_135M,
        "model_type": "qwen3_moe",
        "qk_norm": "head",
        "intermediate_size": SMOLLM2_135M["intermediate_size"] // 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "router_aux_loss_coef": 0.001,  # Qwen3-MoE's own: the RM step adds the aux term
    },
}
SIZES["135M-moe-dense"] = {**SIZES["135M-moe"], "moe_dispatch": "dense"}


def model_config(size: str):
    from jaxrlhf.models.config import tiny_config

    return tiny_config(**SIZES[size])


def random_params(cfg, seed: int = 0) -> dict:
    """Random fp32 params on the host (numpy), so every case copies its own device buffers."""
    from jaxrlhf.models.transformer import init_params

    return jax.device_get(init_params(jax.random.PRNGKey(seed), cfg))


def in_dtype(cfg, params_host: dict, dtype: str):
    """`cfg` and `params_host` with the frozen base stored and computed in `dtype`
    (`model.dtype` = `model.param_dtype`); adapters, heads and optimizer state stay fp32."""
    import dataclasses

    import jax.numpy as jnp

    from jaxrlhf.models.transformer import cast_params

    if dtype == "float32":
        return cfg, params_host
    cast = jax.device_get(cast_params(params_host, jnp.dtype(dtype)))
    return dataclasses.replace(cfg, dtype=dtype), cast


def size_info(cfg) -> dict:
    return {
        "params": int(cfg.num_params()),
        "matmul_params": int(matmul_params(cfg)),
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
    }


def lora_config(task: str = "CAUSAL_LM", heads: tuple[str, ...] = ()):
    """The benchmark adapter: r=16, alpha=32, all seven projections, no dropout (TRL/PEFT's
    common RLHF setting)."""
    from jaxrlhf.lora import LoraConfig

    return LoraConfig(r=16, alpha=32.0, dropout=0.0, task_type=task, modules_to_save=heads)


def optimizer(total_steps: int = 1000):
    from jaxrlhf.config import OptimConfig
    from jaxrlhf.train.optim import make_optimizer

    return make_optimizer(OptimConfig(learning_rate=1e-5), total_steps)


def random_ids(rng: np.random.Generator, shape: tuple[int, ...], vocab: int) -> np.ndarray:
    """Token ids that are never a special token (0..2), so no row ends early."""
    return rng.integers(3, vocab, size=shape, dtype=np.int32)


# ----------------------------------------------------------------------------- roofline shares


def with_rates(
    entry: dict, *, flops: float | None, seconds: float, roofline: dict | None, key: str = ""
) -> None:
    """Add achieved GFLOP/s and the share of the measured fp32 matmul rate to `entry`."""
    if not flops or not seconds:
        return
    rate = flops / seconds / 1e9
    entry[f"{key}gflops_per_s"] = round(rate, 2)
    peak = (roofline or {}).get("matmul_fp32_gflops")
    if peak:
        entry[f"{key}roofline_share"] = round(rate / peak, 3)


def load_result(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def save_result(name: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ----------------------------------------------------------------------------- formatting


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}{suffix}"


def fmt_share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# Runs `sys.argv[2:]` and writes "<wait status> <ru_maxrss KiB>" of that child to sys.argv[1].
# A separate small process because Linux starts an exec'd child's ru_maxrss at the spawning
# process's own high-water mark (exec keeps the old memory map's peak in the counter):
# spawned from this benchmark, a child that allocates nothing would report this process's
# resident set. Spawned from here, the floor is a bare interpreter's (~10 MiB).
_PEAK_WRAPPER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(f'{status} {usage.ru_maxrss}')\n"
    "sys.exit(0 if status == 0 else 1)\n"
)


def parse_peak(text: str) -> tuple[int, int]:
    """(wait status, peak RSS in bytes) from `_PEAK_WRAPPER`'s "<status> <ru_maxrss KiB>"."""
    status, kib = text.split()
    return int(status), int(kib) * 1024


def run_child(args: list[str], log_path: Path) -> dict:
    """`python *args` in a fresh process, stdout and stderr to `log_path`: its wall time and
    peak resident set (`ru_maxrss` of that process alone, from `os.wait4` in a small
    intermediary process, `_PEAK_WRAPPER`)."""
    peak_path = log_path.with_suffix(".peak")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        subprocess.run(
            [sys.executable, "-c", _PEAK_WRAPPER, str(peak_path), sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
    seconds = time.perf_counter() - t0
    status, peak = parse_peak(peak_path.read_text()) if peak_path.exists() else (-1, 0)
    if status != 0:
        raise RuntimeError(f"python {' '.join(args)} failed (wait status {status}); see {log_path}")
    return {"wall_s": seconds, "peak_rss": peak}
