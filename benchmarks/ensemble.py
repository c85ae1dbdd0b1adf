"""A reward-model ensemble trained together (`jaxrlhf rm ensemble_size=4`: one vmapped step,
the frozen base shared) against 4 separate runs (seeds 0–3), on the demo's pairs and the
demo's reward-model settings (SmolLM2-135M, LoRA r 8): wall time and peak memory of each
process, held-out accuracy of every member, of every separate run and of the ensemble mean.

Member k trains with seed k and data order k, as a separate run with `run.seed=k` does, so
their accuracies should agree (tests/test_ensemble.py asserts the steps are equal); the cost
is what differs. Each case runs in its own process (its own peak RSS: `common.run_child`),
one after another on the same machine.

    make run                                   # writes runs/demo/pairs*.jsonl
    PYTHONPATH=. python -m benchmarks.ensemble [--pairs runs/demo] [--max-steps 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import common as C

MEMBERS = 4


def child(spec: dict) -> None:
    """One `rm` run with the demo's reward-model settings (in this process)."""
    import dataclasses

    from jaxrlhf.commands.demo import DemoConfig
    from jaxrlhf.train.runs import run_rm

    demo = DemoConfig()
    rm = demo.rm
    cfg = dataclasses.replace(
        rm,
        model=dataclasses.replace(demo.model, path=spec["model"]),
        ensemble_size=spec["members"],
        max_steps=spec["max_steps"],
        data=dataclasses.replace(rm.data, train=spec["train"], eval=spec["eval"]),
        run=dataclasses.replace(
            rm.run,
            run_dir=spec["run_dir"],
            seed=spec["seed"],
            tensorboard=False,
            progress=False,
            eval_every=10_000,
            save_every=10_000,
        ),
    )
    out = run_rm(cfg)
    Path(spec["run_dir"], "bench_result.json").write_text(json.dumps(out["eval"]))


def run_case(spec: dict) -> dict:
    """`child(spec)` in a fresh process: its wall time, peak RSS and evaluation."""
    Path(spec["run_dir"]).mkdir(parents=True, exist_ok=True)
    log = Path(spec["run_dir"], "child.log")
    try:
        r = C.run_child(["-m", "benchmarks.ensemble", "--child", json.dumps(spec)], log)
    except RuntimeError as e:
        raise SystemExit(f"case {spec} failed: {e}") from e
    evaluated = json.loads(Path(spec["run_dir"], "bench_result.json").read_text())
    return {"seconds": r["wall_s"], "peak_rss": r["peak_rss"], "eval": evaluated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="runs/demo", help="a demo run dir with pairs*.jsonl")
    parser.add_argument("--max-steps", type=int, default=None, help="default: one epoch")
    parser.add_argument("--out", default="runs/bench_ensemble")
    parser.add_argument("--model", default="default", help="model.path (tiny: a smoke run)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    pairs = Path(args.pairs)
    train, held = pairs / "pairs.jsonl", pairs / "pairs_heldout.jsonl"
    if not train.is_file() or not held.is_file():
        raise SystemExit(f"{pairs}: no pairs.jsonl / pairs_heldout.jsonl; run `make run` first")
    load_before = C.load_average()

    def spec(name: str, members: int, seed: int) -> dict:
        return {
            "members": members,
            "seed": seed,
            "max_steps": args.max_steps,
            "model": args.model,
            "train": str(train),
            "eval": str(held),
            "run_dir": str(Path(args.out) / name),
        }

    together = run_case(spec("ensemble", MEMBERS, 0))
    separate = [run_case(spec(f"seed_{k}", 1, k)) for k in range(MEMBERS)]
    result = {
        "machine": C.machine_info(),
        "load_before": load_before,
        "load_after": C.load_average(),
        "max_steps": args.max_steps,
        "together": together,
        "separate": separate,
    }
    C.save_result("ensemble", result)
    print(report(result))


def report(r: dict) -> str:
    together, separate = r["together"], r["separate"]
    sep_time = sum(s["seconds"] for s in separate)
    each_time = ", ".join(f"{s['seconds']:.0f}" for s in separate)
    members = [together["eval"].get(f"member_{k}/accuracy") for k in range(MEMBERS)]
    rows = [
        [
            f"ensemble_size={MEMBERS}, one run",
            f"{together['seconds']:.0f}",
            C.fmt_bytes(together["peak_rss"]),
            ", ".join(f"{a:.3f}" for a in members),
            f"{together['eval']['accuracy']:.3f}",
        ],
        [
            f"{MEMBERS} separate runs (seeds 0–{MEMBERS - 1}), one after another",
            f"{sep_time:.0f} ({each_time})",
            C.fmt_bytes(max(s["peak_rss"] for s in separate)) + " each",
            ", ".join(f"{s['eval']['accuracy']:.3f}" for s in separate),
            "—",
        ],
    ]
    return C.table(
        ["", "wall time (s)", "peak RSS", "held-out accuracy of each", "ensemble mean"], rows
    ) + (f"\n\nTime ratio together / separate: {together['seconds'] / sep_time:.2f}.")


if __name__ == "__main__":
    main()
