"""Metrics out: JSONL (one record per log step), TensorBoard, a progress bar, PNG plots.

Only process 0 writes; other processes get a logger that does nothing, so multi-host runs
produce one set of files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np


def to_python(metrics: dict) -> dict[str, float]:
    """Device scalars -> plain floats (one transfer for the whole dict)."""
    host = jax.device_get(metrics)
    return {k: float(np.asarray(v)) for k, v in host.items()}


class MetricsLogger:
    def __init__(
        self, run_dir: str | Path, *, tensorboard: bool = True, enabled: bool | None = None
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._file = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], *, split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, *, initial: int = 0, desc: str = "", enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        dynamic_ncols=True,
        disable=not enabled or jax.process_index() != 0,
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(
    run_dir: str | Path, *, keys: list[str] | None = None, out: str | Path | None = None
) -> list[Path]:
    """One PNG per split (train/eval/...) with a panel per metric over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out_dir = Path(out) if out else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split in sorted({r.get("split", "train") for r in records}):
        rows = [r for r in records if r.get("split", "train") == split]
        names = keys or sorted(
            {
                k
                for r in rows
                for k in r
                if k not in ("step", "split", "time") and isinstance(r[k], int | float)
            }
        )
        names = [n for n in names if any(n in r for r in rows)]
        if not names:
            continue
        cols = min(3, len(names))
        nrows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            pts = [(r["step"], r[name]) for r in rows if name in r]
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.suptitle(f"{Path(run_dir).name} — {split}")
        fig.tight_layout()
        path = out_dir / f"{split}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
