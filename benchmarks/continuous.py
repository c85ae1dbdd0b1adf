"""Continuous batching against the static sampler on a rollout with varied lengths.

    python benchmarks/continuous.py                       # 10M model, CPU, fp32
    python benchmarks/continuous.py --size 2M --prompts 32 --repeats 1   # a quick smoke run
    python benchmarks/continuous.py --size 1B --dtype bfloat16           # on an accelerator

Workload: `prompts` prompts of `prompt_len` tokens, each with a response length drawn from a
log-normal (median `median_len`, sigma 0.8) clipped to [1, max_new_tokens = 128]. A random
model never chooses where to stop, so each row's length is imposed as its budget
(`ContinuousEngine(...).generate(budgets=...)`): the row stops there as it would at an EOS
(the model's EOS ids are honoured as well). The static `Sampler` cannot stop a row early
except at an EOS, so it decodes the whole batch until `max_new_tokens` and its useful tokens
are the same sum of lengths; tokens/s counts only those useful tokens for both engines.

Slot occupancy: the share of decode slot-steps that advanced a live row (token 0 comes from
the prefill in both engines): static, sum(len - 1) / (B x (N - 1)); continuous, measured by
the engine (`RolloutMetrics.slot_occupancy`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: import the library from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C

MAX_NEW = 128

# Accelerator-sized random configs (`--size`; `benchmarks/device.sh` runs them in bf16):
# Llama-3.2-1B's and Qwen3-1.7B's shapes (rope scaling left out: it does not change the cost).
DEVICE_SIZES: dict[str, dict] = {
    "llama-1B": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=(2,),
    ),
    "qwen3-1.7B": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        qk_norm="head",
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        model_type="qwen3",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=(2,),
    ),
}
SIZES = {**C.SIZES, **DEVICE_SIZES}


def lognormal_lengths(rng: np.random.Generator, n: int, *, median: float, max_len: int):
    """Response lengths: exp(N(log median, 0.8²)), rounded, clipped to [1, max_len]."""
    raw = np.exp(rng.normal(np.log(median), 0.8, size=n))
    return np.clip(np.rint(raw), 1, max_len).astype(np.int32)


def _cast(tree, dtype):
    return jax.tree.map(
        lambda x: (
            jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x)
        ),
        tree,
    )


def run(
    *,
    size: str = "10M",
    prompts: int = 64,
    slots: tuple[int, ...] = (16, 32),
    prompt_len: int = 32,
    median_len: float = 24.0,
    max_new_tokens: int = MAX_NEW,
    repeats: int = 2,
    dtype: str = "float32",
    config: dict | None = None,
    prefill_batch: int = 1,
    refill_at: int = 1,
) -> dict:
    from jaxrlhf.models.config import tiny_config
    from jaxrlhf.rollout.continuous import ContinuousEngine, static_slot_occupancy
    from jaxrlhf.rollout.engine import Sampler

    cfg = tiny_config(**{**(config or SIZES[size]), "dtype": dtype})
    params = _cast(C.random_params(cfg), jnp.dtype(dtype))
    rng = np.random.default_rng(0)
    ids = C.random_ids(rng, (prompts, prompt_len), cfg.vocab_size)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    lengths = lognormal_lengths(rng, prompts, median=median_len, max_len=max_new_tokens)
    gen = SimpleNamespace(
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        merge_adapter=True,
        max_rank=None,
    )
    common = dict(lora_cfg=None, eos_token_ids=tuple(cfg.eos_token_id), pad_token_id=0)
    useful = int(lengths.sum())
    key = jax.random.PRNGKey(0)
    result = {
        "benchmark": "continuous",
        "size": size,
        "params": int(cfg.num_params()),
        "dtype": dtype,
        "prompts": prompts,
        "prompt_len": prompt_len,
        "max_new_tokens": max_new_tokens,
        "median_len": median_len,
        "prefill_batch": prefill_batch,
        "refill_at": refill_at,
        "lengths": {"mean": float(lengths.mean()), "max": int(lengths.max()), "sum": useful},
        "rows": [],
    }

    static = Sampler(cfg, gen, **common)  # as the online driver builds it
    thunks = {"static": lambda: C.block(static(params, None, batch, key).tokens)}
    engines = {}
    for s in slots:
        engines[s] = ContinuousEngine(
            cfg,
            gen,
            slots=s,
            prefill_batch=min(prefill_batch, s),
            refill_at=min(refill_at, s),
            **common,
        )
        thunks[f"continuous/{s}"] = lambda e=engines[s]: C.block(
            e(params, None, batch, key, budgets=lengths).tokens
        )
    timed = C.interleaved(thunks, repeats=repeats, warmup=1)

    out = static(params, None, batch, key)
    steps_static = int(np.asarray(out.response_mask).sum(1).max())  # no EOS: N for every row
    occ_static = float(np.sum(lengths - 1) / (prompts * max(steps_static - 1, 1)))
    result["rows"].append(
        {
            "engine": "static",
            "slots": prompts,
            "seconds": timed["static"]["median_s"],
            "tokens_per_s": useful / timed["static"]["median_s"],
            "slot_occupancy": occ_static,
            "occupancy_if_eos_stopped": static_slot_occupancy(
                np.arange(max_new_tokens)[None] < lengths[:, None]
            ),
            "decode_steps": steps_static - 1,
            "programs": static._generate.num_programs(),
            "timing": timed["static"],
        }
    )
    for s, engine in engines.items():
        t = timed[f"continuous/{s}"]
        m = engine.last_metrics
        result["rows"].append(
            {
                "engine": "continuous",
                "slots": s,
                "seconds": t["median_s"],
                "tokens_per_s": useful / t["median_s"],
                "slot_occupancy": m.slot_occupancy,
                "prefill_share": m.prefill_share,
                "decode_steps": m.decode_steps,
                "truncation_rate": m.truncation_rate,
                "programs": engine.num_programs(),
                "timing": t,
            }
        )
    return result


def render(result: dict) -> str:
    static = result["rows"][0]
    rows = []
    for r in result["rows"]:
        rows.append(
            [
                r["engine"],
                r["slots"],
                C.fmt(r["seconds"], 2),
                C.fmt(r["tokens_per_s"], 0),
                C.fmt(r["tokens_per_s"] / static["tokens_per_s"], 2) + "×",
                C.fmt_share(r["slot_occupancy"]),
                C.fmt_share(r.get("prefill_share")),
                r["decode_steps"],
                r["programs"],
            ]
        )
    lengths = result["lengths"]
    return "\n".join(
        [
            f"{result['size']} ({result['params'] / 1e6:.0f}M params, {result['dtype']}), "
            f"{result['prompts']} prompts of {result['prompt_len']} tokens, response lengths "
            f"log-normal (median {result['median_len']:g}, mean {lengths['mean']:.1f}, max "
            f"{lengths['max']}) within max_new_tokens {result['max_new_tokens']}; prefill "
            f"batch {result.get('prefill_batch', 1)}, refill at {result.get('refill_at', 1)} free "
            "slots; tokens/s "
            f"counts the {lengths['sum']} useful tokens. Static occupancy had every row stopped "
            f"at an EOS at its length: {C.fmt_share(static['occupancy_if_eos_stopped'])}.",
            "",
            C.table(
                [
                    "engine",
                    "slots",
                    "rollout, s",
                    "useful tokens/s",
                    "vs static",
                    "slot occupancy",
                    "prefill share",
                    "decode steps",
                    "programs",
                ],
                rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="10M", help=f"one of {sorted(SIZES)}")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--slots", default="16,32", help="comma-separated slot counts")
    ap.add_argument("--median-len", type=float, default=24.0)
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefill-batch", type=int, default=1, help="ContinuousEngine(prefill_batch=)")
    ap.add_argument("--refill-at", type=int, default=1, help="ContinuousEngine(refill_at=)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", default="continuous", help="results/<out>.json")
    args = ap.parse_args(argv)
    if args.size not in SIZES:
        raise ValueError(f"--size must be one of {sorted(SIZES)}, got {args.size!r}")
    start = time.perf_counter()
    result = run(
        size=args.size,
        prompts=args.prompts,
        slots=tuple(int(s) for s in args.slots.split(",")),
        prompt_len=args.prompt_len,
        median_len=args.median_len,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        dtype=args.dtype,
        prefill_batch=args.prefill_batch,
        refill_at=args.refill_at,
    )
    result["meta"] = {
        "command": "python benchmarks/continuous.py " + " ".join(argv or sys.argv[1:]),
        "machine": C.machine_info(),
        "devices": [str(d) for d in jax.devices()],
        "elapsed_s": time.perf_counter() - start,
    }
    path = C.save_result(args.out, result)
    print(render(result))
    print(f"\n{C.machine_line(result['meta']['machine'])}; devices {result['meta']['devices'][:1]}")
    print(f"results: {path}")
    return result


if __name__ == "__main__":
    main()
