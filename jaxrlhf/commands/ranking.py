"""How well a reward model ranks held-out base samples: every pair of one prompt's samples
whose gold scores differ by at least `min_gap`, each sample scored once by the reward model
as PPO reads it (the rollout's own token ids, EOS appended to an unfinished row), with a
bootstrap interval over prompts.

The demo's held-out pairs (`pairs_heldout.jsonl`, the `rm` command's eval set) use each sample
once: 4 pairs of a prompt's 8 samples, ~170 pairs over 64 prompts, a standard error of about
±0.03 on the accuracy. All pairs of the same samples (up to 28 a prompt) have the same
expected accuracy — the samples of a prompt are drawn alike, so every pair of them is
distributed as a drawn pair — and a smaller spread, for one reward-model pass over the
samples rather than two per pair."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SampleBatch:
    """One batch of base samples as the sampler returned them, with their gold scores."""

    input_ids: np.ndarray
    """int32 [B, P + N]: prompt (left-padded) and response tokens."""
    attention_mask: np.ndarray
    finished: np.ndarray
    """bool [B]: stopped at an EOS."""
    gold: np.ndarray
    """float [B]: the gold judge's score of each response."""
    group: np.ndarray
    """int [B]: the prompt each sample answers (pairs are made within a group)."""
    usable: np.ndarray
    """bool [B]: False for a blank response, which never pairs."""


def concat_batches(batches: list[SampleBatch], field: str) -> np.ndarray:
    return np.concatenate([getattr(b, field) for b in batches])


def ranked_pairs(gold, group, usable, *, min_gap: float) -> tuple[np.ndarray, np.ndarray]:
    """All within-group pairs `(better, worse)` by gold, ties (gap < `min_gap`) and blank
    samples left out: two index arrays."""
    gold, group, usable = np.asarray(gold), np.asarray(group), np.asarray(usable, bool)
    members = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, group[members][1:] != group[members][:-1]])
    sizes = np.diff(np.r_[starts, len(members)])
    within = [np.triu_indices(n, k=1) for n in sizes]  # pairs inside each group only
    i = np.concatenate([members[s + a] for s, (a, _) in zip(starts, within, strict=True)] + [[]])
    j = np.concatenate([members[s + b] for s, (_, b) in zip(starts, within, strict=True)] + [[]])
    i, j = i.astype(np.int64), j.astype(np.int64)
    keep = usable[i] & usable[j] & (np.abs(gold[i] - gold[j]) >= min_gap)
    i, j = i[keep], j[keep]
    i_better = gold[i] > gold[j]
    return np.where(i_better, i, j), np.where(i_better, j, i)


def ranking_accuracy(
    scores, gold, group, usable, *, min_gap: float, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """The share of pairs the scores order as gold does (a tie in score counts as wrong),
    with its 95% bootstrap interval over groups (prompts resampled, their pairs with them)."""
    better, worse = ranked_pairs(gold, group, usable, min_gap=min_gap)
    if better.size == 0:
        return {"accuracy": float("nan"), "low": float("nan"), "high": float("nan"), "pairs": 0}
    scores = np.asarray(scores, np.float64)
    correct = scores[better] > scores[worse]
    groups, pair_group = np.unique(np.asarray(group)[better], return_inverse=True)
    right = np.bincount(pair_group, weights=correct, minlength=groups.size)
    total = np.bincount(pair_group, minlength=groups.size).astype(np.float64)
    idx = np.random.default_rng(seed).integers(0, groups.size, size=(n_boot, groups.size))
    boot = right[idx].sum(axis=1) / total[idx].sum(axis=1)
    return {
        "accuracy": float(correct.mean()),
        "low": float(np.quantile(boot, 0.025)),
        "high": float(np.quantile(boot, 0.975)),
        "pairs": int(better.size),
    }


def score_samples(batches: list[SampleBatch], scorer: Any) -> np.ndarray:
    """The reward model's scores of the samples, [K, N] (K members; 1 for a single model),
    through `scorer.reward_model` (`train.scoring.Scorer`: EOS appended as in PPO)."""
    out = []
    for b in batches:
        s = np.asarray(scorer.reward_model(b.input_ids, b.attention_mask, b.finished))
        out.append(s.reshape(-1, s.shape[-1]))
    return np.concatenate(out, axis=1)


def heldout_ranking(batches: list[SampleBatch], reward_model: str, cfg: Any) -> dict[str, Any]:
    """`ranking_accuracy` of the reward model (or ensemble) at `reward_model` on the demo's
    held-out samples: the ensemble's mean, PPO's combined reward (`cfg.ppo.reward_model`'s
    rule) and each member. `cfg` is the demo's config (model, gold gap, PPO's reading)."""
    import jax.numpy as jnp

    from jaxrlhf import config as C
    from jaxrlhf.algorithms.reward_model import combine_ensemble
    from jaxrlhf.models.base import load_base
    from jaxrlhf.sharding import make_mesh, put_tree
    from jaxrlhf.train.scoring import Scorer

    model_cfg, base, tokenizer = load_base(cfg.model, seed=cfg.seed)
    mesh = make_mesh(C.MeshConfig(data=1))
    section = dataclasses.replace(cfg.ppo.reward_model, path=reward_model)
    scorer = Scorer(
        model_cfg=model_cfg,
        frozen=put_tree(base, mesh),
        mesh=mesh,
        section=section,
        funcs=(),
        tokenizer=tokenizer,
        missing_eos_penalty=None,
    )
    scores = score_samples(batches, scorer)
    gold, group, usable = (concat_batches(batches, f) for f in ("gold", "group", "usable"))

    def judge(s):
        return ranking_accuracy(s, gold, group, usable, min_gap=cfg.min_gold_gap)

    out = {"mean": judge(scores.mean(axis=0))}
    if scores.shape[0] > 1:
        rule = section.ensemble
        combined = combine_ensemble(jnp.asarray(scores), rule=rule, coef=section.ensemble_coef)
        out[rule] = judge(np.asarray(combined))
        out["members"] = [judge(s) for s in scores]
    return out
