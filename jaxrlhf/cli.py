"""`jaxrlhf rm | dpo | kto | orpo | cpo | ppo | grpo | rloo | reinforce_pp | generate | export
| plot | demo`.

Training commands take `--config FILE.yaml` and `dotted.key=value` overrides, e.g.
`jaxrlhf rm --config configs/rm_tiny.yaml lora.r=8 run.run_dir=runs/rm1`.
"""

from __future__ import annotations

import argparse
import os
import sys

# This jaxlib hands reductions to YNNPACK by default, and its row sums over the LM head's
# [tokens, vocabulary] logits are slow: without them the profiled ops of a bf16 GRPO update
# fell from 6.3 to 5.1 s on a 2-core EPYC (docs/speed.md). Products stay on YNNPACK; a
# user's own setting of the option wins.
XLA_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE"


def with_xla_cpu_flags(xla_flags: str) -> str:
    """`xla_flags` (the XLA_FLAGS value) with `XLA_CPU_FLAGS` added unless it already sets
    the YNN fusion types."""
    if "xla_cpu_experimental_ynn_fusion_type" in xla_flags:
        return xla_flags
    return f"{xla_flags} {XLA_CPU_FLAGS}".strip()


def _setup_env() -> None:
    # XLA reads its flags when the backend starts (the first array), after this runs.
    os.environ["XLA_FLAGS"] = with_xla_cpu_flags(os.environ.get("XLA_FLAGS", ""))
    # Quiet, offline defaults; XLA's CPU collectives need a larger thread pool on small hosts.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("NPROC", "16")
    # stderr carries errors (one line each) and the run's own progress bars, not the
    # `datasets` loader's.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxrlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    from jaxrlhf.commands.train import add_parsers

    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)

    g = sub.add_parser("generate", help="print completions for prompts")
    g.add_argument("prompts", nargs="*", help="prompts (default: one example prompt)")
    g.add_argument("--model", default="default", help="HF folder, .gguf, 'default' or 'tiny'")
    g.add_argument("--adapter", help="a PEFT adapter folder to apply (merged)")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("export", help="export an adapter (PEFT) or the merged model (HF)")
    e.add_argument("--model", default="default", help="the base model")
    e.add_argument("--adapter", required=True, help="a PEFT adapter folder (from a run)")
    e.add_argument("--peft", help="write the adapter (PEFT format) here")
    e.add_argument("--merged", help="write the merged model (HF safetensors) here")

    pl = sub.add_parser("plot", help="draw a run's metrics to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--keys", nargs="*", help="metrics to plot (default: all)")

    d = sub.add_parser("demo", help="the end-to-end PE-RLHF pipeline (sentiment, VADER judge)")
    d.add_argument("--quick", action="store_true", help="a minute-long run on a tiny model")
    d.add_argument("--run-dir", default=None)
    d.add_argument(
        "--compare-full",
        action="store_true",
        help="run the pipeline with LoRA and with full fine-tuning; one table (compare.md)",
    )
    d.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the demo config")
    return parser


# What a user's input can get wrong: a config, a data file, a model folder, a checkpoint, a
# path. These end the command with one line and exit 2 (UnicodeError and JSONDecodeError are
# ValueErrors; FileNotFoundError and PermissionError are OSErrors).
USER_ERRORS = (ValueError, OSError, KeyError)


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with whitespace collapsed, at most 600 chars."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    from jaxrlhf.train.loop import TrainingInterrupted

    try:
        return _dispatch(args)
    except TrainingInterrupted as e:
        print(f"jaxrlhf: {e}", file=sys.stderr)
        return 143
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"jaxrlhf {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not the input: still one line, the traceback on request
        if args.debug:
            raise
        print(
            f"jaxrlhf {args.command}: internal error ({type(e).__name__}): {one_line(e)}; "
            f"run again with --debug for the traceback",
            file=sys.stderr,
        )
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from jaxrlhf.train.runs import ALGORITHMS

    if args.command in ALGORITHMS:
        from jaxrlhf.commands.train import run_training

        run_training(args)
    elif args.command == "generate":
        from jaxrlhf.commands.generate import run_generate

        run_generate(args)
    elif args.command == "export":
        from jaxrlhf.commands.generate import run_export

        run_export(args)
    elif args.command == "plot":
        from jaxrlhf.train.metrics import plot_run

        for path in plot_run(args.run_dir, keys=args.keys):
            print(path)
    elif args.command == "demo":
        from jaxrlhf.commands.demo import run_demo

        run_demo(
            quick=args.quick,
            run_dir=args.run_dir,
            overrides=args.overrides,
            compare_full=args.compare_full,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
