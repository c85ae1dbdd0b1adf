"""The KL-budget controller on the demo's PPO stage: the policy trained against the reward
models of a finished `make run`, once per controller setting, with the gold (VADER) score
and the KL of every evaluation — how close each setting holds the budget, and at what gold.

Each variant is `lookahead:max_step:kl_coef[:max_relax]` (`advantages.update_kl_budget`'s
lookahead, max_step and max_relax — its default when left out — and the run's starting β);
the rest is the demo's PPO stage as `make run` runs it.

    make run                                    # writes runs/demo/rm/adapter
    PYTHONPATH=. python -m benchmarks.kl_budget --variants 1:2:0.05,2:2:0.1,2:1.5:0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
from pathlib import Path
from unittest import mock

from jaxrlhf import advantages
from jaxrlhf import config as C
from jaxrlhf.commands import demo as D
from jaxrlhf.train import online

DEFAULT_RELAX = inspect.signature(advantages.update_kl_budget).parameters["max_relax"].default


def parse_variant(text: str) -> dict:
    try:
        values = [float(x) for x in text.split(":")]
        if len(values) not in (3, 4):
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"--variants: {text!r} is not lookahead:max_step:kl_coef[:max_relax]"
        ) from None
    lookahead, max_step, kl_coef, max_relax = [*values, DEFAULT_RELAX][:4]
    return {
        "lookahead": lookahead,
        "max_step": max_step,
        "kl_coef": kl_coef,
        "max_relax": max_relax,
    }


def run_variant(cfg: D.DemoConfig, variant: dict, reward_model: str, out: Path) -> dict:
    """The PPO stage with the controller's lookahead, max_step and max_relax set for this
    run."""
    rule = functools.partial(
        advantages.update_kl_budget,
        lookahead=variant["lookahead"],
        max_step=variant["max_step"],
        max_relax=variant["max_relax"],
    )
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, kl_coef=variant["kl_coef"]))
    train, held = D.split_prompts(cfg)
    data = D.Prepared(train, held, [], {})
    name = "la{lookahead:g}_step{max_step:g}_relax{max_relax:g}_beta{kl_coef:g}".format(**variant)
    timings, peaks = {}, {}
    with mock.patch.object(online, "update_kl_budget", rule):  # the driver's, for this run
        D.train_policy(
            cfg, data, reward_model=reward_model, out_dir=out / name, timings=timings, peaks=peaks
        )
    curve = D.eval_curve(out / name / "ppo")
    return {
        **variant,
        "seconds": timings["ppo"],
        "curve": [
            {k: r[k] for k in ("step", "gold", "kl", "distinct_2", "kl_coef")} for r in curve
        ],
    }


def markdown(results: list[dict], budget: float) -> str:
    lines = [
        "| lookahead | max step | max relax | β₀ | gold / KL at each evaluation | final gold "
        f"| final KL | ≤ {budget:g} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        path = ", ".join(f"{p['gold']:.2f} / {p['kl']:.1f}" for p in r["curve"][1:])
        final = r["curve"][-1]
        held = "yes" if final["kl"] <= budget else "no"
        lines.append(
            f"| {r['lookahead']:g} | ×{r['max_step']:g} | ÷{r.get('max_relax', r['max_step']):g} "
            f"| {r['kl_coef']:g} | {path} | "
            f"{final['gold']:.3f} | {final['kl']:.2f} | {held} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward-model", default="runs/demo/rm/adapter")
    p.add_argument("--out", type=Path, default=Path("runs/kl_budget"))
    p.add_argument("--variants", default="1:2:0.05,2:2:0.1,2:1.5:0.1")
    p.add_argument("overrides", nargs="*", help="demo options (e.g. ppo.num_iterations=20)")
    args = p.parse_args(argv)
    if not Path(args.reward_model).exists():
        raise SystemExit(f"{args.reward_model}: missing; run `make run` first")
    cfg = C.load_config(D.DemoConfig, None, list(args.overrides))
    results = [
        run_variant(cfg, parse_variant(v), args.reward_model, args.out)
        for v in args.variants.split(",")
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, cfg.ppo.kl_budget)
    (args.out / "kl_budget.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
