"""The sampler's share of a decode step: this tree's `choose_tokens` against the one of an
earlier git revision, both inside the same KV-cache decode programs, timed in one
interleaved round-robin with the machine's read and matmul limits (`SameRoundLimits`).

    python -m benchmarks.sampler --rev 04c2780 --batches 1,16,64

Not part of `run_all.py` (it needs the repository's git history). Prints, per batch size,
the decode step of each sampler (time for 32 tokens − time for 1, over 31 steps), its
share of the two limits, and `choose_tokens` alone on [B, V] logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_at(rev: str):
    """`jaxrlhf.rollout.sampling` as it was at `rev`, imported under another name."""
    text = subprocess.run(
        ["git", "show", f"{rev}:jaxrlhf/rollout/sampling.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "sampling_at_rev.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("sampling_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    from benchmarks.run_all import _setup_env

    _setup_env()
    import jax
    import numpy as np

    from benchmarks import common as C
    from benchmarks import decode as D
    from benchmarks import roofline as R
    from benchmarks.rollout import Rollout
    from jaxrlhf.rollout import sampling as S

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rev", required=True, help="the git revision whose sampler is compared")
    p.add_argument("--size", default="135M", choices=sorted(C.SIZES))
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    samplers = {args.rev: _module_at(args.rev).choose_tokens, "this tree": S.choose_tokens}
    cfg = C.model_config(args.size)
    params = C.copy_tree(C.random_params(cfg))
    limits = R.SameRoundLimits()
    sampling = S.SamplingConfig(max_new_tokens=1, temperature=1.0, eos_token_ids=(), pad_token_id=0)
    print(f"{args.size}, prompt 32 + 32 new tokens, fp32, temperature 1; median of {args.repeats}")
    print(
        "| batch | sampler | decode step, ms | % read limit | % matmul limit | choose_tokens alone, ms |"
    )
    print("|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        ids = C.random_ids(np.random.default_rng(b), (b, D.PROMPT_LEN), cfg.vocab_size)
        logits = jax.random.normal(jax.random.PRNGKey(b), (b, cfg.vocab_size))
        uniforms = jax.random.uniform(jax.random.PRNGKey(b + 1), (b,))
        thunks = {}
        for name, choose in samplers.items():
            S.choose_tokens = choose  # read when the decode programs are traced, just below
            for n in (D.NEW_TOKENS, 1):
                r = Rollout(cfg, params, params, ids, lora_cfg=None, new_tokens=n)
                thunks[f"{name}/{n}"] = lambda r=r: r(params, jax.random.PRNGKey(0))
            alone = jax.jit(lambda lg, u, c=choose: c(lg, jax.random.PRNGKey(0), sampling, u))
            thunks[f"{name}/alone"] = lambda f=alone, lg=logits, u=uniforms: C.block(f(lg, u))
        S.choose_tokens = samplers["this tree"]
        thunks.update(limits.thunks())
        timed = C.interleaved(thunks, repeats=args.repeats, warmup=1)
        same = limits.rates(timed)
        context = D.PROMPT_LEN + D.NEW_TOKENS
        step_bytes = D.decode_bytes(cfg, params, batch=b, cache=context)["total"]
        for name in samplers:
            long, short = timed[f"{name}/{D.NEW_TOKENS}"], timed[f"{name}/1"]
            step = (long["median_s"] - short["median_s"]) / (D.NEW_TOKENS - 1)
            gb_s = step_bytes / step / 1e9
            gflop_s = C.forward_flops(cfg, tokens=b, context=context, lm_tokens=b) / step / 1e9
            print(
                f"| {b} | {name} | {step * 1e3:.1f} | {gb_s / same['read_gb_per_s']:.0%} of "
                f"{same['read_gb_per_s']:.1f} GB/s | {gflop_s / same['matmul_fp32_gflops']:.0%} of "
                f"{same['matmul_fp32_gflops']:.0f} GFLOP/s | "
                f"{timed[f'{name}/alone']['median_s'] * 1e3:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
