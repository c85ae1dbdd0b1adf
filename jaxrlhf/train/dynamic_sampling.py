"""Refilling an online batch with groups that train (DAPO's dynamic sampling, as verl runs it).

A group whose rewards all tie has zero group-relative advantage and teaches nothing. With
`dynamic_sampling` the online driver keeps sampling the next prompts of the data order,
round after round, until `prompts` groups with some spread are collected or
`max_num_gen_batches` rounds ran (verl's `algorithm.filter_groups`):

    round 1: keep ■ □ ■ □    round 2: keep □ ■ ■ □    → train on ■(1,0) ■(1,2) ■(2,1) ■(2,2)

Short of `prompts` after the last round, the batch is topped up with the earliest dropped
groups, which the algorithm's `prepare` masks out of the loss (their rewards tie), so the
update always sees `prompts × group` rows. Everything here is host code on numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pick_groups(keeps: Sequence[np.ndarray], want: int) -> tuple[np.ndarray, int]:
    """The groups an iteration trains on, from each round's keep mask [groups] bool.

    Kept groups are taken in (round, group) order, the first `want` of them; short of
    `want`, the earliest dropped groups fill the rest. Returns `(picks [want, 2] int of
    (round, group), sorted; fillers)`, `fillers` = how many picks are dropped groups."""
    kept = [(r, g) for r, k in enumerate(keeps) for g in np.flatnonzero(k)]
    dropped = [(r, g) for r, k in enumerate(keeps) for g in np.flatnonzero(~np.asarray(k))]
    if len(kept) + len(dropped) < want:
        raise ValueError(f"{len(kept) + len(dropped)} groups sampled, fewer than {want}")
    picks = kept[:want]
    fillers = want - len(picks)
    picks += dropped[:fillers]
    return np.asarray(sorted(picks), np.int64).reshape(want, 2), fillers


def is_first_round(picks: np.ndarray) -> bool:
    """Whether the picks are exactly round 0's groups in order (no rows to move)."""
    return bool(np.all(picks[:, 0] == 0) and np.array_equal(picks[:, 1], np.arange(len(picks))))


def join_groups(
    rounds: Sequence[dict],
    scores: Sequence[np.ndarray],
    picks: np.ndarray,
    *,
    group: int,
    pad_id: int,
) -> tuple[dict, np.ndarray]:
    """One batch of the picked groups' rows from several rounds' rollouts (host arrays).

    `rounds[r]`: a rollout's `step_inputs()` as numpy, rows `[prompt (left-padded, P_r) |
    response (N)]`. Rounds cut at different prompt buckets are left-padded to the longest
    (pad tokens, attention 0): positions count real tokens, so the rows compute the same.
    Returns (inputs of `prepare`, scores [len(picks) × group])."""
    n = {r["response_mask"].shape[1] for r in rounds}
    if len(n) != 1:
        raise ValueError(f"rounds have different response lengths {sorted(n)}")
    (n,) = n
    width = max(r["input_ids"].shape[1] for r in rounds)
    rows = [np.arange(g * group, (g + 1) * group) for _, g in picks]

    def take(r: int, key: str, idx: np.ndarray) -> np.ndarray:
        x = rounds[r][key][idx]
        extra = width - rounds[r]["input_ids"].shape[1]
        if key in ("input_ids", "attention_mask") and extra:
            fill = pad_id if key == "input_ids" else 0
            x = np.concatenate([np.full((len(idx), extra), fill, x.dtype), x], axis=1)
        return x

    joined = {
        key: np.concatenate([take(r, key, idx) for (r, _), idx in zip(picks, rows, strict=True)])
        for key in rounds[0]
    }
    picked = np.concatenate([scores[r][idx] for (r, _), idx in zip(picks, rows, strict=True)])
    return joined, picked.astype(np.float32)
