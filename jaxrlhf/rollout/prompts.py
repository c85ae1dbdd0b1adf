"""Prompt batches on the mesh for a rollout (GRPO's groups: each prompt repeated)."""

from __future__ import annotations

import jax
import numpy as np

from jaxrlhf.data import PromptData, bucket_length, pad_prompt_batch, process_slice
from jaxrlhf.sharding import shard_batch


def prompt_batch(
    prompts: PromptData,
    idx: np.ndarray,
    *,
    pad_id: int,
    buckets: tuple[int, ...],
    mesh,
    repeat: int = 1,
) -> tuple[dict, list, dict]:
    """(device batch, prompt values, extra columns) for prompts `idx`, each repeated
    `repeat` times consecutively (GRPO's groups)."""
    idx = np.repeat(np.asarray(idx), repeat)
    # Each process feeds its slice of the global batch; texts are kept for the whole batch,
    # because completions are all-gathered for scoring (`sharding.host_view`).
    local = process_slice(idx, process_index=jax.process_index(), process_count=jax.process_count())
    bucket = bucket_length(max(len(prompts.prompt_ids[i]) for i in idx), buckets)
    batch = pad_prompt_batch(prompts, local, pad_id=pad_id, buckets=(bucket,))
    device = shard_batch(
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, mesh
    )
    values = [prompts.prompts[i] for i in idx]
    columns = {k: [v[i] for i in idx] for k, v in prompts.extras.items()}
    return device, values, columns
