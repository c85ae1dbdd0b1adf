"""`jaxrlhf rm | dpo | ppo | grpo`: the config file and overrides -> the algorithm's config ->
its driver (`jaxrlhf.train.runs.run_algorithm`)."""

from __future__ import annotations

import argparse

from jaxrlhf.config import load_config
from jaxrlhf.train.runs import ALGORITHMS, run_algorithm


def add_parsers(sub) -> None:
    """One subcommand per registered algorithm (`train.runs.ALGORITHMS`)."""
    for name, algo in ALGORITHMS.items():
        p = sub.add_parser(name, help=algo.help or f"train with {name}")
        p.add_argument("--config", help="YAML config file (see configs/)")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        p.add_argument(
            "--resume-from",
            type=int,
            metavar="STEP",
            help="continue from the newest checkpoint at or before STEP (implies --resume)",
        )
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")


def run_training(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    if args.resume_from is not None:
        overrides.append(f"run.resume_from={args.resume_from}")
    cfg = load_config(ALGORITHMS[args.command].config, args.config, overrides)
    run_algorithm(args.command, cfg, resume=args.resume or args.resume_from is not None)
