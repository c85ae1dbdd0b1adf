"""DAPO's dynamic sampling with refill (`train.dynamic_sampling`, GRPO's `dynamic_sampling`):
which groups an iteration trains on, from hand-made tie patterns; the driver refills the
batch from the next prompts, stops at `max_num_gen_batches`, and resumes exactly."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest

from jaxrlhf import config as C
from jaxrlhf.algorithms import grpo as G
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.dynamic_sampling import is_first_round, join_groups, pick_groups
from jaxrlhf.train.loop import TrainingInterrupted
from jaxrlhf.train.runs import run_grpo
from jaxrlhf.train.scoring import Scorer

T, F = True, False

# ----------------------------------------------------------------------------- pure functions


def test_pick_groups_refills_in_round_order():
    # Round 0 keeps groups 0 and 2, round 1 keeps 1 and 2: the first four kept groups.
    picks, fillers = pick_groups([np.array([T, F, T, F]), np.array([F, T, T, F])], 4)
    np.testing.assert_array_equal(picks, [[0, 0], [0, 2], [1, 1], [1, 2]])
    assert fillers == 0
    # More kept than needed: the later round's surplus is left out.
    picks, fillers = pick_groups([np.array([T, F, T, F]), np.array([T, T, T, T])], 4)
    np.testing.assert_array_equal(picks, [[0, 0], [0, 2], [1, 0], [1, 1]])
    assert fillers == 0


def test_pick_groups_tops_up_with_the_earliest_dropped_groups_at_the_cap():
    # Two kept groups in two rounds: the two earliest dropped ones, (0, 1) and (0, 2), fill.
    picks, fillers = pick_groups([np.array([T, F, F, F]), np.array([F, F, T, F])], 4)
    np.testing.assert_array_equal(picks, [[0, 0], [0, 1], [0, 2], [1, 2]])
    assert fillers == 2
    # Nothing kept at all: round 0 as it is.
    picks, fillers = pick_groups([np.array([F, F, F])], 3)
    assert fillers == 3 and is_first_round(picks)


def test_is_first_round():
    assert is_first_round(pick_groups([np.array([T, T, T])], 3)[0])
    assert not is_first_round(np.array([[0, 0], [0, 2], [1, 0]]))


def test_join_groups_left_pads_rounds_of_shorter_prompts():
    """Round 0's prompts are 2 wide, round 1's 3: round 0's rows get one more pad on the
    left (token 0, attention 0); the responses are copied as they are."""
    group, pad = 2, 0

    def round_(width, offset):
        b, n = 4, 2
        ids = np.arange(b * (width + n)).reshape(b, width + n) + offset
        return {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "response_mask": np.ones((b, n), np.int32),
            "finished": np.arange(b) % 2 == 0,
        }

    r0, r1 = round_(2, 100), round_(3, 200)
    s0, s1 = np.array([1.0, 2, 3, 4]), np.array([5.0, 6, 7, 8])
    picks = np.array([[0, 1], [1, 0]])  # round 0's group 1 (rows 2, 3), round 1's group 0
    joined, scores = join_groups([r0, r1], [s0, s1], picks, group=group, pad_id=pad)
    np.testing.assert_array_equal(
        joined["input_ids"],
        np.concatenate([np.pad(r0["input_ids"][2:4], ((0, 0), (1, 0))), r1["input_ids"][:2]]),
    )
    np.testing.assert_array_equal(joined["attention_mask"][:2, 0], [0, 0])
    assert joined["attention_mask"][:2, 1:].all() and joined["attention_mask"][2:].all()
    np.testing.assert_array_equal(joined["finished"], [T, F, T, F])
    np.testing.assert_array_equal(scores, [3, 4, 5, 6])


def test_max_num_gen_batches_is_checked():
    with pytest.raises(ValueError, match="max_num_gen_batches must be >= 1"):
        _cfg("/tmp/unused", "max_num_gen_batches=0")
    assert G.ALGORITHM.plan(_cfg("/tmp/unused")).generation_rounds == 1  # off: one round
    on = _cfg("/tmp/unused", "dynamic_sampling=true", "max_num_gen_batches=3")
    assert G.ALGORITHM.plan(on).generation_rounds == 3


# ----------------------------------------------------------------------------- the driver

PATTERNS: list[list[bool]] = []
"""The tie pattern of each coming generation round, one flag per group (True: tied)."""


def patterned_reward(prompts, completions, **_):
    """Hand-made rewards: the next pattern of PATTERNS says which groups tie (reward 0 for
    each completion); the others get their row number in the round's batch (all distinct)."""
    tied = PATTERNS.pop(0)
    group = len(completions) // len(tied)
    return [0.0 if tied[i // group] else float(i) for i in range(len(completions))]


REWARD = "reward_funcs=[{fn: 'test_dynamic_sampling:patterned_reward', name: patterned}]"
PROMPTS, GROUP = 4, 4


def _cfg(run_dir, *overrides):
    return C.load_config(
        G.GRPOConfig,
        "configs/grpo_tiny.yaml",
        [
            f"run.run_dir={run_dir}",
            "mesh.data=1",
            "run.progress=false",
            f"prompts_per_iteration={PROMPTS}",
            f"num_generations={GROUP}",
            "generation.max_new_tokens=4",
            REWARD,
            *overrides,
        ],
    )


def _rows(n=32):
    return [{"prompt": "BCD"[i % 3] * (3 + i % 5)} for i in range(n)]


def _records(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for line in f if (r := json.loads(line))["split"] == "train"]


def _data_position(run_dir, step):
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        return ckpt.read_meta(step)["data_position"]
    finally:
        ckpt.close()


def _group_mean(g):
    """Mean reward of an untied group g: its rows g·G … g·G + G − 1 scored by row number."""
    return g * GROUP + (GROUP - 1) / 2


def test_refill_fills_the_batch_then_the_cap_masks_the_rest(tmp_path):
    """Iteration 1: round 1 ties groups 1, 3; round 2 ties 0, 2, 3; round 3 none → the batch
    is round 1's groups 0, 2, round 2's group 1 and round 3's group 0 (3 rounds, 5 groups
    dropped, nothing masked). Iteration 2 (cap of 3 rounds): every group ties in every round
    → round 1 trained as it is, all masked, `cap_reached` 1. 6 rounds: data position 24."""
    PATTERNS[:] = [[F, T, F, T], [T, F, T, T], [F, F, F, F]] + [[T, T, T, T]] * 3
    run_grpo(
        _cfg(tmp_path, "max_steps=2", "dynamic_sampling=true", "max_num_gen_batches=3"),
        source=_rows(),
    )
    assert PATTERNS == []  # exactly six rounds were scored
    first, second = _records(tmp_path)
    assert first["dynamic_sampling/generation_rounds"] == 3
    assert first["dynamic_sampling/dropped_groups"] == 5
    assert first["dynamic_sampling/masked_groups"] == 0
    assert first["dynamic_sampling/cap_reached"] == 0
    want = np.mean([_group_mean(0), _group_mean(2), _group_mean(1), _group_mean(0)])
    assert first["reward"] == pytest.approx(want)  # the trained rows' rewards
    assert first["grad_norm"] > 0
    assert second["dynamic_sampling/generation_rounds"] == 3
    assert second["dynamic_sampling/dropped_groups"] == 12
    assert second["dynamic_sampling/masked_groups"] == 4
    assert second["dynamic_sampling/cap_reached"] == 1
    assert second["reward"] == 0.0 and second["grad_norm"] == 0.0  # nothing trains
    assert _data_position(tmp_path, 2) == 6 * PROMPTS


def test_cap_reached_tops_up_with_masked_tied_groups(tmp_path):
    """max_num_gen_batches=2: round 1 keeps groups 0, 2, round 2 keeps group 1 → three kept
    groups; round 1's group 1 (the earliest dropped) fills the fourth slot, masked."""
    PATTERNS[:] = [[F, T, F, T], [T, F, T, T]]
    run_grpo(
        _cfg(tmp_path, "max_steps=1", "dynamic_sampling=true", "max_num_gen_batches=2"),
        source=_rows(),
    )
    (rec,) = _records(tmp_path)
    assert rec["dynamic_sampling/generation_rounds"] == 2
    assert rec["dynamic_sampling/dropped_groups"] == 5
    assert rec["dynamic_sampling/masked_groups"] == 1
    assert rec["dynamic_sampling/cap_reached"] == 1
    # Trained rows: round 1's groups 0, 1 (tied: 0), 2 and round 2's group 1.
    want = np.mean([_group_mean(0), 0.0, _group_mean(2), _group_mean(1)])
    assert rec["reward"] == pytest.approx(want)
    assert _data_position(tmp_path, 1) == 2 * PROMPTS


def prompt_tie_reward(prompts, completions, **_):
    """Ties every group whose prompt starts with "B"; the others score by row number. A pure
    function of the prompts, so an interrupted and resumed run sees the same rewards."""
    return [0.0 if p.startswith("B") else float(i) for i, p in enumerate(prompts)]


@pytest.mark.slow
def test_resume_after_sigterm_with_refills_is_exact(tmp_path, monkeypatch):
    """Refilling moves the data order by several rounds per iteration: interrupted in
    iteration 2, resumed, the adapter, optimizer state and rng equal an uninterrupted run's
    and so do the per-iteration dynamic-sampling records."""
    common = [
        "max_steps=3",
        "run.save_every=1000",
        "dynamic_sampling=true",
        "max_num_gen_batches=3",
        "reward_funcs=[{fn: 'test_dynamic_sampling:prompt_tie_reward', name: tie}]",
    ]
    rows = _rows()
    full = run_grpo(_cfg(tmp_path / "a", *common), source=rows)
    rec_a = _records(tmp_path / "a")
    assert max(r["dynamic_sampling/generation_rounds"] for r in rec_a) > 1  # refills happened

    real, calls = Scorer.__call__, {"n": 0}

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(rec_a[0]["dynamic_sampling/generation_rounds"]) + 1:
            os.kill(os.getpid(), signal.SIGTERM)  # in iteration 2's first round
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "__call__", interrupting)
    with pytest.raises(TrainingInterrupted):
        run_grpo(_cfg(tmp_path / "b", *common), source=rows)
    monkeypatch.setattr(Scorer, "__call__", real)
    assert [r["step"] for r in _records(tmp_path / "b")] == [1, 2]
    resumed = run_grpo(_cfg(tmp_path / "b", *common), source=rows, resume=True)
    a, b = jax.device_get((full["state"].train, resumed["state"].train))
    for x, y in zip(
        jax.tree.leaves((a.trainable, a.opt_state, a.rng)),
        jax.tree.leaves((b.trainable, b.opt_state, b.rng)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    keys = ("reward", "dynamic_sampling/generation_rounds", "dynamic_sampling/dropped_groups")
    rec_b = _records(tmp_path / "b")
    assert [[r[k] for k in keys] for r in rec_a] == [[r[k] for k in keys] for r in rec_b]
    assert _data_position(tmp_path / "a", 3) == _data_position(tmp_path / "b", 3)
