"""Learning-rate sweep of the fully fine-tuned arm of `jaxrlhf demo --compare-full`, on the
pairs and prompts of a comparison run, so that its quality columns compare LoRA with full
fine-tuning at a learning rate that suits full fine-tuning, not at one guess.

The reward model is trained at each `--rm-lrs` (held-out accuracy, time, peak memory; with
`--ranking`, also its ranking accuracy over all pairs of the held-out samples, which are drawn
again from the run's seed — the same samples); PPO
then runs at each `--ppo-lrs` against the most accurate of them (gold gain with its 95%
bootstrap interval over the held-out prompts, final KL, gold at the KL of the comparison's
LoRA arm, distinct-2, time, peak memory). The demo options after the flags must be those of
the comparison run (the prompts and the PPO settings follow them). `--arm lora` sweeps the LoRA
arm's reward model instead (e.g. on a `make run`'s pairs: `--pairs runs/demo --arm lora`).

    jaxrlhf demo --compare-full n_train_prompts=192 ppo.num_iterations=8 --run-dir runs/compare
    PYTHONPATH=. python -m benchmarks.full_ft_sweep --pairs runs/compare \\
        --rm-lrs 2e-5,1e-4,2e-4 --ppo-lrs 1e-5,1e-4 n_train_prompts=192 ppo.num_iterations=8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from jaxrlhf import config as C
from jaxrlhf.commands import demo as D

MIB = 2**20


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def with_rm_lr(cfg: D.DemoConfig, lr: float) -> D.DemoConfig:
    return dataclasses.replace(
        cfg,
        rm=dataclasses.replace(cfg.rm, optim=dataclasses.replace(cfg.rm.optim, learning_rate=lr)),
    )


def with_ppo_lr(cfg: D.DemoConfig, lr: float) -> D.DemoConfig:
    optim = dataclasses.replace(cfg.ppo.optim, learning_rate=lr)
    return dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, optim=optim))


def sweep_reward_models(arm: D.DemoConfig, data: D.Prepared, pairs: Path, out: Path, lrs):
    rows = []
    for lr in lrs:
        timings, peaks = {}, {}
        rm_out = D.train_reward_model(
            with_rm_lr(arm, lr),
            data,
            pairs_dir=pairs,
            out_dir=out / f"rm_lr{lr:g}",
            timings=timings,
            peaks=peaks,
        )
        rows.append(
            {
                "lr": lr,
                "accuracy": rm_out["eval"].get("accuracy", float("nan")),
                "ranking": rm_out.get("ranking", {}).get("mean"),
                "seconds": timings["reward_model"],
                "peak": peaks["reward_model"],
                "export": rm_out["export"],
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "export"}), flush=True)
    return rows


def heldout_samples(cfg: D.DemoConfig, eval_prompts: list[str], pairs: Path) -> list:
    """The held-out prompts' base samples drawn again (the run's seed), checked against the
    run's own held-out pairs: a different draw would measure other samples."""
    from jaxrlhf.models.base import load_base

    model_cfg, base, tokenizer = load_base(cfg.model, seed=cfg.seed)
    rows, _, samples = D.make_pairs(model_cfg, base, tokenizer, eval_prompts, cfg, pairing="random")
    if rows != read_rows(pairs / "pairs_heldout.jsonl"):
        raise SystemExit(
            f"{pairs / 'pairs_heldout.jsonl'}: the held-out samples drawn again differ from "
            "the run's; pass the run's demo options (or drop --ranking)"
        )
    return samples


def policy_row(arm: D.DemoConfig, data, reward_model: str, run: Path, lora_kl) -> dict:
    """One PPO stage of `arm` into `run`: gold gain (95% interval), KL, gold at `lora_kl`."""
    timings, peaks = {}, {}
    ppo_out = D.train_policy(
        arm, data, reward_model=reward_model, out_dir=run, timings=timings, peaks=peaks
    )
    before, after = ppo_out["eval_before"], ppo_out["eval"]
    curve = D.eval_curve(run / "ppo")
    row = {
        "lr": arm.ppo.optim.learning_rate,
        "gain": D.bootstrap_gain(before["gold_per_prompt"], after["gold_per_prompt"]),
        "kl": after["kl"],
        "gold_at_lora_kl": (
            D.gold_at_kl(curve, lora_kl) - before["gold"] if lora_kl is not None else None
        ),
        "distinct_2": after["distinct_2"],
        "seconds": timings["ppo"],
        "peak": peaks["ppo"],
    }
    print(json.dumps(row), flush=True)
    return row


def lora_final_kl(arm: Path) -> float | None:
    """The final KL of the LoRA arm's PPO run under `arm`, when that run is there."""
    curve = D.eval_curve(arm / "ppo") if (arm / "ppo").exists() else []
    return curve[-1]["kl"] if curve else None


def markdown(
    rm_rows: list[dict], ppo_rows: list[dict], lora_kl, lora_row=None, arm: str = "full"
) -> str:
    def peak(v):
        return "—" if v is None else f"{v / MIB:,.0f} MiB"

    def ranking(r):
        g = r.get("ranking")
        return "—" if not g else f"{g['accuracy']:.3f} ({g['low']:.3f} … {g['high']:.3f})"

    lines = [
        f"| {arm} reward model, learning rate | held-out accuracy | ranking accuracy, all "
        "held-out pairs (95%) | time, s | peak memory |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['lr']:g} | {r['accuracy']:.3f} | {ranking(r)} | {r['seconds']:.0f} "
        f"| {peak(r['peak'])} |"
        for r in rm_rows
    ]
    matched = f"gold gain at the LoRA arm's KL ({lora_kl:.2f})" if lora_kl is not None else "—"
    lines += [
        "",
        f"| full PPO, learning rate | gold gain (95% interval) | final KL | {matched} | "
        "distinct-2 | time, s | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    labelled = [(f"{r['lr']:g}", r) for r in ppo_rows]
    if lora_row is not None:
        labelled.append((f"LoRA arm, {lora_row['lr']:g}", lora_row))
    for label, r in labelled:
        g = "{:+.3f} ({:+.3f} … {:+.3f})".format(*r["gain"])
        m = "—" if r["gold_at_lora_kl"] is None else f"{r['gold_at_lora_kl']:+.3f}"
        lines.append(
            f"| {label} | {g} | {r['kl']:.2f} | {m} | {r['distinct_2']:.3f} | "
            f"{r['seconds']:.0f} | {peak(r['peak'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=Path, default=Path("runs/compare"))
    p.add_argument("--out", type=Path, default=None, help="default: <pairs>/sweep")
    p.add_argument("--rm-lrs", default="2e-5,1e-4,2e-4")
    p.add_argument("--ppo-lrs", default="1e-5,1e-4")
    p.add_argument("--arm", choices=("full", "lora"), default="full")
    p.add_argument(
        "--ranking",
        action="store_true",
        help="draw the held-out samples again and report each reward model's ranking accuracy",
    )
    p.add_argument(
        "--with-lora",
        action="store_true",
        help="also rerun the LoRA arm's PPO (against <pairs>/lora/rm/adapter) with this code, "
        "into <out>/lora",
    )
    p.add_argument("overrides", nargs="*", help="the comparison run's demo options")
    args = p.parse_args(argv)
    for name in ("pairs.jsonl", "pairs_heldout.jsonl"):
        if not (args.pairs / name).exists():
            raise SystemExit(
                f"{args.pairs / name}: missing; run `jaxrlhf demo --compare-full` first"
            )
    out = args.out or args.pairs / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    cfg = C.load_config(D.DemoConfig, None, list(args.overrides))
    train_prompts, eval_prompts = D.split_prompts(cfg)
    heldout = heldout_samples(cfg, eval_prompts, args.pairs) if args.ranking else None
    pairs = read_rows(args.pairs / "pairs.jsonl")
    data = D.Prepared(train_prompts, eval_prompts, pairs, {}, heldout)
    arm = D.comparison_arms(cfg)[args.arm]
    rm_rows = sweep_reward_models(
        arm, data, args.pairs, out, [float(x) for x in args.rm_lrs.split(",")]
    )
    # The all-pairs ranking accuracy, when measured, judges the reward models (1,083 pairs
    # against the eval set's 168: the same expected accuracy, a third of the noise).
    best = max(rm_rows, key=lambda r: r["ranking"]["accuracy"] if args.ranking else r["accuracy"])
    lora_row = None
    if args.with_lora:
        lora_rm = str(args.pairs / "lora" / "rm" / "adapter")
        lora_row = policy_row(D.comparison_arms(cfg)["lora"], data, lora_rm, out / "lora", None)
    lora_kl = lora_final_kl(out / "lora" if args.with_lora else args.pairs / "lora")
    ppo_rows = [
        policy_row(with_ppo_lr(arm, lr), data, best["export"], out / f"ppo_lr{lr:g}", lora_kl)
        for lr in (float(x) for x in args.ppo_lrs.split(",") if x)
    ]
    table = markdown(rm_rows, ppo_rows, lora_kl, lora_row, arm=args.arm)
    (out / "sweep.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
