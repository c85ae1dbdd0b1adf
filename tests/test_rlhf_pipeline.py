"""The whole RLHF pipeline on a tiny random model, judged by a gold reward PPO never sees:

    base samples (3 temperatures x 2 lengths, 8 per prompt) ─ gold: share of lowercase letters
    ─> ranked pairs (best vs worst, 2nd vs 2nd-worst, ...; near-ties dropped) ─> pairs.jsonl
    ─> `jaxrlhf rm` (LoRA SEQ_CLS) ─> `jaxrlhf ppo` with that reward model as the only reward
    (critic initialised from it) ─> held-out prompts: gold, RM score and KL, before vs after.

`test_ppo.py` shows that PPO climbs a reward it is given; this shows that a reward model learned
from preference pairs carries the gold preference over to the policy's shifted outputs instead
of being hacked (RM score up, gold flat). What makes the reward model generalise here: graded
pairs (not only best vs worst) teach it to count lowercase letters rather than to spot one,
and 4-token samples reach gold shares (0.5-1) that 8-token base samples almost never do. The
three temperatures triple the samples; on a random model they hardly change the gold of a
sample (its next-token distribution is near uniform at any temperature), on a real one they
also spread it.

Measured with these settings (seed 0 is the test; 1-3 checked the same way):

    seed  pairs  RM acc  gold before -> after   RM score before -> after   KL (nats/response)
    0     3150   0.989   0.100 -> 0.632         -2.74 -> 2.60              9.5
    1     3127   0.995   0.101 -> 0.439         -2.72 -> -0.40             13.9
    2     2944   0.986   0.081 -> 0.859         -2.69 -> 3.70              11.2
    3     3017   0.993   0.092 -> 0.623         -0.75 -> 2.19              20.8

About 35 s with a warm compilation cache, 90 s cold, on a loaded 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import string
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrlhf import config as C
from jaxrlhf import data as D
from jaxrlhf.algorithms.ppo import PPOConfig
from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.commands.demo import gold_scores, make_gold_hook
from jaxrlhf.models.base import load_base
from jaxrlhf.rewards import RewardFuncConfig
from jaxrlhf.rollout import Sampler, prompt_batch
from jaxrlhf.sharding import make_mesh, put_tree
from jaxrlhf.train.runs import run_ppo, run_rm

ROOT = Path(__file__).resolve().parents[1]
GOLD = RewardFuncConfig(fn="char_share", name="lowercase", kwargs={"chars": string.ascii_lowercase})


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = 0
    n_train_prompts: int = 192
    n_eval_prompts: int = 128
    pair_temperatures: tuple[float, ...] = (0.7, 1.0, 1.5)
    pair_lengths: tuple[int, ...] = (4, 8)
    """max_new_tokens of the pair samples; PPO samples 8 (ppo_tiny.yaml)."""
    samples_per_prompt: int = 8
    min_gold_gap: float = 0.1
    rm_overrides: tuple[str, ...] = ("num_epochs=1", "optim.learning_rate=1e-3")
    ppo_overrides: tuple[str, ...] = (
        "num_iterations=24",
        "rollout_batch_size=64",
        "mini_batch_size=32",
        "num_ppo_epochs=2",
        "optim.learning_rate=5e-3",
        "kl_coef=0.05",
        "value_init_from_reward_model=true",
    )


def prompt_rows(n: int, seed: int) -> list[dict]:
    """Upper-case prompts: nothing lowercase to copy."""
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choices("BCDEFGH", k=rng.randint(3, 8)))} for _ in range(n)]


def preference_pairs(model_cfg, base, tokenizer, prompts: list[str], s: Settings) -> list[dict]:
    """For every temperature x response length, `samples_per_prompt` base samples per prompt,
    ranked by the gold reward; the i-th best and i-th worst of each group form a pair, dropped
    when their gold gap is under `min_gold_gap` or either response is blank (which the `rm`
    data loader rejects)."""
    mesh = make_mesh(C.MeshConfig(data=1))
    params = put_tree(base, mesh)
    data, _ = D.tokenize_prompts([{"prompt": p} for p in prompts], tokenizer, max_prompt_length=16)
    key = jax.random.PRNGKey(s.seed + 1)
    k = s.samples_per_prompt
    rows = []
    settings = itertools.product(s.pair_temperatures, s.pair_lengths)
    for i, (temperature, length) in enumerate(settings):
        sampler = Sampler(
            model_cfg,
            C.GenerationConfig(max_new_tokens=length, temperature=temperature),
            lora_cfg=None,
            eos_token_ids=tuple(model_cfg.eos_token_id),
            pad_token_id=tokenizer.pad_token_id,
            mesh=mesh,
        )
        per_batch = 256 // k
        for start in range(0, len(data), per_batch):
            idx = np.arange(start, min(start + per_batch, len(data)))
            batch, values, _ = prompt_batch(
                data, idx, pad_id=tokenizer.pad_token_id, buckets=(16,), mesh=mesh, repeat=k
            )
            out = sampler(params, None, batch, jax.random.fold_in(key, 1000 * i + start))
            tokens = np.asarray(out["tokens"])
            mask = np.asarray(out["response_mask"]).astype(bool)
            texts = [
                tokenizer.decode(t[m].tolist(), skip_special_tokens=True)
                for t, m in zip(tokens, mask, strict=True)
            ]
            gold = gold_scores(GOLD, values, texts)
            for g in range(0, len(texts), k):  # the k samples of one prompt
                ranked = g + np.argsort(-gold[g : g + k], kind="stable")
                for j in range(k // 2):
                    hi, lo = ranked[j], ranked[k - 1 - j]
                    if gold[hi] - gold[lo] < s.min_gold_gap:
                        continue
                    if not texts[hi].strip() or not texts[lo].strip():
                        continue
                    rows.append(
                        {
                            "prompt": values[g],
                            "chosen": texts[hi],
                            "rejected": texts[lo],
                            "gold_chosen": float(gold[hi]),
                            "gold_rejected": float(gold[lo]),
                        }
                    )
    return rows


def run_pipeline(tmp_path: Path, s: Settings) -> dict:
    train = prompt_rows(s.n_train_prompts, seed=s.seed)
    held_out = prompt_rows(s.n_eval_prompts, seed=10_000 + s.seed)
    common = ["mesh.data=1", f"run.seed={s.seed}", "run.progress=false"]
    common += ["run.eval_every=100000", "run.save_every=100000"]
    rm_cfg = C.load_config(
        RMConfig,
        ROOT / "configs" / "rm_tiny.yaml",  # the same tiny base as ppo_tiny.yaml
        [
            *common,
            f"run.run_dir={tmp_path / 'rm'}",
            f"data.train={tmp_path / 'pairs.jsonl'}",
            "data.max_length=32",
            "data.length_buckets=[32]",
            "data.eval_fraction=0.2",
            "batch_size=16",
            "eval_batch_size=64",
            *s.rm_overrides,
        ],
    )
    model_cfg, base, tokenizer = load_base(rm_cfg.model, seed=s.seed)
    pairs = preference_pairs(model_cfg, base, tokenizer, [r["prompt"] for r in train], s)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for row in pairs:
            f.write(json.dumps(row) + "\n")
    rm = run_rm(rm_cfg)  # reads pairs.jsonl, holds out 20% of the pairs

    ppo_cfg = C.load_config(
        PPOConfig,
        ROOT / "configs" / "ppo_tiny.yaml",
        [
            *common,
            f"run.run_dir={tmp_path / 'ppo'}",
            "run.log_every=1",
            f"eval_prompts_batch={s.n_eval_prompts}",
            *s.ppo_overrides,
        ],
    )
    # The reward model is the only reward (ppo_tiny.yaml's rule-based reward is dropped).
    ppo_cfg = dataclasses.replace(
        ppo_cfg, reward_funcs=(), reward_model=C.RewardModelSection(path=rm["export"])
    )
    assert model_cfg == load_base(ppo_cfg.model, seed=s.seed)[0]  # one base for all stages
    ppo = run_ppo(
        ppo_cfg, source={"train": train, "eval": held_out}, eval_hook=make_gold_hook(GOLD)
    )
    return {"pairs": pairs, "rm": rm, "before": ppo["eval_before"], "after": ppo["eval"]}


@pytest.mark.slow
def test_ppo_with_a_reward_model_trained_by_rm_raises_the_gold_reward(tmp_path):
    out = run_pipeline(tmp_path, Settings())
    pairs, rm, before, after = out["pairs"], out["rm"], out["before"], out["after"]
    chosen_gold = float(np.mean([p["gold_chosen"] for p in pairs]))
    summary = {
        "pairs": len(pairs),
        "chosen_gold": round(chosen_gold, 3),
        "rm_accuracy": (rm["eval_before"]["accuracy"], rm["eval"]["accuracy"]),
        **{k: (round(before[k], 3), round(after[k], 3)) for k in ("gold", "score", "kl")},
    }
    print(summary)
    assert len(pairs) >= 1000, summary
    # The reward model ranks held-out pairs far above chance (0.5).
    assert rm["eval"]["accuracy"] >= 0.9, summary
    # PPO raises the reward model's score on held-out prompts...
    assert after["score"] > before["score"] + 1.0, summary
    # ...and the gold reward with it: from ~0.1 (26 of the 259 byte tokens are lowercase
    # letters) by more than 0.15, and past the average chosen response the reward model was
    # trained on (~0.25), so it did not only fit its pairs but generalised beyond them. A hacked
    # reward model raises its own score with gold flat (+0.02 in an earlier attempt).
    assert after["gold"] > before["gold"] + 0.15, summary
    assert after["gold"] > chosen_gold, summary
    # The KL to the base stays bounded (summed over the 8-token response; the rule-based test
    # in test_ppo.py allows the same).
    assert before["kl"] == 0.0
    assert after["kl"] < 25.0, summary
