"""One process of the multi-process test (tests/test_multiprocess.py): a short `run_rm`.

    python tests/mp_worker.py OUT_DIR [dotted.key=value ...]

The environment names the run (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
XLA_FLAGS with the simulated device count); `run_rm` joins it through
`maybe_init_distributed`. The overrides apply to configs/rm_tiny.yaml. Writes
OUT_DIR/adapter_<process>.npz (the final adapter, gathered to every process) and
OUT_DIR/status_<process>.json (process index/count, devices, whether its metrics logger
was enabled).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("NPROC", "16")  # XLA's CPU thread pool; see tests/conftest.py
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

import numpy as np  # noqa: E402

from jaxrlhf.algorithms.reward_model import RMConfig  # noqa
from jaxrlhf.config import load_config  # noqa: E402
from jaxrlhf.train import metrics as metrics_module  # noqa: E402
from jaxrlhf.train import runs as rm_command  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rm_tiny.yaml"


def flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def main(out_dir: str, *overrides: str) -> None:
    loggers = []
    original_init = metrics_module.MetricsLogger.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        loggers.append(self.enabled)

    metrics_module.MetricsLogger.__init__ = recording_init
    cfg = load_config(RMConfig, CONFIG, list(overrides))
    summary = rm_command.run_rm(cfg)
    proc = jax.process_index()
    # The adapter is a global array; gather it so every process holds all of it (a
    # collective: every process calls it).
    adapter = multihost_utils.process_allgather(summary["trainable"], tiled=True)
    out = Path(out_dir)
    np.savez(out / f"adapter_{proc}.npz", **flat(adapter))
    status = {
        "process_index": proc,
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
        "loggers_enabled": loggers,
        "eval": summary["eval"],
    }
    (out / f"status_{proc}.json").write_text(json.dumps(status))
    multihost_utils.sync_global_devices("mp_worker done")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    except BaseException:
        # Exit now: a normal exit runs jax.distributed's shutdown barrier, which waits
        # minutes for the other process (stuck in a collective) before giving up.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
