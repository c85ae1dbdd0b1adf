"""Padded numpy batches of pairs and prompts (one bucket length per batch; short batches
filled with dummy rows whose mask is 0)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from jaxrlhf.data.buckets import bucket_length
from jaxrlhf.data.tokenize import PreferenceData, PromptData


def _check_indices(indices: Any, n: int, batch_size: int | None) -> tuple[np.ndarray, int]:
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty 1-D array of ints, got {indices!r}")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must be in [0, {n}), got min {idx.min()} max {idx.max()}")
    b = len(idx) if batch_size is None else batch_size
    if b < len(idx):
        raise ValueError(f"{len(idx)} indices do not fit in batch_size {b}")
    # Dummy rows repeat the first real row (see the module docstring).
    return np.concatenate([idx, np.full(b - len(idx), idx[0], idx.dtype)]), len(idx)


def _place(
    rows: list[np.ndarray], length: int, pad_id: int, side: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [B, L], attention mask [B, L], start column of each row) with rows padded to L."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    starts = np.array([0 if side == "right" else length - len(r) for r in rows], np.int64)
    for b, (r, start) in enumerate(zip(rows, starts, strict=True)):
        ids[b, start : start + len(r)] = r
        mask[b, start : start + len(r)] = 1
    return ids, mask, starts


def pad_preference_batch(
    data: PreferenceData,
    indices: Any,
    *,
    pad_id: int,
    buckets: Sequence[int],
    padding_side: Literal["right", "left"] = "right",
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Pairs `indices` of `data` as prompt+response sequences padded to one bucket length L.

    Returns (B = batch_size or len(indices); L = bucket of the longest sequence, chosen or
    rejected):
      chosen_input_ids, chosen_attention_mask, chosen_response_mask       int32 [B, L]
      rejected_input_ids, rejected_attention_mask, rejected_response_mask int32 [B, L]
      margin          float32 [B]  zeros without a margin column and on dummy rows
      pair_mask       int32 [B]    1 on real pairs, 0 on dummy rows
      prompt_lengths  int32 [B]    prompt tokens per pair (shared by chosen and rejected)
      row_index       int64 [B]    source row, -1 on dummy rows
    A response mask is 1 exactly on that response's tokens (EOS included), 0 on prompt, pad
    and dummy rows.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    idx, n_real = _check_indices(indices, len(data), batch_size)
    prompts = [data.prompt_ids[i] for i in idx]
    prompt_lengths = np.array([len(p) for p in prompts], np.int64)
    pair_mask = (np.arange(len(idx)) < n_real).astype(np.int32)
    sequences = {
        name: [np.concatenate([p, ids[i]]) for p, i in zip(prompts, idx, strict=True)]
        for name, ids in (("chosen", data.chosen_ids), ("rejected", data.rejected_ids))
    }
    length = bucket_length(max(len(s) for seqs in sequences.values() for s in seqs), buckets)
    cols = np.arange(length)[None, :]
    batch: dict[str, np.ndarray] = {}
    for name, seqs in sequences.items():
        ids, mask, starts = _place(seqs, length, pad_id, padding_side)
        response_start = (starts + prompt_lengths)[:, None]
        response_end = (starts + np.array([len(s) for s in seqs]))[:, None]
        in_response = (cols >= response_start) & (cols < response_end)
        batch[f"{name}_input_ids"] = ids
        batch[f"{name}_attention_mask"] = mask
        batch[f"{name}_response_mask"] = (in_response * pair_mask[:, None]).astype(np.int32)
    margin = np.zeros(len(idx), np.float32)
    if data.margin is not None:
        margin[:n_real] = data.margin[idx[:n_real]]
    batch["margin"] = margin
    batch["pair_mask"] = pair_mask
    batch["prompt_lengths"] = prompt_lengths.astype(np.int32)
    batch["row_index"] = np.where(pair_mask == 1, data.row_index[idx], -1).astype(np.int64)
    return batch


def pad_prompt_batch(
    data: PromptData,
    indices: Any,
    *,
    pad_id: int,
    buckets: Sequence[int],
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Prompts `indices` of `data`, LEFT-padded to one bucket length P for generation.

    Returns input_ids, attention_mask int32 [B, P]; row_mask int32 [B] (0 on dummy rows);
    prompt_lengths int32 [B]; row_index int64 [B] (-1 on dummy rows). Texts and extra
    columns for rewards are `data.prompts[i]`, `data.extras[col][i]` for i in `indices`.
    """
    idx, n_real = _check_indices(indices, len(data), batch_size)
    prompts = [data.prompt_ids[i] for i in idx]
    length = bucket_length(max(len(p) for p in prompts), buckets)
    ids, mask, _ = _place(prompts, length, pad_id, "left")
    row_mask = (np.arange(len(idx)) < n_real).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "row_mask": row_mask,
        "prompt_lengths": np.array([len(p) for p in prompts], np.int32),
        "row_index": np.where(row_mask == 1, data.row_index[idx], -1).astype(np.int64),
    }


def padding_fraction(batch: Mapping[str, np.ndarray]) -> float:
    """Share of the batch's token slots that are not real tokens of real rows."""
    if "chosen_attention_mask" in batch:
        masks = [batch["chosen_attention_mask"], batch["rejected_attention_mask"]]
        rows = batch.get("pair_mask")
    elif "attention_mask" in batch:
        masks = [batch["attention_mask"]]
        rows = batch.get("row_mask")
    else:
        raise ValueError(f"batch has no attention mask (keys: {sorted(batch)})")
    total = sum(m.size for m in masks)
    real = sum(float((m * (1 if rows is None else rows[:, None])).sum()) for m in masks)
    return 1.0 - real / total


PAIR_KEYS = (
    "chosen_input_ids",
    "chosen_attention_mask",
    "chosen_response_mask",
    "rejected_input_ids",
    "rejected_attention_mask",
    "rejected_response_mask",
)
"""The unshared form of a pair batch (chosen and rejected as two rows)."""
PACKED_KEYS = (
    "packed_input_ids",
    "packed_attention_mask",
    "packed_positions",
    "packed_segment_ids",
    "packed_response_prev",
    "packed_response_ids",
    "packed_response_chosen",
    "packed_response_rejected",
    "chosen_last",
    "rejected_last",
)
"""The packed form (prompt once; see `jaxrlhf.data.packing`)."""


def pair_batch(
    prefs: PreferenceData,
    idx: np.ndarray,
    *,
    pad_id: int,
    buckets: tuple[int, ...],
    batch_size: int,
    share_prompt: bool,
    per_pair: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The host arrays a preference step reads for pairs `idx`: `PACKED_KEYS` (prompt once)
    or `PAIR_KEYS`, plus `margin` and `pair_mask` [B], as int32/float32 numpy.

    `per_pair`: arrays [N] over all pairs of `prefs` (e.g. precomputed reference log-probs),
    attached by pair index; dummy rows (pair_mask 0) repeat the first pair, as
    `pad_preference_batch` does."""
    from jaxrlhf.data.buckets import packed_buckets
    from jaxrlhf.data.packing import pack_pairs

    batch = pad_preference_batch(prefs, idx, pad_id=pad_id, buckets=buckets, batch_size=batch_size)
    if share_prompt:
        packed = pack_pairs(batch, pad_id=pad_id, buckets=packed_buckets(buckets))
        out = {k: packed[k.removeprefix("packed_")] for k in PACKED_KEYS}
    else:
        out = {k: batch[k] for k in PAIR_KEYS}
    out["margin"] = batch["margin"]
    out["pair_mask"] = batch["pair_mask"]
    if per_pair:
        full = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])]).astype(np.int64)
        out.update({k: np.asarray(v)[full] for k, v in per_pair.items()})
    return {k: as_step_dtype(v) for k, v in out.items()}


def as_step_dtype(x: Any) -> np.ndarray:
    """int32/float32 numpy: no int64 or float64 reaches a device."""
    x = np.asarray(x)
    if x.dtype == np.int64:
        return x.astype(np.int32)
    return x.astype(np.float32) if x.dtype == np.float64 else x


def stack_batches(batches: list[dict[str, np.ndarray]], *, pad_id: int) -> dict[str, np.ndarray]:
    """K batches of the same keys as one [K, ...] batch (one per stacked adapter, each from
    its own data order). Each may have picked another length bucket: shorter ones are padded
    on the right to the longest (token ids with `pad_id`, everything else with 0: masked)."""
    out = {}
    for key in batches[0]:
        arrays = [b[key] for b in batches]
        if arrays[0].ndim >= 2:
            width = max(a.shape[1] for a in arrays)
            fill = pad_id if key.endswith("input_ids") or key.endswith("response_ids") else 0
            arrays = [
                np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                       constant_values=fill)
                for a in arrays
            ]  # fmt: skip
        out[key] = np.stack(arrays)
    return out
