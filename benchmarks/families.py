"""A LoRA reward-model step and decode for three families at SmolLM2-135M's shape, side by side.

    PYTHONPATH=. python -m benchmarks.families [--sizes 135M,135M-qwen3,135M-moe] [--repeats 2]

Sizes (benchmarks/common.py `SIZES`, random weights, fp32): `135M` is SmolLM2-135M's own
Llama config; `135M-qwen3` the same shape as Qwen3 (per-head q/k RMSNorm); `135M-moe` a
Qwen3-MoE of 8 experts of half the MLP width, top-2 (active parameters per token as the dense
model's, ~374M in all), with its router aux loss in the step; `135M-moe-dense` the same
with `moe_dispatch: dense`. The steps are `benchmarks/rm.py`'s (8 pairs × 64 tokens, prompt
once, LoRA r=16 on every projection — the experts' too — plus the score head) and
`benchmarks/decode.py`'s (batch 16, 32-token prompt, 32 new tokens, merged LoRA). Every
model's step is built first, then all are timed in one interleaved round-robin per
benchmark, so they share the machine's load. Results: benchmarks/results/families.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_SIZES = ("135M", "135M-qwen3", "135M-moe")
BATCH = 16


def _rm_rows(sizes, repeats: int) -> list[dict]:
    from benchmarks import common as C
    from benchmarks import rm

    built, thunks = {}, {}
    for size in sizes:
        print(f"[families] rm {size}: compiling", flush=True)
        cfg = C.model_config(size)
        case, _ = rm.build_case("lora", cfg, C.random_params(cfg), rm.pair_batch(cfg), flops=False)
        built[size] = (cfg, case)
        thunks[size] = case.run
    timed = C.interleaved(thunks, repeats=repeats, warmup=1)
    rows = []
    for size, (cfg, case) in built.items():
        t = timed[size]
        rows.append(
            {
                "size": size,
                "model_type": cfg.model_type,
                "params": int(cfg.num_params()),
                "active_matmul_params": int(C.matmul_params(cfg)),
                "tokens": case.tokens,
                "step_s": t,
                "tokens_per_s": case.tokens / t["median_s"],
                "gflop_analytic": case.flops_analytic / 1e9,
                "compiled_peak_bytes": case.programs["step"].get("footprint_bytes"),
                "trainable_bytes": case.trainable_bytes + case.optimizer_bytes,
            }
        )
    return rows


def _decode_rows(sizes, repeats: int) -> list[dict]:
    import jax
    import numpy as np

    from benchmarks import common as C
    from benchmarks.decode import NEW_TOKENS, PROMPT_LEN
    from benchmarks.rollout import Rollout
    from jaxrlhf.lora import init_lora

    built, thunks = {}, {}
    for size in sizes:
        print(f"[families] decode {size}: compiling", flush=True)
        cfg = C.model_config(size)
        params = C.copy_tree(C.random_params(cfg))
        lora_cfg = C.lora_config()
        adapter = init_lora(jax.random.PRNGKey(1), params, lora_cfg, cfg)
        ids = C.random_ids(np.random.default_rng(BATCH), (BATCH, PROMPT_LEN), cfg.vocab_size)
        key = jax.random.PRNGKey(0)
        for n in (NEW_TOKENS, 1):
            r = Rollout(cfg, params, adapter, ids, lora_cfg=lora_cfg, new_tokens=n, merge=True)
            thunks[f"{size}/{n}"] = lambda r=r, a=adapter, k=key: r(a, k)
        built[size] = cfg
    timed = C.interleaved(thunks, repeats=repeats, warmup=1)
    rows = []
    for size, cfg in built.items():
        long, short = timed[f"{size}/{NEW_TOKENS}"], timed[f"{size}/1"]
        step = (long["median_s"] - short["median_s"]) / (NEW_TOKENS - 1)
        rows.append(
            {
                "size": size,
                "model_type": cfg.model_type,
                "params": int(cfg.num_params()),
                "batch": BATCH,
                "generate_s": long,
                "prefill_s": short,
                "decode_step_s": step,
                "decode_tokens_per_s": BATCH / step if step > 0 else None,
                "total_tokens_per_s": BATCH * NEW_TOKENS / long["median_s"],
            }
        )
    return rows


def _range(t: dict) -> str:
    return f"{t['median_s']:.3f} ({t['min_s']:.3f}–{t['max_s']:.3f}, n={t['n']})"


def render(result: dict) -> str:
    from benchmarks import common as C

    base = {r["size"]: r for r in result["rm"]}.get("135M")
    rm_rows = [
        [
            f"{r['size']} ({r['model_type']})",
            f"{r['params'] / 1e6:.0f}M / {r['active_matmul_params'] / 1e6:.0f}M",
            _range(r["step_s"]),
            f"{r['tokens_per_s']:.0f}",
            f"{r['step_s']['median_s'] / base['step_s']['median_s']:.2f}×" if base else "",
            C.fmt_bytes(r["compiled_peak_bytes"]),
            C.fmt_bytes(r["trainable_bytes"]),
        ]
        for r in result["rm"]
    ]
    dbase = {r["size"]: r for r in result["decode"]}.get("135M")
    decode_rows = [
        [
            f"{r['size']} ({r['model_type']})",
            str(r["batch"]),
            _range(r["prefill_s"]),
            _range(r["generate_s"]),
            C.fmt(r["decode_step_s"] * 1e3, 1),
            C.fmt(r["decode_tokens_per_s"], 0),
            f"{r['decode_step_s'] / dbase['decode_step_s']:.2f}×" if dbase else "",
        ]
        for r in result["decode"]
    ]
    return "\n".join(
        [
            "LoRA reward-model step (8 pairs × 64 tokens, prompt once; r=16 on every projection "
            "and expert + score head):",
            "",
            C.table(
                [
                    "model",
                    "params total / matmul per token",
                    "step s, median (min–max)",
                    "tokens/s",
                    "time vs 135M",
                    "compiled peak",
                    "trainable + Adam",
                ],
                rm_rows,
            ),
            "",
            f"Decode, batch {BATCH}, 32-token prompt, 32 new tokens, merged LoRA, temperature 1:",
            "",
            C.table(
                [
                    "model",
                    "batch",
                    "prefill + 1 token, s (min–max)",
                    "prefill + 32 tokens, s (min–max)",
                    "decode step, ms",
                    "decode tokens/s",
                    "step vs 135M",
                ],
                decode_rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=lambda s: s.split(","), default=list(DEFAULT_SIZES))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", choices=("rm", "decode"), default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from benchmarks import common as C

    machine = C.machine_info()
    t0 = time.perf_counter()
    result = {"benchmark": "families", "sizes": args.sizes, "rm": [], "decode": []}
    if args.only in (None, "rm"):
        result["rm"] = _rm_rows(args.sizes, args.repeats)
    if args.only in (None, "decode"):
        result["decode"] = _decode_rows(args.sizes, args.repeats + 1)
    result["meta"] = {
        "command": "python -m benchmarks.families " + " ".join(argv or sys.argv[1:]),
        "machine": machine,
        "elapsed_s": time.perf_counter() - t0,
    }
    C.save_result("families", result)
    print(f"machine: {C.machine_line(machine)}; {result['meta']['elapsed_s']:.0f} s")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
