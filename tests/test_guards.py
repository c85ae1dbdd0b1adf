"""Nothing lost: a non-finite step stops the run (or is skipped) without saving it, a corrupt
newest checkpoint falls back to the previous intact one, and a checkpoint of another
configuration is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.tasks import case_preference_rows

from jaxrlhf import cli
from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.config import load_config
from jaxrlhf.train.loop import NonFiniteError
from jaxrlhf.train.runs import run_rm

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rm_tiny.yaml"
# A learning rate of 1e30 after one step of warm-up (lr 0 at step 1): step 2 moves the adapter
# by ~5e29 per weight, so the norm of the updated params overflows float32 to inf.
EXPLODE = (
    "optim.learning_rate=1e30",
    "optim.warmup_steps=2",
    "optim.max_grad_norm=null",
    "optim.schedule=constant",
)


def cfg_for(run_dir, *overrides: str) -> RMConfig:
    return load_config(
        RMConfig,
        CONFIG,
        [
            f"run.run_dir={run_dir}",
            "mesh.data=1",
            "run.progress=false",
            "run.save_every=1",
            "run.eval_every=1000",
            "data.eval_fraction=0",
            "batch_size=8",
            *overrides,
        ],
    )


def rows(n=32):
    return case_preference_rows(n, seed=3)


def steps_saved(run_dir) -> list[int]:
    ckpt = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def train_records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step \d+: .*(loss|grad_norm|param_norm)") as err:
        run_rm(cfg_for(tmp_path, "max_steps=4", *EXPLODE), source=rows())
    assert str(err.value).startswith("step 2: ")
    assert steps_saved(tmp_path) == [1]  # step 2 was never saved: step 1 stays the newest
    assert "run.on_nonfinite=skip_step" in str(err.value)
    assert not (tmp_path / "adapter").exists()  # nothing exported from a broken run


def test_nonfinite_stop_is_one_line_and_exit_2(tmp_path, capsys):
    rc = cli.main(
        ["rm", "--config", str(CONFIG), f"run.run_dir={tmp_path}", "mesh.data=1",
         "run.progress=false", "data.eval_fraction=0", "batch_size=8", "max_steps=3",
         "data.train=" + str(write_rows(tmp_path / "pairs.jsonl")), *EXPLODE]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "is not finite" in err[0] and "Traceback" not in err[0]


def write_rows(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return path


def test_skip_step_drops_nonfinite_updates_and_counts_them(tmp_path):
    out = run_rm(
        cfg_for(tmp_path, "max_steps=3", "run.on_nonfinite=skip_step", *EXPLODE), source=rows()
    )
    records = train_records(tmp_path)
    assert records[-1]["nonfinite_skipped"] >= 1
    # The skipped updates were never applied: the adapter stays finite.
    leaves = jax.tree.leaves(jax.device_get(out["trainable"]))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def _overwrite_arrays(step_dir: Path) -> int:
    """Overwrite every array file of a checkpoint with garbage of the same size."""
    n = 0
    for f in step_dir.rglob("*"):
        if (
            f.is_file()
            and "meta" not in f.parts
            and f.suffix not in (".json",)
            and f.stat().st_size
        ):
            f.write_bytes(b"\x00garbage" * (f.stat().st_size // 8 + 1))
            n += 1
    return n


def test_corrupt_newest_checkpoint_resumes_from_the_previous_intact_one(tmp_path, capsys):
    full = run_rm(cfg_for(tmp_path / "full", "max_steps=4"), source=rows())
    part = tmp_path / "part"
    run_rm(cfg_for(part, "max_steps=3", "run.keep_checkpoints=3"), source=rows())
    assert steps_saved(part) == [1, 2, 3]
    assert _overwrite_arrays(part / "checkpoints" / "3") > 0
    capsys.readouterr()
    resumed = run_rm(
        cfg_for(part, "max_steps=4", "run.keep_checkpoints=3"), source=rows(), resume=True
    )
    out = capsys.readouterr().out
    assert "checkpoint 3 does not restore" in out and "resumed from step 2" in out
    assert (part / "checkpoints_failed" / "3").is_dir()  # set aside, not deleted
    # Steps 3 and 4 were re-run from step 2: the result is the uninterrupted run's, exactly.
    for a, b in zip(
        jax.tree.leaves(jax.device_get(full["trainable"])),
        jax.tree.leaves(jax.device_get(resumed["trainable"])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_resume_from_a_step(tmp_path, capsys):
    run_rm(cfg_for(tmp_path, "max_steps=3", "run.keep_checkpoints=3"), source=rows())
    capsys.readouterr()
    full = run_rm(cfg_for(tmp_path / "full", "max_steps=3"), source=rows())
    again = run_rm(
        cfg_for(tmp_path, "max_steps=3", "run.resume_from=1"), source=rows(), resume=True
    )
    out = capsys.readouterr().out
    assert "resumed from step 1" in out and "checkpoint 3 is newer than run.resume_from" in out
    assert steps_saved(tmp_path) == [2, 3]  # steps 2 and 3 written again, from step 1
    for a, b in zip(
        jax.tree.leaves(jax.device_get(full["trainable"])),
        jax.tree.leaves(jax.device_get(again["trainable"])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_adapter_shape_is_refused(tmp_path):
    run_rm(cfg_for(tmp_path, "max_steps=1"), source=rows())
    with pytest.raises(
        ValueError, match=r"another configuration.*lora\.r: checkpoint 8, this run 4"
    ):
        run_rm(
            cfg_for(tmp_path, "max_steps=2", "lora.r=4", "lora.alpha=8"), source=rows(), resume=True
        )


def test_isfinite_check_names_the_metric():
    from jaxrlhf.train.loop import nonfinite_metrics

    assert nonfinite_metrics({"loss": math.nan, "grad_norm": 1.0, "x": math.inf}) == ["loss", "x"]
