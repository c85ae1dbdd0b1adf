"""Decode throughput of the KV-cache sampler against the machine's two limits: read
bandwidth (a batch-1 step is a read of every weight) and the fp32 matmul rate (a batch-16
or -64 step is mostly matrix products), both timed in the same interleaved rounds as the
decode programs (`roofline.SameRoundLimits`: a 256 MiB matrix-vector product, a 2048²
matmul), so a share does not mix two moments of a shared machine.

For each model and batch size, `generate` is compiled for N new tokens and for one (prefill
plus the first token); the decode step time is their difference over N − 1 steps. A decode
step reads every weight once (the tied embedding twice: the gathered rows and the vocabulary
projection, counted once here) and the whole KV cache (`2·L·B·S·KVH·hd` floats, S = P + N:
the cache is allocated at full length and attention runs over every slot, masked). The
"merged" row samples as `rollout.Sampler` does by default: a LoRA adapter folded into
per-block weights whose kernels are stored [out, in] (`merged_rollout_weights`); both of its
programs run the merge, so the step time excludes it and the prefill column includes it. The
"unmerged LoRA" row samples with the adapter applied on the fly (`generation.merge_adapter:
false`) instead of merged into the weights.

`dtype="bfloat16"` runs the same programs with the frozen base (and so the KV cache) in
bf16: the bytes a step reads halve, and the limits add the rate of a 2048² bf16 product
accumulated in fp32 (the form every bf16 product of the decoder takes on the CPU,
`models/dots.py`), timed in the same rounds beside the fp32 one.
"""

from __future__ import annotations

import jax
import numpy as np

from benchmarks import common as C
from benchmarks import roofline as R
from benchmarks.rollout import Rollout

PROMPT_LEN, NEW_TOKENS = 32, 32


def decode_bytes(cfg, params: dict, *, batch: int, cache: int, lora: dict | None = None) -> dict:
    weights = C.tree_bytes({k: v for k, v in params.items() if k not in ("score", "value")})
    width = np.dtype(cfg.dtype).itemsize if cfg.dtype != "bfloat16" else 2
    kv = 2 * cfg.num_layers * batch * cache * cfg.num_kv_heads * cfg.head_dim * width
    extra = C.tree_bytes(lora) if lora is not None else 0
    return {"weights": weights + extra, "kv_cache": kv, "total": weights + extra + kv}


def run(
    *,
    sizes: list[str],
    batches: tuple[int, ...],
    repeats: int,
    lora_batches: tuple[int, ...] = (16,),
    dtype: str = "float32",
) -> dict:
    from jaxrlhf.lora import init_lora

    limits = R.SameRoundLimits(bf16=dtype == "bfloat16")
    result = {
        "benchmark": "decode",
        "prompt": PROMPT_LEN,
        "new_tokens": NEW_TOKENS,
        "dtype": dtype,
        "rows": [],
    }
    for size in sizes:
        print(f"[decode] {size}", flush=True)
        base = C.model_config(size)
        cfg, params = C.in_dtype(base, C.random_params(base), dtype)
        params = C.copy_tree(params)
        lora_cfg = C.lora_config()
        adapter = init_lora(jax.random.PRNGKey(1), params, lora_cfg, cfg)
        for b in batches:
            ids = C.random_ids(np.random.default_rng(b), (b, PROMPT_LEN), cfg.vocab_size)
            # "merged": the adapter folded in as `rollout.Sampler` does (per-block arrays,
            # kernels stored [out, in]); the merge runs in both timed programs and cancels.
            variants = [("merged", True)]
            if b in lora_batches:
                variants.append(("unmerged LoRA", False))
            # Every program of this batch size is timed in one interleaved round-robin, so
            # the merged/unmerged comparison shares the machine's load.
            thunks, built = {}, {}
            for name, merge in variants:
                long, short = (
                    Rollout(cfg, params, adapter, ids, lora_cfg=lora_cfg, new_tokens=n, merge=merge)
                    for n in (NEW_TOKENS, 1)
                )
                key = jax.random.PRNGKey(0)
                thunks[f"{name}/long"] = lambda r=long, p=adapter, k=key: r(p, k)
                thunks[f"{name}/short"] = lambda r=short, p=adapter, k=key: r(p, k)
                built[name] = long
            thunks.update(limits.thunks())
            timed = C.interleaved(thunks, repeats=repeats, warmup=1)
            same = limits.rates(timed)
            for name, merge in variants:
                long = built[name]
                t = {"long": timed[f"{name}/long"], "short": timed[f"{name}/short"]}
                step_s = (t["long"]["median_s"] - t["short"]["median_s"]) / (NEW_TOKENS - 1)
                by = decode_bytes(
                    cfg,
                    params,
                    batch=b,
                    cache=PROMPT_LEN + NEW_TOKENS,
                    lora=None if merge else adapter,
                )
                step_flops = C.forward_flops(
                    cfg,
                    tokens=b,
                    context=PROMPT_LEN + NEW_TOKENS,
                    lm_tokens=b,
                    lora_r=None if merge else 16,
                )
                row = {
                    "size": size,
                    "params": int(cfg.num_params()),
                    "batch": b,
                    "variant": name,
                    "generate_s": t["long"]["median_s"],
                    "prefill_s": t["short"]["median_s"],
                    "decode_step_s": step_s,
                    "decode_tokens_per_s": b / step_s if step_s > 0 else None,
                    "total_tokens_per_s": b * NEW_TOKENS / t["long"]["median_s"],
                    "bytes_per_step": by,
                    "bytes_per_token": by["total"] / b,
                    "achieved_gb_per_s": by["total"] / step_s / 1e9 if step_s > 0 else None,
                    "step_gflop": step_flops / 1e9,
                    "programs": long.programs,
                    "limits_same_rounds": same,
                }
                if row["achieved_gb_per_s"]:
                    row["bandwidth_share"] = row["achieved_gb_per_s"] / same["read_gb_per_s"]
                C.with_rates(row, flops=step_flops, seconds=step_s, roofline=same)
                if same.get("matmul_bf16_gflops") and step_s > 0:
                    row["bf16_matmul_share"] = (
                        step_flops / step_s / 1e9 / same["matmul_bf16_gflops"]
                    )
                result["rows"].append(row)
        del params, adapter
    return result


def render(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        rows.append(
            [
                f"{r['size']} ({r['params'] / 1e6:.0f}M)",
                r["batch"],
                r["variant"],
                C.fmt(r["prefill_s"], 3),
                C.fmt(r["decode_step_s"] * 1e3, 1),
                C.fmt(r["decode_tokens_per_s"], 0),
                C.fmt(r["total_tokens_per_s"], 0),
                C.fmt_bytes(r["bytes_per_token"]),
                f"{C.fmt_bytes(r['bytes_per_step']['weights'])} + "
                f"{C.fmt_bytes(r['bytes_per_step']['kv_cache'])}",
                C.fmt(r["achieved_gb_per_s"], 1),
                C.fmt(r["limits_same_rounds"]["read_gb_per_s"], 1),
                C.fmt_share(r.get("bandwidth_share")),
                C.fmt(r["limits_same_rounds"]["matmul_fp32_gflops"], 0),
                C.fmt_share(r.get("roofline_share")),
            ]
        )
    return "\n".join(
        [
            f"Prompt {result['prompt']} tokens, {result['new_tokens']} new tokens, "
            f"{result.get('dtype', 'float32')}, sampling "
            "at temperature 1 with no early stop. Decode step = (time for N tokens − time for 1) / "
            "(N − 1). The limits are timed in the same rounds as the row's programs.",
            "",
            C.table(
                [
                    "model",
                    "batch",
                    "weights",
                    "prefill + 1 token, s",
                    "decode step, ms",
                    "decode tokens/s",
                    "end-to-end tokens/s",
                    "bytes / decoded token",
                    "bytes / step (weights + KV)",
                    "achieved GB/s",
                    "read limit, GB/s",
                    "% read limit",
                    "matmul limit, GFLOP/s",
                    "% matmul limit",
                ],
                rows,
            ),
        ]
    )


def main() -> None:
    """`python -m benchmarks.decode --sizes 135M --batches 1,16,64`: the decode table with
    its same-round limits, printed (no file is written)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--sizes", default="135M", help="comma-separated model sizes")
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-batches", default="", help="batches that also run unmerged LoRA")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    result = run(
        sizes=args.sizes.split(","),
        batches=tuple(int(b) for b in args.batches.split(",")),
        repeats=args.repeats,
        lora_batches=tuple(int(b) for b in args.lora_batches.split(",") if b),
        dtype=args.dtype,
    )
    print(render(result))
    for r in result["rows"]:
        if "bf16_matmul_share" in r:
            print(
                f"batch {r['batch']} {r['variant']}: "
                f"{100 * r['bf16_matmul_share']:.0f}% of the bf16 matmul limit "
                f"({r['limits_same_rounds']['matmul_bf16_gflops']:.0f} GFLOP/s)"
            )


if __name__ == "__main__":
    main()
