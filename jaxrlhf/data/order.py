"""Batch order: a pure function of (n, batch_size, seed, position), so a checkpoint stores
only `position` and a resumed run sees exactly the batches of an uninterrupted one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# numpy's SeedSequence ignores trailing zeros ((s, 0) == (s,)), so each derived stream ends
# in its own non-zero tag at a fixed position; `epoch_order` keeps the plain (seed, epoch).
_TAG_WINDOW = 1
_TAG_SPLIT = 2
_TAG_BLOCKS = 3


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) for `epoch`: `np.random.default_rng((seed, epoch))`."""
    if n < 1 or seed < 0 or epoch < 0:
        raise ValueError(
            f"need n >= 1, seed >= 0, epoch >= 0; got n={n}, seed={seed}, epoch={epoch}"
        )
    return np.random.default_rng((seed, epoch)).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the incomplete last batch is dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < batch_size:
        raise ValueError(f"{n} examples is fewer than one batch of batch_size {batch_size}")
    return n // batch_size


def batch_indices(
    n: int,
    *,
    batch_size: int,
    seed: int,
    position: int,
    lengths: Sequence[int] | np.ndarray | None = None,
    group_factor: int = 8,
) -> tuple[np.ndarray, int]:
    """The batch at `position` (examples consumed so far) and the next position.

    Epoch e = position // (steps_per_epoch(n, batch_size) * batch_size) uses
    `epoch_order(n, seed=seed, epoch=e)`; the last incomplete batch of every epoch is
    dropped. `position` must be a multiple of `batch_size`. A checkpoint stores `position`;
    resuming from it reproduces exactly the batches of an uninterrupted run.

    Length grouping (on when `lengths` [n] is given): the epoch's order is cut into windows
    of `group_factor * batch_size` examples; each window is sorted by length (stable) and
    cut into batches, and the window's batches are shuffled by a generator seeded with
    (seed, epoch, window). Batches then hold similar lengths (less padding) while the order
    stays a pure function of (n, batch_size, seed, position, lengths, group_factor).
    """
    per_epoch = steps_per_epoch(n, batch_size) * batch_size
    if position < 0 or position % batch_size:
        raise ValueError(
            f"position must be a non-negative multiple of batch_size {batch_size}, got {position}"
        )
    epoch, offset = divmod(position, per_epoch)
    order = epoch_order(n, seed=seed, epoch=epoch)
    if lengths is None:
        return order[offset : offset + batch_size], position + batch_size
    if group_factor < 1:
        raise ValueError(f"group_factor must be >= 1, got {group_factor}")
    lengths = np.asarray(lengths)
    if lengths.shape != (n,):
        raise ValueError(f"lengths must have shape ({n},), got {lengths.shape}")
    window = group_factor * batch_size
    w, within = divmod(offset, window)
    members = order[w * window : min((w + 1) * window, per_epoch)]
    members = members[np.argsort(lengths[members], kind="stable")]
    batches = members.reshape(-1, batch_size)
    shuffle = np.random.default_rng((seed, epoch, w, _TAG_WINDOW)).permutation(len(batches))
    return batches[shuffle[within // batch_size]], position + batch_size


def block_batch_indices(
    n: int, *, batch_size: int, seed: int, position: int
) -> tuple[np.ndarray, int]:
    """The batch at `position` when batches are fixed blocks of consecutive examples: block
    b is range(b·batch_size, (b+1)·batch_size), and epoch e visits the n // batch_size
    blocks in the order `np.random.default_rng((seed, e, 3)).permutation` (the incomplete
    last block is dropped). For data whose rows belong together in a batch (KTO's KL
    completions are the batch's own completions, rotated). Returns (indices, next
    position); a pure function of its arguments, like `batch_indices`."""
    blocks = steps_per_epoch(n, batch_size)
    if position < 0 or position % batch_size:
        raise ValueError(
            f"position must be a non-negative multiple of batch_size {batch_size}, got {position}"
        )
    epoch, offset = divmod(position // batch_size, blocks)
    order = np.random.default_rng((seed, epoch, _TAG_BLOCKS)).permutation(blocks)
    start = int(order[offset]) * batch_size
    return np.arange(start, start + batch_size), position + batch_size


def train_eval_split(
    n: int, *, eval_fraction: float | None = None, eval_size: int | None = None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train_idx, eval_idx) over range(n); give exactly one of eval_fraction, eval_size.

    eval_fraction rounds to the nearest count. The split depends only on (n, size, seed).
    """
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction and eval_size")
    if eval_fraction is not None:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        eval_size = round(n * eval_fraction)
    if not 1 <= eval_size < n:
        raise ValueError(f"eval set of {eval_size} rows must be in [1, {n - 1}] for n={n} rows")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    perm = np.random.default_rng((seed, 0, 0, _TAG_SPLIT)).permutation(n)
    return np.sort(perm[eval_size:]), np.sort(perm[:eval_size])


def process_slice(indices: Any, *, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous 1/process_count of a global batch of indices."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    idx = np.asarray(indices)
    if len(idx) % process_count:
        raise ValueError(
            f"global batch of {len(idx)} does not divide over {process_count} processes; "
            "make batch_size a multiple of the process count"
        )
    k = len(idx) // process_count
    return idx[process_index * k : (process_index + 1) * k]
