"""Where a step's time goes: the XLA ops that take longest, from a `jax.profiler` trace.

    python benchmarks/profile_step.py --step rm --size 135M --mode lora [--top 25]
                                      [--dtype bfloat16]

Not part of `run_all.py`. Compiles the step, runs it once, traces `--steps` more, and prints
the top ops by total time per step, each with the JAX operation it came from (the HLO
`op_name` metadata), e.g. `transpose(jvp())/while/body/.../mul` is a backward-pass
elementwise op inside the layer loop.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from benchmarks.run_all import _setup_env

    _setup_env()
    import jax
    import numpy as np

    from benchmarks import common as C
    from benchmarks import dpo, grpo, rm

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--step", choices=("rm", "dpo", "grpo"), default="rm")
    p.add_argument("--size", default="10M", choices=sorted(C.SIZES))
    p.add_argument("--mode", choices=("lora", "full"), default="lora")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="the frozen base's"
    )
    args = p.parse_args()

    base = C.model_config(args.size)
    cfg, params = C.in_dtype(base, C.random_params(base), args.dtype)
    if args.step == "rm":
        batch = rm.pair_batch(cfg)
        case, _ = rm.build_case(args.mode, cfg, params, batch, flops=False)
    elif args.step == "dpo":
        batch = dpo.dpo_batch(cfg)
        case = dpo.build_case(args.mode, cfg, params, batch, flops=False)
    else:  # a whole iteration is traced; the op names resolve in the update's HLO
        prompts = C.random_ids(
            np.random.default_rng(0), (grpo.PROMPTS, grpo.PROMPT_LEN), cfg.vocab_size
        )
        case = grpo.build_case(args.mode, cfg, params, prompts, flops=False)
    hlo = case.hlo() if case.hlo else ""
    case.run()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.steps):
                case.run()
        files = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        trace = json.load(gzip.open(files[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
            continue
        if re.fullmatch(r"(while|call|conditional)(\.\d+)?", name):
            continue  # containers: their bodies' ops are listed themselves
        total[name] += e.get("dur", 0) / 1e6 / args.steps
        count[name] += 1
    op_names = dict(re.findall(r"%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", hlo))
    busy = sum(total.values())
    print(f"{args.step} {args.mode} {args.size}: {busy:.3f} s of XLA ops per step")
    print(f"{'s/step':>8} {'share':>6} {'calls':>6}  op  <- JAX operation")
    for name, t in total.most_common(args.top):
        print(
            f"{t:8.3f} {100 * t / busy:5.1f}% {count[name] // args.steps:6d}  {name}  "
            f"<- {op_names.get(name, '')[-90:]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
