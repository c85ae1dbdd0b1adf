"""The KL budget: the controller's rule on fixed numbers, and a tiny PPO run that exceeds the
budget without it and holds it with it."""

from __future__ import annotations

import json
import os
import random

import datasets
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import config as C
from jaxrlhf.advantages import init_kl_control, update_kl_budget
from jaxrlhf.algorithms import ppo as P
from jaxrlhf.train.runs import run_ppo


def test_budget_controller_steps():
    state = init_kl_control(0.1)
    # The controller aims at 80% of the budget (2.0 -> 1.6) with the squared ratio:
    # KL 1.76 = 1.1 x 1.6: x1.21.
    assert float(update_kl_budget(state, 1.76, budget=2.0).value) == pytest.approx(0.121)
    # KL 6 = 3.75 x 1.6: the step is capped at x1.5.
    assert float(update_kl_budget(state, 6.0, budget=2.0).value) == pytest.approx(0.15)
    assert float(update_kl_budget(state, 6.0, budget=2.0, max_step=2.0).value) == (
        pytest.approx(0.2)
    )
    # Under its aim: relaxes, by 1/1.2 at most (KL 1.2 = 0.75 x 1.6: x0.5625 -> x0.8333),
    # slower than it raises ...
    assert float(update_kl_budget(state, 1.2, budget=2.0).value) == pytest.approx(0.1 / 1.2)
    assert float(update_kl_budget(state, 1.2, budget=2.0, max_relax=2.0).value) == (
        pytest.approx(0.05625)
    )
    # KL 1.5 = 0.9375 x 1.6: x0.87890625, inside the bound.
    assert float(update_kl_budget(state, 1.5, budget=2.0).value) == pytest.approx(0.087890625)
    # ... and never below the floor (the run's own coefficient).
    assert float(update_kl_budget(state, 0.0, budget=2.0, floor=0.09).value) == pytest.approx(0.09)
    assert float(update_kl_budget(state, 1.0, budget=2.0, floor=0.1).value) == pytest.approx(0.1)
    # headroom 1: aims at the budget itself (KL 2.2 = 1.1 x 2: x1.21).
    assert float(update_kl_budget(state, 2.2, budget=2.0, headroom=1.0).value) == pytest.approx(
        0.121
    )
    # Capped at max_coef.
    big = init_kl_control(8.0)
    assert float(update_kl_budget(big, 20.0, budget=2.0).value) == pytest.approx(10.0)
    assert jnp.isfinite(update_kl_budget(state, jnp.float32(1e30), budget=2.0).value)


def test_budget_controller_reads_the_trend():
    state = update_kl_budget(init_kl_control(0.1), 1.0, budget=2.0, floor=0.1)
    assert float(state.value) == pytest.approx(0.1)
    assert float(state.last_kl) == pytest.approx(1.0)
    # Rising 1.0 -> 1.4, two iterations ahead: heading for 1.4 + 2 x 0.4 = 2.2 = 1.375 x the
    # aim of 1.6, so β rises (x1.890625, capped at x1.5) while the KL itself is still under
    # the aim.
    rising = update_kl_budget(state, 1.4, budget=2.0)
    assert float(rising.value) == pytest.approx(0.15)
    assert float(update_kl_budget(state, 1.4, budget=2.0, max_step=2.0).value) == (
        pytest.approx(0.1890625)
    )
    assert float(rising.last_kl) == pytest.approx(1.4)
    # One iteration ahead (lookahead 1): heading for 1.8 = 1.125 x 1.6, x1.265625.
    assert float(update_kl_budget(state, 1.4, budget=2.0, lookahead=1.0).value) == (
        pytest.approx(0.1265625)
    )
    # Rising slowly under the aim (1.0 -> 1.1, heading for 1.3 = 0.8125 x 1.6): x0.66015625,
    # a relaxation (at most by 1/1.2).
    assert float(update_kl_budget(state, 1.1, budget=2.0).value) == pytest.approx(0.1 / 1.2)
    assert float(update_kl_budget(state, 1.1, budget=2.0, max_relax=2.0).value) == (
        pytest.approx(0.066015625)
    )
    # Over the aim but coming down (3.0 -> 2.9, heading for 2.7): β holds, no wind-up.
    high = update_kl_budget(init_kl_control(0.1), 3.0, budget=2.0, max_step=1.0)
    assert float(update_kl_budget(high, 2.9, budget=2.0).value) == pytest.approx(0.1)
    # Coming down fast (3.0 -> 2.5, heading for 1.5, under the aim): β relaxes before the KL
    # itself is under the aim (x0.87890625) ...
    assert float(update_kl_budget(high, 2.5, budget=2.0).value) == pytest.approx(0.087890625)
    # ... by 1/max_relax at most (2.0 -> 1.2, heading below 0).
    down = update_kl_budget(init_kl_control(0.1), 2.0, budget=2.0, max_step=1.0)
    assert float(update_kl_budget(down, 1.2, budget=2.0).value) == pytest.approx(0.1 / 1.2)


def _rows(n=256, seed=0):
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choices("BCDEFGH", k=rng.randint(3, 8)))} for _ in range(n)]


def _kls(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["objective/kl"] for r in records if r["split"] == "train"]


@pytest.mark.slow
def test_kl_budget_holds_where_the_fixed_coefficient_drifts(tmp_path):
    """test_ppo's learning settings (lr 1e-2, 4 epochs): with kl_coef fixed at 0.02 the KL
    climbs past 10 nats per response; with kl_budget=6 it comes back under 6 and stays."""
    common = [
        "mesh.data=1",
        "num_iterations=30",
        "run.log_every=1",
        "run.progress=false",
        "optim.learning_rate=1e-2",
        "num_ppo_epochs=4",
        "kl_coef=0.02",
    ]
    rows = datasets.Dataset.from_list(_rows())
    for name, extra in (("fixed", []), ("budget", ["kl_budget=6.0"])):
        cfg = C.load_config(
            P.PPOConfig,
            "configs/ppo_tiny.yaml",
            [f"run.run_dir={tmp_path / name}", *common, *extra],
        )
        run_ppo(cfg, source=rows)
    fixed, budget = _kls(tmp_path / "fixed"), _kls(tmp_path / "budget")
    assert np.mean(fixed[-10:]) > 2 * 6.0, fixed
    assert np.mean(budget[-10:]) <= 6.0, budget
