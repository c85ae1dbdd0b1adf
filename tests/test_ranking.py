"""The reward model's ranking accuracy over all pairs of held-out samples: the pairs it
makes and the accuracy with its interval, on fixed numbers."""

import numpy as np
import pytest

from jaxrlhf.commands.ranking import ranked_pairs, ranking_accuracy


def test_pairs_are_every_non_tied_pair_within_a_prompt():
    gold = np.array([0.9, 0.1, 0.5, 0.0, 0.8, 0.2])
    group = np.array([0, 0, 0, 1, 1, 1])
    usable = np.array([True, True, True, True, True, False])
    better, worse = ranked_pairs(gold, group, usable, min_gap=0.25)
    # group 0: (0, 1) gap 0.8, (0, 2) 0.4, (1, 2) 0.4 -> 2 over 1; group 1: (3, 4) only (5 is
    # blank); no pair across groups.
    assert sorted(zip(better.tolist(), worse.tolist(), strict=True)) == [
        (0, 1),
        (0, 2),
        (2, 1),
        (4, 3),
    ]
    better, _ = ranked_pairs(gold, group, usable, min_gap=0.5)
    assert better.tolist() == [0, 4]


def test_accuracy_counts_pairs_and_resamples_prompts():
    gold = np.array([0.9, 0.1, 0.5, 0.0, 0.8, 0.2])
    group = np.array([0, 0, 0, 1, 1, 1])
    usable = np.ones(6, bool)
    # Scores: group 0 ordered as gold (3 right); group 1: 4 > 3 right, 4 > 5 right, 5 vs 3
    # (gold 0.2 vs 0.0) is a tie at min_gap 0.25 and left out; score 3 > 5 irrelevant.
    scores = np.array([3.0, 1.0, 2.0, 0.5, 1.0, 0.0])
    r = ranking_accuracy(scores, gold, group, usable, min_gap=0.25)
    assert r["pairs"] == 5 and r["accuracy"] == pytest.approx(1.0)
    assert r["low"] == pytest.approx(1.0) and r["high"] == pytest.approx(1.0)
    # Group 1 reversed (4 below 3 and 5): 3 right of 5; a tie in score counts as wrong.
    scores = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 1.0])
    r = ranking_accuracy(scores, gold, group, usable, min_gap=0.25)
    # group 0: (0,1) right, (0,2) tie -> wrong, (2,1) right; group 1: (4,3) wrong, (4,5) tie.
    assert r["accuracy"] == pytest.approx(2 / 5)
    # The interval resamples prompts: its ends are the two groups' own accuracies at most.
    assert 0.0 <= r["low"] <= r["accuracy"] <= r["high"] <= 2 / 3


def test_no_pairs_gives_nan_not_an_error():
    r = ranking_accuracy([0.0, 1.0], [0.0, 0.1], [0, 0], [True, True], min_gap=0.25)
    assert r["pairs"] == 0 and np.isnan(r["accuracy"])
