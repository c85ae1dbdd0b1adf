"""`jaxrlhf demo`: the whole PE-RLHF pipeline on the embedded SmolLM2-135M-Instruct, judged by
an outside scorer (VADER sentiment), with no network.

    prompts (fortune openings) ─> 8 base samples each ─VADER─> graded pairs (ties dropped)
    ─> `rm` (an ensemble of LoRA SEQ_CLS adapters, one vmapped step)
    ─> `ppo` (LoRA policy + LoRA critic, reference = adapter off; the ensemble's mean − std
       as the reward, a KL budget)
    ─> held-out evaluation: gold (VADER) and reward-model scores, KL to the base and the
       degeneration metrics before/after, against the targets

Writes RUN_DIR/report.md, RUN_DIR/plots/*.png and each stage's own run directory.
`--quick` runs the same code on a tiny random model for a smoke test; `--compare-full` runs
the pipeline with LoRA and with full fine-tuning on the same pairs (RUN_DIR/compare.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxrlhf import config as C
from jaxrlhf.algorithms.ppo import PPOConfig
from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.commands.ranking import SampleBatch, heldout_ranking
from jaxrlhf.lora import LoraConfig
from jaxrlhf.memory import peak_during
from jaxrlhf.models.base import load_base
from jaxrlhf.rewards import RewardFuncConfig, resolve
from jaxrlhf.train.runs import run_ppo, run_rm
from jaxrlhf.train.setup import log


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    model: C.ModelSection = dataclasses.field(default_factory=C.ModelSection)
    run_dir: str = "runs/demo"
    seed: int = 0
    n_train_prompts: int = 384
    n_eval_prompts: int = 64
    pair_max_new_tokens: int = 20
    samples_per_prompt: int = 8
    """Base samples of each prompt, ranked by the gold judge (for the held-out prompts: the
    reward model's held-out pairs)."""
    pairs_per_prompt: int = 4
    """Graded pairs of each training prompt: the best sample vs the worst, the 2nd best vs the
    2nd worst, ... (at most samples_per_prompt // 2)."""
    pair_temperature: float = 1.0
    min_gold_gap: float = 0.25
    """Pairs whose two gold scores differ by less are ties and dropped."""
    gold: RewardFuncConfig = dataclasses.field(
        default_factory=lambda: RewardFuncConfig(fn="vader_sentiment", name="vader")
    )
    """The outside judge. `--quick` swaps in the share of lowercase letters, because a tiny
    random model emits byte noise that VADER scores 0."""
    rm: RMConfig = dataclasses.field(
        default_factory=lambda: RMConfig(
            lora=LoraConfig(r=8, alpha=16, task_type="SEQ_CLS", modules_to_save=("score",)),
            optim=C.OptimConfig(
                learning_rate=4e-3, schedule="linear", warmup_ratio=0.1, weight_decay=0.01
            ),
            data=C.PreferenceDataConfig(max_length=48, length_buckets=(32, 48)),
            batch_size=16,
            eval_batch_size=32,
            num_epochs=1.0,
            ensemble_size=2,
        )
    )
    """An ensemble of 2 LoRA reward models trained together on the one base (one vmapped
    step); PPO reads their conservative reward (`ppo.reward_model.ensemble`). Each member
    costs a reward model's compute and activation memory (about 2.5 GiB at batch 16 here,
    without `model.remat`): 4 members took 10.5 GiB, and four times one reward model's
    ~5 minutes on 2 cores, so the demo trains 2 (`rm.ensemble_size=4` for more)."""
    ppo: PPOConfig = dataclasses.field(
        default_factory=lambda: PPOConfig(
            lora=LoraConfig(r=16, alpha=32),
            value_lora=LoraConfig(r=16, alpha=32, modules_to_save=("value",)),
            value_init_from_reward_model=True,
            optim=C.OptimConfig(learning_rate=3e-4, schedule="constant"),
            data=C.PromptDataConfig(max_prompt_length=24, length_buckets=(16, 24)),
            generation=C.GenerationConfig(max_new_tokens=20, temperature=1.0),
            reward_model=C.RewardModelSection(
                path="(set by the demo)",
                append_eos=True,
                ensemble="mean_minus_std",
                ensemble_coef=1.0,
            ),
            num_iterations=20,
            rollout_batch_size=32,
            mini_batch_size=16,
            num_ppo_epochs=2,
            kl_coef=0.1,
            kl_budget=10.0,
            eval_prompts_batch=32,
            missing_eos_penalty=None,
        )
    )

    full_rm_learning_rate: float = 3e-4
    """`--compare-full`: the fully fine-tuned reward model's learning rate, the best of
    1e-5…3e-4 in `benchmarks/full_ft_sweep.py` (LoRA's is ~10× higher: its update is low-rank
    and starts at zero)."""
    full_ppo_learning_rate: float = 3e-5
    """`--compare-full`: the fully fine-tuned policy's and critic's learning rate."""


QUICK = [
    "model.path=tiny",
    "samples_per_prompt=4",
    "pairs_per_prompt=2",
    "run_dir=runs/demo_quick",
    "n_train_prompts=96",
    "n_eval_prompts=32",
    "pair_max_new_tokens=8",
    "rm.num_epochs=4",
    "rm.lora.r=4",
    "rm.lora.alpha=8",
    "rm.optim.learning_rate=3e-3",
    "ppo.optim.learning_rate=3e-3",
    "ppo.num_iterations=3",
    "ppo.rollout_batch_size=16",
    "ppo.mini_batch_size=8",
    "ppo.generation.max_new_tokens=8",
    "ppo.lora.r=4",
    "ppo.lora.alpha=8",
    "ppo.value_lora.r=4",
    "ppo.value_lora.alpha=8",
    "ppo.num_ppo_epochs=1",
    "gold={fn: char_share, name: lowercase, kwargs: {chars: abcdefghijklmnopqrstuvwxyz}}",
    "min_gold_gap=0.01",
]


def demo_prompts() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "assets" / "demo_prompts.txt").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def make_pairs(
    model_cfg, base, tokenizer, prompts: list[str], cfg: DemoConfig, *, pairing: str = "graded"
) -> tuple[list, dict, list]:
    """`samples_per_prompt` base samples of each prompt, scored by the gold judge, and the
    preference pairs they make (pairs closer than `min_gold_gap`, and blank responses, dropped):
    (pair rows, counts, the samples as `ranking.SampleBatch`es).

    `pairing="graded"`: the samples ranked by gold, the best vs the worst, the 2nd best vs the
    2nd worst, ... (`pairs_per_prompt` pairs, from the widest gap inward), so the reward model
    sees clear contrasts and near ones. `pairing="random"`: consecutive samples, as drawn
    ((0, 1), (2, 3), ...: every sample once), which is how the held-out pairs are made."""
    from jaxrlhf import data as D
    from jaxrlhf.rollout import Sampler, decode_responses, prompt_batch
    from jaxrlhf.sharding import make_mesh, put_tree
    from jaxrlhf.train.metrics import progress_bar

    if pairing not in ("graded", "random"):
        raise ValueError(f"pairing must be 'graded' or 'random', got {pairing!r}")
    k = cfg.samples_per_prompt
    mesh = make_mesh(C.MeshConfig(data=1))
    params = put_tree(base, mesh)
    gen = C.GenerationConfig(
        max_new_tokens=cfg.pair_max_new_tokens, temperature=cfg.pair_temperature
    )
    sampler = Sampler(
        model_cfg,
        gen,
        lora_cfg=None,
        eos_token_ids=tuple(model_cfg.eos_token_id),
        pad_token_id=tokenizer.pad_token_id,
        mesh=mesh,
    )
    data, _ = D.tokenize_prompts(
        [{"prompt": p} for p in prompts],
        tokenizer,
        max_prompt_length=cfg.ppo.data.max_prompt_length,
    )
    rows, samples, candidates, batch = [], [], 0, max(1, 256 // k)
    # Different prompt sets (train, held-out) get different sample streams.
    key = jax.random.PRNGKey(cfg.seed + 1 + (pairing == "random"))
    buckets = tuple(
        cfg.ppo.data.length_buckets
        or D.default_buckets(cfg.ppo.data.max_prompt_length, midpoints=False)
    )
    bar = progress_bar(len(data) * k, desc=f"samples ({pairing} pairs)")
    for start in range(0, len(data), batch):
        idx = np.arange(start, min(start + batch, len(data)))
        device, values, _ = prompt_batch(
            data,
            idx,
            pad_id=tokenizer.pad_token_id,
            buckets=buckets,
            mesh=mesh,
            repeat=k,
        )
        out = sampler.generate(
            params, None, device, jax.random.fold_in(key, start), prompt_repeats=k
        )
        texts = decode_responses(tokenizer, out.tokens, out.response_mask)
        gold = gold_scores(cfg.gold, values, texts)
        bar.update(len(texts))
        samples.append(
            SampleBatch(
                input_ids=np.asarray(out.input_ids),
                attention_mask=np.asarray(out.attention_mask),
                finished=np.asarray(out.finished),
                gold=np.asarray(gold, np.float64),
                group=np.repeat(idx, k),
                usable=np.array([bool(t.strip()) for t in texts]),
            )
        )
        for g in range(0, len(texts), k):
            group = slice(g, g + k)
            picked, n_candidates = pair_group(
                texts[group],
                gold[group],
                pairing=pairing,
                pairs_per_prompt=cfg.pairs_per_prompt,
                min_gap=cfg.min_gold_gap,
            )
            candidates += n_candidates
            for hi, lo in picked:
                hi, lo = g + hi, g + lo
                rows.append(
                    {
                        "prompt": values[hi],
                        "chosen": texts[hi],
                        "rejected": texts[lo],
                        "gold_chosen": float(gold[hi]),
                        "gold_rejected": float(gold[lo]),
                    }
                )
    bar.close()
    stats = {
        "prompts": len(prompts),
        "samples": len(prompts) * k,
        "pairs": len(rows),
        "ties_dropped": candidates - len(rows),
    }
    return rows, stats, samples


def pair_group(
    texts: list[str], gold, *, pairing: str, pairs_per_prompt: int, min_gap: float
) -> tuple[list[tuple[int, int]], int]:
    """The preference pairs `(chosen, rejected)` (indices into `texts`) made from the samples
    of one prompt, and how many candidate pairs there were before ties were dropped.

    "graded": ranked by gold, the best vs the worst, the 2nd best vs the 2nd worst, ...
    "random": samples paired as drawn, (0, 1), (2, 3), ... Blank responses never pair; a pair
    whose gold scores differ by less than `min_gap` is a tie and dropped."""
    k = len(texts)
    if pairing == "graded":
        ranked = sorted((i for i in range(k) if texts[i].strip()), key=lambda i: gold[i])
        n = min(pairs_per_prompt, len(ranked) // 2)
        candidates = [(ranked[-1 - j], ranked[j]) for j in range(n)]
        n_candidates = min(pairs_per_prompt, k // 2)
    elif pairing == "random":
        candidates = [(i, i + 1) for i in range(0, k - 1, 2)]
        candidates = [(a, b) for a, b in candidates if texts[a].strip() and texts[b].strip()]
        n_candidates = k // 2
    else:
        raise ValueError(f"pairing must be 'graded' or 'random', got {pairing!r}")
    pairs = [
        (a, b) if gold[a] > gold[b] else (b, a)
        for a, b in candidates
        if abs(gold[a] - gold[b]) >= min_gap
    ]
    return pairs, n_candidates


def gold_scores(gold: RewardFuncConfig, prompts: list, completions: list[str]) -> np.ndarray:
    return np.asarray(resolve(gold.fn)(list(prompts), list(completions), **gold.kwargs))


def make_gold_hook(gold: RewardFuncConfig):
    def hook(prompts: list, completions: list[str]) -> dict:
        scores = gold_scores(gold, prompts, completions)
        return {
            "gold": float(scores.mean()),
            "gold_positive_share": float((scores > 0.05).mean()),
            "gold_per_prompt": [float(x) for x in scores],
            "samples": completions[:4],
        }

    return hook


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What every arm of the demo shares: prompts, pairs (written under the run dir) and
    their counts."""

    train_prompts: list[str]
    eval_prompts: list[str]
    pairs: list[dict]
    pair_stats: dict
    heldout_samples: list | None = None
    """The held-out prompts' base samples (`ranking.SampleBatch`), for the reward model's
    ranking accuracy over all their pairs; None: not measured."""


def split_prompts(cfg: DemoConfig) -> tuple[list[str], list[str]]:
    """The training and held-out prompts: one shuffle of the demo's prompts by the seed."""
    prompts = demo_prompts()
    order = np.random.default_rng(cfg.seed).permutation(len(prompts))
    eval_prompts = [prompts[i] for i in order[: cfg.n_eval_prompts]]
    train_prompts = [
        prompts[i] for i in order[cfg.n_eval_prompts : cfg.n_eval_prompts + cfg.n_train_prompts]
    ]
    return train_prompts, eval_prompts


def prepare(cfg: DemoConfig, root: Path, timings: dict) -> Prepared:
    """Stages 1–2: the prompts, the base model, and the graded preference pairs."""
    log(f"[1/5] prompts and the base model ({cfg.model.path})")
    train_prompts, eval_prompts = split_prompts(cfg)
    model_cfg, base, tokenizer = load_base(cfg.model, seed=cfg.seed)

    log(
        f"[2/5] preference pairs: {cfg.samples_per_prompt} base samples for each of "
        f"{len(train_prompts)} + {len(eval_prompts)} held-out prompts, ranked by the gold "
        f"judge ({cfg.gold.label})"
    )
    t0 = time.perf_counter()
    pairs, pair_stats, _ = make_pairs(model_cfg, base, tokenizer, train_prompts, cfg)
    heldout, heldout_stats, heldout_samples = make_pairs(
        model_cfg, base, tokenizer, eval_prompts, cfg, pairing="random"
    )
    pair_stats["heldout_pairs"] = heldout_stats["pairs"]
    pair_stats["heldout_samples"] = heldout_stats["samples"]
    timings["pairs"] = time.perf_counter() - t0
    for name, rows in (("pairs.jsonl", pairs), ("pairs_heldout.jsonl", heldout)):
        with open(root / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    log(
        f"      {pair_stats['pairs']} graded pairs ({pair_stats['ties_dropped']} ties dropped), "
        f"{len(heldout)} held-out pairs"
    )
    if len(pairs) < 16 or len(heldout) < 4:
        raise ValueError(f"only {len(pairs)} + {len(heldout)} preference pairs; too few")
    return Prepared(train_prompts, eval_prompts, pairs, pair_stats, heldout_samples)


def train_reward_model(
    cfg: DemoConfig, data: Prepared, *, pairs_dir: Path, out_dir: Path, timings: dict, peaks: dict
) -> dict:
    """Stage 3: the reward model (or ensemble) on the pairs, held-out accuracy on
    `pairs_dir/pairs_heldout.jsonl`; its wall time to `timings`, peak memory to `peaks`."""
    import datasets

    what = "LoRA, SEQ_CLS" if cfg.rm.lora is not None else "full fine-tuning"
    if cfg.rm.ensemble_size > 1:
        what += f", an ensemble of {cfg.rm.ensemble_size}"
    log(f"[3/5] reward model: jaxrlhf rm ({what})")
    t0 = time.perf_counter()
    rm_cfg = dataclasses.replace(
        cfg.rm,
        model=cfg.model,
        data=dataclasses.replace(cfg.rm.data, eval=str(pairs_dir / "pairs_heldout.jsonl")),
        run=dataclasses.replace(
            cfg.rm.run,
            run_dir=str(out_dir / "rm"),
            seed=cfg.seed,
            tensorboard=False,
            eval_every=10_000,
            save_every=10_000,
        ),
    )
    source = datasets.Dataset.from_list(
        [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data.pairs]
    )
    rm_out, peaks["reward_model"], _ = peak_during(lambda: run_rm(rm_cfg, source=source))
    timings["reward_model"] = time.perf_counter() - t0
    if data.heldout_samples:
        t0 = time.perf_counter()
        rm_out["ranking"] = heldout_ranking(data.heldout_samples, rm_out["export"], cfg)
        timings["rm_ranking"] = time.perf_counter() - t0
        r = rm_out["ranking"]["mean"]
        log(
            f"      ranking accuracy on all {r['pairs']} pairs of the held-out samples: "
            f"{r['accuracy']:.3f} (95% {r['low']:.3f} … {r['high']:.3f})"
        )
    return rm_out


def train_policy(
    cfg: DemoConfig, data: Prepared, *, reward_model: str, out_dir: Path, timings: dict, peaks: dict
) -> dict:
    """Stage 4: PPO against the exported `reward_model`, the gold judge scoring every
    evaluation; its wall time to `timings`, peak memory to `peaks`."""
    what = "LoRA policy, LoRA critic" if cfg.ppo.lora is not None else "full fine-tuning"
    log(f"[4/5] policy: jaxrlhf ppo ({what}, the critic from the reward model)")
    t0 = time.perf_counter()
    ppo_cfg = dataclasses.replace(
        cfg.ppo,
        model=cfg.model,
        reward_model=dataclasses.replace(cfg.ppo.reward_model, path=reward_model),
        data=dataclasses.replace(cfg.ppo.data, eval_size=0),
        run=dataclasses.replace(
            cfg.ppo.run,
            run_dir=str(out_dir / "ppo"),
            seed=cfg.seed,
            tensorboard=False,
            eval_every=max(cfg.ppo.num_iterations // 4, 1),
            save_every=max(cfg.ppo.num_iterations // 2, 1),
        ),
    )
    ppo_source = {
        "train": [{"prompt": p} for p in data.train_prompts],
        "eval": [{"prompt": p} for p in data.eval_prompts],
    }
    ppo_out, peaks["ppo"], _ = peak_during(
        lambda: run_ppo(ppo_cfg, source=ppo_source, eval_hook=make_gold_hook(cfg.gold))
    )
    timings["ppo"] = time.perf_counter() - t0
    return ppo_out


def train_pipeline(
    cfg: DemoConfig, data: Prepared, *, pairs_dir: Path, out_dir: Path, timings: dict, peaks: dict
) -> tuple[dict, dict]:
    """Stages 3–4: the reward model on the pairs, then PPO against it. Each stage's wall time
    goes to `timings` and its peak resident memory (bytes) to `peaks`."""
    rm_out = train_reward_model(
        cfg, data, pairs_dir=pairs_dir, out_dir=out_dir, timings=timings, peaks=peaks
    )
    ppo_out = train_policy(
        cfg, data, reward_model=rm_out["export"], out_dir=out_dir, timings=timings, peaks=peaks
    )
    return rm_out, ppo_out


def run_demo(
    *,
    quick: bool = False,
    run_dir: str | None = None,
    overrides: list[str] = (),
    compare_full: bool = False,
) -> dict:
    """The demo; `compare_full`: the LoRA pipeline and the fully fine-tuned one on the same
    pairs, and one table comparing them (`compare.md`)."""
    cfg = C.load_config(DemoConfig, None, (QUICK if quick else []) + list(overrides))
    if run_dir:
        cfg = dataclasses.replace(cfg, run_dir=run_dir)
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    if compare_full:
        return run_compare_full(cfg, root)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    peaks: dict[str, int | None] = {}
    data = prepare(cfg, root, timings)
    rm_out, ppo_out = train_pipeline(
        cfg, data, pairs_dir=root, out_dir=root, timings=timings, peaks=peaks
    )
    log("[5/5] report")
    timings["total"] = time.perf_counter() - t_start
    report = write_report(root, cfg, data.pair_stats, rm_out, ppo_out, timings, peaks)
    log(f"report: {report}")
    return {
        "rm": rm_out,
        "ppo": ppo_out,
        "pairs": data.pair_stats,
        "report": str(report),
        "timings": timings,
        "peaks": peaks,
    }


def comparison_arms(cfg: DemoConfig) -> dict[str, DemoConfig]:
    """The two arms of `--compare-full`, equal but for LoRA: one reward model each (a fully
    trained ensemble would be K copies of the base), its plain score as PPO's reward, the
    same KL budget; the full arm at its own learning rates (`full_rm_learning_rate`,
    `full_ppo_learning_rate`)."""
    single_rm = dataclasses.replace(cfg.rm, ensemble_size=1)
    plain_reward = dataclasses.replace(cfg.ppo.reward_model, ensemble="mean")
    lora = dataclasses.replace(
        cfg, rm=single_rm, ppo=dataclasses.replace(cfg.ppo, reward_model=plain_reward)
    )
    full = dataclasses.replace(
        cfg,
        rm=dataclasses.replace(
            single_rm,
            lora=None,
            optim=dataclasses.replace(cfg.rm.optim, learning_rate=cfg.full_rm_learning_rate),
        ),
        ppo=dataclasses.replace(
            cfg.ppo,
            reward_model=plain_reward,
            lora=None,
            value_lora=None,
            optim=dataclasses.replace(cfg.ppo.optim, learning_rate=cfg.full_ppo_learning_rate),
        ),
    )
    return {"lora": lora, "full": full}


def run_compare_full(cfg: DemoConfig, root: Path) -> dict:
    timings: dict[str, float] = {}
    data = prepare(cfg, root, timings)
    arms = {}
    for name, arm_cfg in comparison_arms(cfg).items():
        log(f"=== {name} ===")
        arm_timings: dict[str, float] = {}
        peaks: dict[str, int | None] = {}
        rm_out, ppo_out = train_pipeline(
            arm_cfg, data, pairs_dir=root, out_dir=root / name, timings=arm_timings, peaks=peaks
        )
        arms[name] = {
            "rm": rm_out,
            "ppo": ppo_out,
            "timings": arm_timings,
            "peaks": peaks,
            "curve": eval_curve(root / name / "ppo"),
        }
    path = write_comparison(root, cfg, data.pair_stats, arms)
    log(f"comparison: {path}")
    return {"arms": arms, "pairs": data.pair_stats, "report": str(path)}


def gold_at_kl(curve: list[dict], kl: float) -> float:
    """The gold score at KL `kl`, linearly interpolated along a run's evaluations (in their
    order; the KL of a run under a budget is not always monotone, so the first crossing)."""
    points = [(r["kl"], r["gold"]) for r in curve]
    for (k0, g0), (k1, g1) in zip(points, points[1:], strict=False):
        if min(k0, k1) <= kl <= max(k0, k1):
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    return float("nan")


def write_comparison(root: Path, cfg: DemoConfig, pair_stats: dict, arms: dict) -> Path:
    """compare.md: LoRA vs full fine-tuning on the same pairs — reward-model accuracy, gold
    gain (with its bootstrap interval), gold at matched KL, degeneration, time and memory."""
    lora, full = arms["lora"], arms["full"]
    matched = min(lora["curve"][-1]["kl"], full["curve"][-1]["kl"])

    def gain(arm) -> tuple[float, float, float]:
        b, a = arm["ppo"]["eval_before"], arm["ppo"]["eval"]
        return bootstrap_gain(b.get("gold_per_prompt", []), a.get("gold_per_prompt", []))

    diff = bootstrap_gain(
        full["ppo"]["eval"].get("gold_per_prompt", []),
        lora["ppo"]["eval"].get("gold_per_prompt", []),
    )
    mib = 2**20

    def mem(arm, stage) -> str:
        peak = arm["peaks"].get(stage)
        return "—" if peak is None else f"{peak / mib:,.0f}"

    def ratio(key: str, source: str) -> str:
        a, b = lora[source].get(key), full[source].get(key)
        return "—" if not a or not b else f"{a / b:.2f}"

    base_gold = lora["ppo"]["eval_before"].get("gold", float("nan"))
    rows = []
    for label, fn in (
        ("reward model held-out accuracy", lambda r: accuracy_cell(r["rm"])),
        (
            "gold gain (95% bootstrap interval)",
            lambda r: "{:+.3f} ({:+.3f} … {:+.3f})".format(*gain(r)),
        ),
        (
            f"gold gain at matched KL {matched:.2f}",
            lambda r: f"{gold_at_kl(r['curve'], matched) - base_gold:+.3f}",
        ),
        ("final KL (nats/response)", lambda r: f"{r['ppo']['eval'].get('kl', 0):.2f}"),
        ("distinct-2", lambda r: f"{r['ppo']['eval'].get('distinct_2', 0):.3f}"),
        ("degenerate completions", lambda r: f"{r['ppo']['eval'].get(DEGENERATE_KEY, 0):.1%}"),
        ("reward model: wall time (s)", lambda r: f"{r['timings']['reward_model']:.0f}"),
        ("reward model: peak memory (MiB)", lambda r: mem(r, "reward_model")),
        ("PPO: wall time (s)", lambda r: f"{r['timings']['ppo']:.0f}"),
        ("PPO: peak memory (MiB)", lambda r: mem(r, "ppo")),
    ):
        rows.append(f"| {label} | {fn(lora)} | {fn(full)} |")
    lines = [
        "# LoRA vs full fine-tuning, the same pipeline on the same pairs",
        "",
        f"Model `{cfg.model.path}`; {pair_stats['pairs']} graded pairs; held-out prompts "
        f"{len(lora['ppo']['eval'].get('gold_per_prompt', []))}; gold judge `{cfg.gold.fn}`; "
        f"KL budget {cfg.ppo.kl_budget} nats per response; one reward model per arm, its "
        f"score PPO's reward. Learning rates: LoRA rm {cfg.rm.optim.learning_rate:g}, "
        f"ppo {cfg.ppo.optim.learning_rate:g}; full rm {cfg.full_rm_learning_rate:g}, "
        f"ppo {cfg.full_ppo_learning_rate:g}. Base gold {base_gold:.3f}.",
        "",
        "| | LoRA | full fine-tuning |",
        "|---|---|---|",
        *rows,
        "",
        f"Ratios LoRA / full: reward-model time {ratio('reward_model', 'timings')}, "
        f"memory {ratio('reward_model', 'peaks')}; PPO time {ratio('ppo', 'timings')}, "
        f"memory {ratio('ppo', 'peaks')}.",
        "",
        "Gold gain LoRA − full on the same held-out prompts (final policies): "
        "{:+.3f} (95% bootstrap interval {:+.3f} … {:+.3f}): the noise of this comparison.".format(
            *diff
        ),
        "",
        "Peak memory: the process's peak resident set during the stage (`jaxrlhf.memory`), "
        "the frozen base, the models and the optimizer state included.",
        "",
    ]
    curves = {f"PPO ({name})": arm["curve"] for name, arm in arms.items()}
    plot = plot_gold_vs_kl(curves, root / "plots" / "gold_vs_kl.png")
    lines.append(f"Gold against KL, both arms: `{plot.relative_to(root)}`")
    path = root / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def bootstrap_gain(before: list[float], after: list[float], *, n: int = 2000, seed: int = 0):
    """The mean per-prompt gain `after - before` and its 95% bootstrap interval over prompts
    (the same held-out prompts before and after, resampled together)."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if diff.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(n, diff.size))
    means = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def eval_curve(run_dir: Path) -> list[dict]:
    """The evaluations of a policy run (held-out prompts), in step order."""
    from jaxrlhf.train.metrics import read_metrics

    records = read_metrics(run_dir)
    coef = {
        r["step"]: r["kl_coef"] for r in records if r.get("split") == "train" and "kl_coef" in r
    }
    return [
        {**r, "kl_coef": coef.get(r["step"], float("nan"))}
        for r in records
        if r.get("split") == "eval" and "gold" in r
    ]


def plot_gold_vs_kl(curves: dict[str, list[dict]], path: Path) -> Path:
    """Gold score against KL to the base, one line per run, each point an evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for label, curve in curves.items():
        ax.plot([r["kl"] for r in curve], [r["gold"] for r in curve], marker="o", label=label)
        for r in curve:
            ax.annotate(str(r["step"]), (r["kl"], r["gold"]), fontsize=7)
    ax.set_xlabel("KL to the base (nats per response)")
    ax.set_ylabel("gold score (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


DEGENERATE_KEY = "repeated_3gram"
"""A completion is degenerate when some word 3-gram occurs twice in it (`text_metrics`)."""


def target_checks(cfg: DemoConfig, before: dict, after: dict, rm_accuracy: float) -> list:
    """The main job's targets, each (what, measured, target, met)."""
    gain = after.get("gold", float("nan")) - before.get("gold", float("nan"))
    d2 = after.get("distinct_2", 0.0) / max(before.get("distinct_2", 0.0), 1e-9)
    budget = cfg.ppo.kl_budget
    return [
        ("gold gain over the base", f"{gain:+.3f}", "≥ +0.5", gain >= 0.5),
        (
            "KL to the base (nats/response)",
            f"{after.get('kl', float('nan')):.2f}",
            f"≤ {budget:g}" if budget else "—",
            budget is None or after.get("kl", float("inf")) <= budget,
        ),
        ("distinct-2, share of the base's", f"{d2:.2f}", "≥ 0.90", d2 >= 0.9),
        (
            "degenerate completions (a repeated 3-gram)",
            f"{after.get(DEGENERATE_KEY, 1.0):.1%}",
            "< 5%",
            after.get(DEGENERATE_KEY, 1.0) < 0.05,
        ),
        ("reward model held-out accuracy", f"{rm_accuracy:.3f}", "≥ 0.80", rm_accuracy >= 0.8),
    ]


def heldout_accuracy(rm_out: dict) -> float:
    """The reward model's held-out accuracy the targets judge: its ranking of all pairs of
    the held-out samples when measured (`ranking`), else the `rm` command's eval pairs."""
    ranking = rm_out.get("ranking")
    if ranking:
        return ranking["mean"]["accuracy"]
    return rm_out["eval"].get("accuracy", float("nan"))


def accuracy_cell(rm_out: dict) -> str:
    """`heldout_accuracy` for a table: with its interval and pair count when it is the
    ranking over all held-out pairs."""
    ranking = rm_out.get("ranking")
    if not ranking:
        return f"{heldout_accuracy(rm_out):.3f}"
    r = ranking["mean"]
    return f"{r['accuracy']:.3f} ({r['low']:.3f} … {r['high']:.3f}; {r['pairs']} pairs)"


def rm_summary(pair_stats: dict, rm_out: dict, members: int) -> str:
    acc = rm_out["eval"].get("accuracy", float("nan"))
    text = (
        f"Reward model: {pair_stats['pairs']} graded pairs from {pair_stats['samples']} base "
        f"samples ({pair_stats['ties_dropped']} ties dropped); accuracy on "
        f"{pair_stats['heldout_pairs']} pairs of base samples of the held-out prompts "
        f"(each sample in one pair, the `rm` command's eval set) "
        f"{rm_out['eval_before'].get('accuracy', float('nan')):.3f} before, "
        f"{acc:.3f} after training"
    )
    if members > 1:
        each = [rm_out["eval"].get(f"member_{k}/accuracy", float("nan")) for k in range(members)]
        text += (
            f" (the mean of an ensemble of {members} LoRA reward models trained together; "
            f"members: {', '.join(f'{a:.3f}' for a in each)})"
        )
    text += "."
    ranking = rm_out.get("ranking")
    if ranking:
        r = ranking["mean"]
        text += (
            f" Ranking accuracy on all {r['pairs']} non-tied pairs of the "
            f"{pair_stats.get('heldout_samples', '')} held-out samples (each sample scored once, "
            f"as PPO reads it): **{r['accuracy']:.3f}** (95% bootstrap interval over prompts "
            f"{r['low']:.3f} … {r['high']:.3f})"
        )
        extra = [
            f"{rule} {v['accuracy']:.3f}"
            for rule, v in ranking.items()
            if rule not in ("mean", "members")
        ]
        extra += [
            f"member {k} {m['accuracy']:.3f}" for k, m in enumerate(ranking.get("members", []))
        ]
        if extra:
            text += f"; {', '.join(extra)}"
        text += "."
    return text


def write_report(
    root: Path,
    cfg: DemoConfig,
    pair_stats: dict,
    rm_out: dict,
    ppo_out: dict,
    timings: dict,
    peaks: dict | None = None,
) -> Path:
    from jaxrlhf.train.metrics import plot_run

    before, after = ppo_out["eval_before"], ppo_out["eval"]
    plots = plot_run(
        root / "ppo",
        out=root / "plots",
        keys=[
            "objective/scores",
            "objective/kl",
            "kl_coef",
            "rewards/ensemble_std",
            "gold",
            "score",
            "kl",
            "distinct_2",
            DEGENERATE_KEY,
            "loss/value",
            "policy/clipfrac",
        ],
    )
    curve = eval_curve(root / "ppo")
    plots.append(plot_gold_vs_kl({"PPO (LoRA)": curve}, root / "plots" / "gold_vs_kl.png"))
    gain, low, high = bootstrap_gain(
        before.get("gold_per_prompt", []), after.get("gold_per_prompt", [])
    )
    checks = target_checks(cfg, before, after, heldout_accuracy(rm_out))

    def row(name: str, key: str, fmt: str) -> str:
        b, a = before.get(key, float("nan")), after.get(key, float("nan"))
        return f"| {name} | {b:{fmt}} | {a:{fmt}} |"

    rm = cfg.ppo.reward_model
    reward_rule = rm.ensemble + (f" (coef {rm.ensemble_coef:g})" if rm.ensemble != "mean" else "")
    lines = [
        "# PE-RLHF demo report",
        "",
        f"Model: `{cfg.model.path}`; task: steer continuations of {pair_stats['prompts']} "
        f"fortune openings toward a higher gold score; gold judge: `{cfg.gold.fn}` "
        "(an outside scorer the models never see; the default is VADER's compound sentiment). "
        f"PPO's reward: the reward-model ensemble's `{reward_rule}`; KL budget: "
        f"{cfg.ppo.kl_budget} nats per response.",
        "",
        "## Headline",
        "",
        f"| held-out prompts ({len(before.get('gold_per_prompt', []))}) | before (base) | "
        "after (PPO LoRA) |",
        "|---|---|---|",
        row(f"gold score ({cfg.gold.label}, mean)", "gold", ".3f"),
        row("share of positive continuations", "gold_positive_share", ".2f"),
        row("reward-model score (mean)", "score", ".3f"),
        row("KL to the base (nats/response)", "kl", ".3f"),
        row("distinct-1", "distinct_1", ".3f"),
        row("distinct-2", "distinct_2", ".3f"),
        row("degenerate completions (a repeated word 3-gram)", DEGENERATE_KEY, ".1%"),
        row("mean length (words)", "mean_length", ".1f"),
        "",
        f"Gold gain {gain:+.3f} (95% bootstrap interval over prompts {low:+.3f} … {high:+.3f}).",
        "",
        rm_summary(pair_stats, rm_out, cfg.rm.ensemble_size),
        "",
        "## Targets",
        "",
        "| | measured | target | met |",
        "|---|---|---|---|",
        *[
            f"| {what} | {value} | {target} | {'yes' if ok else 'NO'} |"
            for what, value, target, ok in checks
        ],
        "",
        "## Gold score, KL and degeneration over PPO iterations (held-out prompts)",
        "",
        "| iteration | gold | KL | distinct-2 | degenerate | KL coef |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['step']} | {r['gold']:.3f} | {r['kl']:.2f} | {r.get('distinct_2', 0):.3f} | "
            f"{r.get(DEGENERATE_KEY, 0):.1%} | {r['kl_coef']:.3g} |"
            for r in curve
        ],
        "",
        "## Completions side by side (held-out prompts)",
        "",
        "| base | PPO |",
        "|---|---|",
        *[
            f"| {a!r} | {b!r} |"
            for a, b in zip(before.get("samples", []), after.get("samples", []), strict=False)
        ],
        "",
        "## Time (seconds, this machine)",
        "",
        *[f"- {k}: {v:.0f}" for k, v in timings.items()],
        "",
        *(
            [
                "Peak resident memory of the process (MiB): "
                + ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in peaks.items() if v is not None),
                "",
            ]
            if peaks
            else []
        ),
        "Plots: " + ", ".join(f"`{p.relative_to(root)}`" for p in plots),
        "",
    ]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
