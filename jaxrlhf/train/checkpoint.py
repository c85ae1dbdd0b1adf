"""Orbax checkpoints of the trainable state: save every N steps, keep the last K, resume exactly.

Only what changes is saved: the trainable tree (LoRA + heads, or all params in full
fine-tuning), optimizer state, step, rng, data position and any algorithm state (the KL
controller). The frozen base is referenced by its path in `meta`, never copied. Saving and
restoring are collective over processes; a checkpoint restores onto any mesh, because the
target's shardings are given at restore time.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with a pytree `state` and JSON `meta`."""

    def __init__(self, directory: str | Path, *, keep: int = 2, save_every: int = 1):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.save_every = save_every

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
            ),
        )
        self._manager.wait_until_finished()
        return True

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restore into the structure, dtypes and shardings of `target` (arrays or
        `jax.ShapeDtypeStruct`s with `.sharding`), from `step` or the latest."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        abstract = jax.tree.map(_abstract, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta or {}), step

    def read_meta(self, step: int) -> dict | None:
        """The JSON part of checkpoint `step` alone (None if it cannot be read)."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception:  # an unreadable checkpoint: restore_newest_good reports it
            return None
        return dict(restored.meta or {})

    def restore_newest_good(
        self, target: Any, *, at_most: int | None = None
    ) -> tuple[Any, dict, int, list[tuple[int, str]]]:
        """Restore the newest checkpoint (at most step `at_most`) that restores cleanly;
        returns (state, meta, step, [(step, reason)] of the newer ones that failed). A
        checkpoint that fails (truncated or overwritten array files, another state layout)
        is moved aside to `<directory>_failed/<step>`, so the run's next save of that step
        is written afresh. If none restores, a ValueError lists every failure."""
        steps = sorted(
            (s for s in self.all_steps() if at_most is None or s <= at_most), reverse=True
        )
        if not steps:
            where = f" at or before step {at_most}" if at_most is not None else ""
            raise FileNotFoundError(f"no checkpoint{where} to resume from in {self.directory}")
        failed: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, meta, _ = self.restore(target, step)
                return state, meta, step, failed
            except Exception as err:  # orbax/tensorstore raise many kinds; all mean "unusable"
                failed.append((step, _first_line(err)))
        raise ValueError(
            f"no checkpoint in {self.directory} restores into this run's state: "
            + "; ".join(f"step {s}: {why}" for s, why in failed)
            + ". Start a new run.run_dir (or delete the checkpoints) to train from scratch."
        )

    def set_aside(self, step: int) -> Path:
        """Move checkpoint `step` out of the directory (kept for inspection, never resumed)."""
        target = self.directory.parent / f"{self.directory.name}_failed" / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            shutil.move(str(self.directory / str(step)), str(target))
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.close()


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return x
