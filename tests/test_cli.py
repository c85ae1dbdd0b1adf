"""`jaxrlhf rm` and `jaxrlhf plot` through `jaxrlhf.cli.main`: exit codes, files, messages."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest
from helpers.tasks import case_preference_rows

from jaxrlhf import cli
from jaxrlhf.train.metrics import read_metrics

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "rm_tiny.yaml")
# The shapes of tests/test_reward_model.py, so the two modules share compiled programs.
SMALL = [
    "mesh.data=1",
    "data.max_length=48",
    "data.length_buckets=[48]",
    "batch_size=8",
    "eval_batch_size=32",
    "run.progress=false",
    "run.tensorboard=false",
]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache (as in tests/test_reward_model.py), restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(
        "jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "xla_cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture
def train_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in case_preference_rows(40)))
    return path


def test_rm_trains_exports_and_resumes(tmp_path, train_file, capsys):
    run_dir = tmp_path / "run"
    args = ["rm", "--config", CONFIG, f"data.train={train_file}", f"run.run_dir={run_dir}", *SMALL]
    assert cli.main([*args, "max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "data: 32 train pairs, 8 eval pairs" in out
    assert f"exported adapter to {run_dir / 'adapter'}" in out

    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 3]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (run_dir / "adapter" / name).is_file(), name
    assert (run_dir / "config.yaml").is_file()

    # --resume continues from the last checkpoint to the new max_steps.
    assert cli.main([*args, "max_steps=5", "--resume"]) == 0
    assert "resumed from step 3 (data position 24)" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == [1, 2, 3, 4, 5]

    assert cli.main(["plot", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run_dir / "plots" / "eval.png"), str(run_dir / "plots" / "train.png")]


def test_unknown_config_key_exits_2_with_the_valid_keys(tmp_path, capsys):
    code = cli.main(["rm", "--config", CONFIG, "optim.lerning_rate=0.1", f"run.run_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxrlhf rm: error: Unknown config key(s) optim.lerning_rate")
    assert "valid keys of optim:" in err and "learning_rate" in err
    assert not (tmp_path / "config.yaml").exists()  # nothing ran

    assert cli.main(["rm", "--config", CONFIG, "epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "valid keys:" in err and "num_epochs" in err and "batch_size" in err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["rm", "--config", "no/such.yaml"], "config file not found"),
        (["rm", "--config", CONFIG, "max_steps"], "must look like dotted.key=value"),
        (["rm", "--config", CONFIG, "optim.schedule=foo"], "choose from cosine, linear, constant"),
    ],
)
def test_config_errors_exit_2(argv, match, capsys):
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err


def test_missing_data_file_exits_2(tmp_path, capsys):
    code = cli.main(
        [
            "rm",
            "--config",
            CONFIG,
            f"data.train={tmp_path / 'nope.jsonl'}",
            f"run.run_dir={tmp_path / 'run'}",
            *SMALL,
        ]
    )
    assert code == 2
    assert "data file not found" in capsys.readouterr().err


def test_plot_without_metrics_exits_2(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_the_cli_keeps_reductions_off_ynnpack_unless_the_user_chose():
    # Checked on a compiled log-sum-exp: with the CLI's flag the reduction is XLA's own loop.
    import subprocess
    import sys

    assert cli.with_xla_cpu_flags("") == cli.XLA_CPU_FLAGS
    assert cli.with_xla_cpu_flags("--xla_foo=1") == f"--xla_foo=1 {cli.XLA_CPU_FLAGS}"
    own = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    assert cli.with_xla_cpu_flags(own) == own
    probe = (
        "import jax, jax.numpy as jnp;"
        "f = jax.jit(lambda x: jax.nn.logsumexp(x, axis=-1));"
        "print(f.lower(jnp.ones((64, 4096))).compile().as_text().count('__ynn_fusion'))"
    )

    def ynn_fusions(flags: str) -> int:
        env = {"PATH": "/usr/bin:/bin", "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    assert ynn_fusions(cli.with_xla_cpu_flags("")) == 0
    assert ynn_fusions("") > 0  # the flag is what keeps them off in this jaxlib
