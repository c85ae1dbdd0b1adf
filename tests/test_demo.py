"""The demo's pairing of base samples into preference pairs, and its quick end-to-end run."""

import json

import numpy as np
import pytest

from jaxrlhf.commands.demo import pair_group, run_demo


def test_graded_pairs_run_from_the_widest_gap_inward():
    texts = ["a", "b", "c", "d", "e", "f"]
    gold = np.array([0.1, 0.9, -0.5, 0.3, 0.6, -0.2])
    pairs, n = pair_group(texts, gold, pairing="graded", pairs_per_prompt=3, min_gap=0.0)
    # ranked ascending: 2 (-0.5), 5 (-0.2), 0 (0.1), 3 (0.3), 4 (0.6), 1 (0.9)
    assert pairs == [(1, 2), (4, 5), (3, 0)]
    assert n == 3


def test_graded_pairs_drop_ties_and_blank_samples():
    texts = ["a", " ", "c", "d"]
    gold = np.array([0.5, 0.9, 0.45, 0.0])
    pairs, n = pair_group(texts, gold, pairing="graded", pairs_per_prompt=2, min_gap=0.1)
    # the blank sample never pairs: three samples left make one pair, the best vs the worst
    assert pairs == [(0, 3)]
    assert n == 2
    pairs, _ = pair_group(texts, gold, pairing="graded", pairs_per_prompt=2, min_gap=0.6)
    assert pairs == []


def test_random_pairs_follow_the_draw_and_order_by_gold():
    texts = ["a", "b", "c", "d", "e", "f"]
    gold = np.array([0.2, 0.8, 0.5, -0.1, 0.3, 0.31])
    pairs, n = pair_group(texts, gold, pairing="random", pairs_per_prompt=1, min_gap=0.05)
    assert pairs == [(1, 0), (2, 3)]  # (4, 5) is a tie
    assert n == 3


def test_unknown_pairing_is_rejected():
    with pytest.raises(ValueError, match="pairing"):
        pair_group(["a", "b"], [0.0, 1.0], pairing="best", pairs_per_prompt=1, min_gap=0.0)


@pytest.mark.slow
def test_quick_demo_runs_the_whole_pipeline(tmp_path):
    out = run_demo(quick=True, run_dir=str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    assert "## Headline" in report and "KL to the base" in report
    assert (tmp_path / "plots" / "eval.png").stat().st_size > 0
    assert (tmp_path / "rm" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "ppo" / "adapter" / "adapter_config.json").exists()
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert len(rows) == out["pairs"]["pairs"] > 0
    assert all(r["gold_chosen"] > r["gold_rejected"] for r in rows)
    # the reward model learns the gold ordering beyond chance on held-out prompts' pairs
    assert out["rm"]["eval"]["accuracy"] > 0.6
    assert out["ppo"]["eval_before"]["kl"] == 0.0
