"""Time a demo's PPO stage again, on whichever checkout is on PYTHONPATH.

Compares two commits like for like: the same PPO config and reward model (both from an earlier
`make run`'s run directory), the demo's training prompts, no evaluation. Run it once per commit,
in the order old, new, new, old, so that a drift in the host's load favours neither side:

    cd OLD_CHECKOUT && PYTHONPATH=. python NEW_CHECKOUT/benchmarks/ppo_stage.py runs/demo /tmp/a
    cd NEW_CHECKOUT && PYTHONPATH=. python benchmarks/ppo_stage.py OLD_CHECKOUT/runs/demo /tmp/b

Prints one JSON line: wall seconds, the share of CPU time the VM host stole, and per iteration
the seconds, rollout tokens/s (generation and scoring) and update tokens/s. Only APIs that
predate the rollout engine are used, so an older checkout runs it unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np


def load_common():
    """This file's `benchmarks/common.py`, whatever checkout `benchmarks` resolves to."""
    spec = importlib.util.spec_from_file_location(
        "bench_common", Path(__file__).with_name("common.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_train_prompts(seed: int, n_eval: int, n_train: int) -> list[str]:
    """The demo's training prompts: its one shuffle by the seed, after the held-out ones
    (`commands.demo.split_prompts` today; written out because older checkouts lack it)."""
    from jaxrlhf.commands.demo import demo_prompts

    prompts = demo_prompts()
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[n_eval : n_eval + n_train]]


def main() -> None:
    from jaxrlhf import config as C
    from jaxrlhf.algorithms.ppo import PPOConfig
    from jaxrlhf.train.runs import run_ppo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "demo_dir", type=Path, help="an earlier demo run (its ppo/config.yaml, rm/adapter)"
    )
    ap.add_argument("run_dir", type=Path, help="where this run writes (must not exist)")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--train-prompts", type=int, default=384)
    args = ap.parse_args()

    if args.run_dir.exists():
        ap.error(f"{args.run_dir} exists: give a new run directory (this run would resume it)")
    common = load_common()
    cfg = C.load_config(
        PPOConfig,
        args.demo_dir / "ppo" / "config.yaml",
        [
            f"run.run_dir={args.run_dir}",
            f"reward_model.path={args.demo_dir / 'rm' / 'adapter'}",
            f"num_iterations={args.iterations}",
            "run.eval_every=1000000",
            "run.save_every=1000000",
            "run.progress=false",
        ],
    )
    prompts = demo_train_prompts(args.seed, args.eval_prompts, args.train_prompts)
    ticks, t0 = common.cpu_times(), time.perf_counter()
    run_ppo(cfg, source={"train": [{"prompt": p} for p in prompts]})
    wall, steal = time.perf_counter() - t0, common.steal_share(ticks, common.cpu_times())
    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/rollout_tokens_per_s" in r]
    print(
        json.dumps(
            {
                "wall_s": round(wall, 1),
                "steal_pct": None if steal is None else round(100 * steal, 1),
                "iteration_s": [
                    round(b["time"] - a["time"], 1) for a, b in zip(rows, rows[1:], strict=False)
                ],
                "rollout_tokens_per_s": [round(r["time/rollout_tokens_per_s"], 1) for r in rows],
                "update_tokens_per_s": [round(r["time/update_tokens_per_s"], 1) for r in rows],
            }
        )
    )


if __name__ == "__main__":
    main()
