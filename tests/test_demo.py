"""The demo's pairing of base samples into preference pairs, and its quick end-to-end run."""

import json

import numpy as np
import pytest

from jaxrlhf.commands.demo import (
    DemoConfig,
    bootstrap_gain,
    gold_at_kl,
    pair_group,
    run_demo,
    target_checks,
)


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
    members = json.loads((tmp_path / "rm" / "adapter" / "ensemble.json").read_text())["members"]
    assert len(members) == 2  # the demo's reward-model ensemble, each member a PEFT adapter
    for member in members:
        assert (tmp_path / "rm" / "adapter" / member / "adapter_config.json").exists()
    assert "## Targets" in report and "distinct-2" in report
    assert (tmp_path / "plots" / "gold_vs_kl.png").stat().st_size > 0
    assert (tmp_path / "ppo" / "adapter" / "adapter_config.json").exists()
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert len(rows) == out["pairs"]["pairs"] > 0
    assert all(r["gold_chosen"] > r["gold_rejected"] for r in rows)
    # the reward model learns the gold ordering beyond chance on held-out prompts' pairs
    assert out["rm"]["eval"]["accuracy"] > 0.6
    # ... and on all pairs of the held-out samples, each sample scored once as PPO reads it
    ranking = out["rm"]["ranking"]
    assert ranking["mean"]["pairs"] > out["pairs"]["heldout_pairs"]
    assert ranking["mean"]["accuracy"] > 0.6
    assert len(ranking["members"]) == 2 and "mean_minus_std" in ranking
    assert "Ranking accuracy on all" in report
    assert out["ppo"]["eval_before"]["kl"] == 0.0


def test_bootstrap_gain_is_the_paired_mean_with_an_interval_around_it():
    before = [0.0, 0.1, 0.2, 0.3]
    after = [0.5, 0.5, 0.7, 0.9]  # per-prompt gains 0.5, 0.4, 0.5, 0.6: mean 0.5
    mean, low, high = bootstrap_gain(before, after)
    assert mean == pytest.approx(0.5)
    assert 0.4 <= low <= mean <= high <= 0.6
    # identical gains: no spread
    assert bootstrap_gain([0.0, 1.0], [0.25, 1.25]) == pytest.approx((0.25, 0.25, 0.25))


def test_gold_at_kl_interpolates_along_the_evaluations():
    curve = [{"kl": 0.0, "gold": 0.2}, {"kl": 4.0, "gold": 0.6}, {"kl": 8.0, "gold": 0.7}]
    assert gold_at_kl(curve, 2.0) == pytest.approx(0.4)
    assert gold_at_kl(curve, 6.0) == pytest.approx(0.65)
    assert gold_at_kl(curve, 8.0) == pytest.approx(0.7)
    assert np.isnan(gold_at_kl(curve, 9.0))  # beyond the run's reach: not extrapolated


def test_targets_are_judged_on_the_report_numbers():
    before = {"gold": 0.2, "distinct_2": 0.8, "repeated_3gram": 0.0}
    after = {"gold": 0.75, "kl": 9.5, "distinct_2": 0.73, "repeated_3gram": 0.03}
    met = [ok for *_, ok in target_checks(DemoConfig(), before, after, rm_accuracy=0.81)]
    assert met == [True, True, True, True, True]  # distinct-2 0.73 / 0.8 = 0.91
    after = {**after, "kl": 10.5, "distinct_2": 0.7, "repeated_3gram": 0.05}
    met = [ok for *_, ok in target_checks(DemoConfig(), before, after, rm_accuracy=0.79)]
    assert met == [True, False, False, False, False]


@pytest.mark.slow
def test_quick_compare_full_writes_one_table_for_both_arms(tmp_path):
    out = run_demo(quick=True, run_dir=str(tmp_path), compare_full=True)
    table = (tmp_path / "compare.md").read_text()
    assert "| reward model held-out accuracy |" in table and "Ratios LoRA / full" in table
    assert (tmp_path / "lora" / "rm" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "full" / "ppo" / "model" / "config.json").exists()
    for arm in out["arms"].values():
        assert arm["rm"]["eval"]["accuracy"] > 0.6
        # the full arm's reward model (an HF folder) is ranked on the held-out samples too
        assert arm["rm"]["ranking"]["mean"]["pairs"] > out["pairs"]["heldout_pairs"]
        assert arm["ppo"]["eval_before"]["kl"] == 0.0
        assert arm["timings"]["ppo"] > 0
