"""A real two-process run on localhost: `run_rm` in two OS processes joined through
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (jax.distributed, with the
gloo CPU collectives that jax uses by default), each with 2 simulated CPU devices, gives the
same adapter as one process with 4 devices and the same global batch; only process 0 writes
logs, metrics and the export.

Two meshes: data=-1 (data parallel over both processes; params replicated) and fsdp=-1
(params split across the processes, so nothing is process-local: the export must gather).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.tasks import case_preference_rows

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mp_worker.py"
TIMEOUT_S = 300
STEPS = 4
RTOL, ATOL = 1e-4, 1e-5
# eps = 1e-5: Adam's first steps are lr·g/(|g| + eps), which magnifies the reassociation noise
# of gradient entries at the eps scale (see ADAM_EPS in test_sharding.py). Measured on the fsdp
# case: the largest one- vs two-process difference in down_proj's lora_A is 2.1e-6 at
# eps = 1e-6 and 1.6e-7 at eps = 1e-5 (noise ∝ 1/eps: conditioning, not a sharding error);
# at 1e-6 one o_proj entry of 1,024 sat at 1.08e-5, on the tolerance's edge.
# One length bucket: one train and one eval program per process.
COMMON = (
    "batch_size=8",
    f"max_steps={STEPS}",
    "optim.eps=1e-5",
    "data.max_length=48",
    "data.length_buckets=[48]",
    "run.progress=false",
    "run.tensorboard=false",
    "run.log_every=1",
)
MESHES = {"data": ("mesh.data=-1",), "fsdp": ("mesh.data=1", "mesh.fsdp=-1")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path, overrides: list[str]) -> list[str]:
    """Run the worker as processes 0 and 1; the stdout of each. A failure or a hang (a
    process that never joins a collective) fails the test with both processes' logs."""
    port = free_port()
    procs, logs = [], []
    for pid in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            JAX_PLATFORMS="cpu",
            NPROC="16",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
        )
        # Files, not pipes: a child blocked on a full pipe would look like a hang.
        out, err = out_dir / f"stdout_{pid}.txt", out_dir / f"stderr_{pid}.txt"
        logs.append((out, err))
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(out_dir), *overrides],
                    cwd=ROOT,
                    env=env,
                    stdout=fo,
                    stderr=fe,
                )
            )
    deadline = time.monotonic() + TIMEOUT_S
    # When one process dies the other waits in a collective until jax's own barrier times
    # out (minutes): stop it at once.
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.5)
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        timed_out = time.monotonic() > deadline
        pytest.fail(
            (f"timed out after {TIMEOUT_S}s; " if timed_out else "")
            + f"two-process run_rm exit codes {codes}:\n"
            + "\n".join(
                f"--- process {i} stdout:\n{o.read_text()[-2000:]}\n"
                f"--- process {i} stderr:\n{e.read_text()[-6000:]}"
                for i, (o, e) in enumerate(logs)
            )
        )
    return [o.read_text() for o, _ in logs]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mp_data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in case_preference_rows(64, seed=1)))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_file) -> dict:
    """The reference: one process, 4 of the 8 simulated devices (data=4), the same global
    batch of 8. (Meshes agree with each other: see test_sharding.py.)"""
    from jaxrlhf.algorithms.reward_model import RMConfig
    from jaxrlhf.config import load_config
    from jaxrlhf.train.runs import run_rm

    run_dir = tmp_path_factory.mktemp("one_process")
    summary = run_rm(
        load_config(
            RMConfig,
            ROOT / "configs" / "rm_tiny.yaml",
            [f"run.run_dir={run_dir}", f"data.train={data_file}", *COMMON, "mesh.data=4"],
        )
    )
    adapter = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(summary["trainable"]))
    }
    return {"adapter": adapter, "eval": summary["eval"]}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_processes_match_one_process(mesh, tmp_path, data_file, one_process):
    run_dir = tmp_path / "run"
    out0, out1 = launch(
        tmp_path, [f"run.run_dir={run_dir}", f"data.train={data_file}", *COMMON, *MESHES[mesh]]
    )

    status = [json.loads((tmp_path / f"status_{i}.json").read_text()) for i in (0, 1)]
    for i, s in enumerate(status):
        assert (s["process_index"], s["process_count"]) == (i, 2)
        assert (s["local_devices"], s["devices"]) == (2, 4)
    # Only process 0 logs: its MetricsLogger is the only enabled one, the run has one
    # metrics.jsonl with each step once (a second writer would append its own records),
    # and process 1 prints nothing of the run.
    assert [s["loggers_enabled"] for s in status] == [[True], [False]]
    assert sorted(run_dir.rglob("metrics.jsonl")) == [run_dir / "metrics.jsonl"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert "mesh: " in out0 and "mesh: " not in out1, out1
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / str(STEPS)).is_dir()  # Orbax: a collective save

    adapters = [np.load(tmp_path / f"adapter_{i}.npz") for i in (0, 1)]
    assert sorted(adapters[0].files) == sorted(one_process["adapter"])
    for name, want in one_process["adapter"].items():
        np.testing.assert_array_equal(adapters[0][name], adapters[1][name], err_msg=name)
        np.testing.assert_allclose(adapters[0][name], want, rtol=RTOL, atol=ATOL, err_msg=name)
    for key, want in one_process["eval"].items():
        np.testing.assert_allclose(status[0]["eval"][key], want, rtol=RTOL, atol=ATOL, err_msg=key)
