"""Reproducibility and crash safety end to end: the same command and seed give the same
pairs, metrics and adapter; a run killed with SIGKILL at random moments and resumed each time
ends with exactly the uninterrupted run's adapter."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in rows]


@pytest.mark.slow
def test_the_quick_demo_is_reproducible(tmp_path):
    from jaxrlhf.commands.demo import run_demo

    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir in runs:
        run_demo(quick=True, run_dir=str(run_dir), overrides=["ppo.num_iterations=2"])
    a, b = runs
    for name in ("pairs.jsonl", "pairs_heldout.jsonl"):
        assert (a / name).read_text() == (b / name).read_text()
    for stage in ("rm", "ppo"):
        assert _metrics(a / stage) == _metrics(b / stage)
    # The reward models (an ensemble: stacked and each member) and the policy, byte for byte.
    for adapter in (
        Path("rm/adapter/stacked.safetensors"),
        Path("rm/adapter/member_0/adapter_model.safetensors"),
        Path("rm/adapter/member_1/adapter_model.safetensors"),
        Path("ppo/adapter/adapter_model.safetensors"),
    ):
        assert (a / adapter).read_bytes() == (b / adapter).read_bytes()


def _rm_command(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jaxrlhf.cli", "rm", "--config", "configs/rm_tiny.yaml",
        f"run.run_dir={run_dir}", "mesh.data=1", "run.progress=false", "run.save_every=2",
        "max_steps=16", "batch_size=8", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    full = tmp_path / "full"
    subprocess.run(_rm_command(full), cwd=ROOT, env=env, check=True, capture_output=True)
    crashed = tmp_path / "crashed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(4):
        cmd = _rm_command(crashed, *(["--resume"] if attempt else []))
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(6.0, 14.0))  # start-up and compile take ~5 s
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    subprocess.run(
        _rm_command(crashed, "--resume"), cwd=ROOT, env=env, check=True, capture_output=True
    )
    assert kills >= 1
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert (full / adapter).read_bytes() == (crashed / adapter).read_bytes()
