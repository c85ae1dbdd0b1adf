"""Every model family learns (slow): from a tiny random checkpoint built by transformers
(`helpers.families`), a LoRA reward model's held-out accuracy on the upper-case preference
task rises from chance to near one, and GRPO raises a rule-based reward (the share of
lower-case letters in completions to upper-case prompts). Parity of each family with
transformers is tests/models/test_families.py; this is the end-to-end evidence that the
training paths (reward head, prefix-shared packing, sampler, policy loss, MoE aux loss) work
for each family, not only the forward."""

from __future__ import annotations

import json
import os

import datasets
import jax
import numpy as np
import pytest
from helpers.families import FAMILY_MODELS, save_tiny_family
from helpers.tasks import case_preference_rows
from test_grpo import _rows as upper_case_prompts

from jaxrlhf import config as C
from jaxrlhf import sharding
from jaxrlhf.algorithms.grpo import GRPOConfig
from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.train import setup as run_setup
from jaxrlhf.train.runs import run_grpo, run_rm

FAMILIES = sorted(FAMILY_MODELS)


@pytest.fixture
def one_device(monkeypatch):
    monkeypatch.setattr(
        run_setup,
        "make_mesh",
        lambda mesh_cfg: sharding.make_mesh(mesh_cfg, devices=jax.devices()[:1]),
    )


def _base_folder(family, tmp_path):
    return save_tiny_family(family, tmp_path / "base", seed=0)


def _train_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_learns(family, tmp_path, one_device):
    folder = _base_folder(family, tmp_path)
    cfg = C.load_config(
        RMConfig,
        "configs/rm_tiny.yaml",
        [
            f"model.path={folder}",
            f"run.run_dir={tmp_path / 'run'}",
            "mesh.data=1",
            "run.progress=false",
            "data.max_length=48",
            "data.length_buckets=[48]",
            "num_epochs=2",
            "run.eval_every=1000",
        ],
    )
    out = run_rm(cfg, source=datasets.Dataset.from_list(case_preference_rows(240, seed=0)))
    before, after = out["eval_before"]["accuracy"], out["eval"]["accuracy"]
    print(f"{family} rm: held-out accuracy {before:.3f} -> {after:.3f}")
    assert before < 0.75 and after >= 0.9, (family, before, after)
    train = _train_records(tmp_path / "run")
    assert ("aux_loss" in train[-1]) == (family in ("qwen3_moe", "mixtral"))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_raises_a_rule_based_reward(family, tmp_path, one_device):
    folder = _base_folder(family, tmp_path)
    cfg = C.load_config(
        GRPOConfig,
        "configs/grpo_tiny.yaml",
        [
            f"model.path={folder}",
            f"run.run_dir={tmp_path / 'run'}",
            "mesh.data=1",
            "run.progress=false",
            "max_steps=30",
        ],
    )
    run_grpo(cfg, source=upper_case_prompts(256))
    train = _train_records(tmp_path / "run")
    first = np.mean([r["reward"] for r in train[:3]])
    last = np.mean([r["reward"] for r in train[-3:]])
    print(f"{family} grpo: reward (mean of 3 steps) {first:.3f} -> {last:.3f}")
    assert last > first + 0.3, (family, first, last)
