"""Training on a quantized frozen base through the commands' config (`model.quant`): an NF4
reward model and an NF4 GRPO run learn; the base stays quantized, only adapters train."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.tasks import case_preference_rows

from jaxrlhf.algorithms.grpo import GRPOConfig
from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.config import load_config
from jaxrlhf.models.quant import is_quantized
from jaxrlhf.train.runs import run_grpo, run_rm

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["mesh.data=1", "run.progress=false", "model.quant=nf4"]


def test_nf4_reward_model_learns(tmp_path):
    cfg = load_config(RMConfig, ROOT / "configs/rm_tiny.yaml", [f"run.run_dir={tmp_path}", *COMMON])
    out = run_rm(cfg, source=case_preference_rows(120, seed=2))
    assert out["eval_before"]["accuracy"] < 0.6
    assert out["eval"]["accuracy"] > 0.9
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_nf4_grpo_learns_and_keeps_the_base_quantized(tmp_path):
    cfg = load_config(
        GRPOConfig,
        ROOT / "configs/grpo_tiny.yaml",
        [f"run.run_dir={tmp_path}", *COMMON, "max_steps=20"],
    )
    out = run_grpo(cfg)
    frozen = out["frozen"]
    assert is_quantized(frozen["layers"]["q_proj"]["kernel"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    reward = [r["reward"] for r in records if r["split"] == "train"]
    assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 0.15, reward
    assert all(
        np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out["state"].train.trainable)
    )


def test_full_finetuning_on_a_quantized_base_is_refused():
    with pytest.raises(ValueError, match="a quantized base is frozen"):
        load_config(RMConfig, ROOT / "configs/rm_tiny.yaml", ["model.quant=int8", "lora=null"])
