"""The online driver on the continuous-batching engine (`generation.engine: continuous`)."""

from __future__ import annotations

import json
from pathlib import Path

from jaxrlhf.algorithms.grpo import GRPOConfig
from jaxrlhf.config import load_config
from jaxrlhf.train.runs import run_grpo

ROOT = Path(__file__).resolve().parents[1]


def test_grpo_runs_on_the_continuous_engine_and_logs_its_metrics(tmp_path):
    cfg = load_config(
        GRPOConfig,
        ROOT / "configs/grpo_tiny.yaml",
        [
            f"run.run_dir={tmp_path}",
            "mesh.data=1",
            "run.progress=false",
            "max_steps=2",
            "generation.engine=continuous",
            "generation.slots=8",
        ],
    )
    run_grpo(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["split"] == "train"][-1]
    assert last["rollout/sequences"] == cfg.generation_batch_size
    assert 0.0 < last["rollout/slot_occupancy"] <= 1.0
    assert last["rollout/prefills"] == cfg.prompts_per_iteration  # one prefill per group
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
