"""A GRPO iteration in float32 and in bfloat16 on the CPU, side by side in one process.

    PYTHONPATH=. python benchmarks/bf16_cpu.py [--rounds 4] [--size 135M]

`benchmarks/grpo.py`'s case (4 prompts × 4 completions, prompt 32 + 32 sampled tokens, LoRA,
β = 0, one optimizer step) built twice on the same random weights: once in float32, once
with the frozen base stored and computed in bfloat16 (`model.dtype` and
`model.param_dtype` = bfloat16; the adapter and its optimizer stay float32). Rounds
alternate the order (f32, bf16, bf16, f32, ...) so both see the same load; prints JSON with
each phase's seconds per round and the CPU share the VM host stole. Not part of
`run_all.py`; its numbers are in docs/speed.md ("bfloat16 on the CPU").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import numpy as np

    from benchmarks import common as C
    from benchmarks import grpo

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="135M", choices=sorted(C.SIZES))
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    cfg = C.model_config(args.size)
    params = C.random_params(cfg)
    prompts = C.random_ids(
        np.random.default_rng(0), (grpo.PROMPTS, grpo.PROMPT_LEN), cfg.vocab_size
    )
    cfg16, params16 = C.in_dtype(cfg, params, "bfloat16")
    cases = {
        "float32": grpo.build_case("lora", cfg, params, prompts, flops=False),
        "bfloat16": grpo.build_case("lora", cfg16, params16, prompts, flops=False),
    }
    for case in cases.values():  # warm-up: compiled, caches touched
        case.run()
    times: dict[str, list[dict]] = {k: [] for k in cases}
    start = C.cpu_times()
    for r in range(args.rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in order:
            phases = cases[name].run()
            times[name].append({**phases, "iteration": sum(phases.values())})
    steal = C.steal_share(start, C.cpu_times())
    out = {
        "benchmark": "bf16_cpu",
        "size": args.size,
        "machine": C.machine_line(C.machine_info()),
        "steal": steal,
        "seconds": {
            name: {
                ph: sorted(round(t[ph], 3) for t in ts) for ph in ("rollout", "update", "iteration")
            }
            for name, ts in times.items()
        },
    }
    f32 = statistics.median(t["iteration"] for t in times["float32"])
    b16 = statistics.median(t["iteration"] for t in times["bfloat16"])
    out["bf16_speedup"] = round(f32 / b16, 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
