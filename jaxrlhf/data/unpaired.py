"""Unpaired feedback (KTO) as preference-shaped pairs, so the pair driver runs it unchanged.

A KTO row is `{"prompt", "completion", "label": bool}`; paired rows (`prompt`, `chosen`,
`rejected`) are unpaired first as TRL's `unpair_preference_dataset` does. KTO's reference
point z0 needs, for each row, a *mismatched* completion under its prompt. As TRL 1.16's
KTOTrainer builds it: after tokenization (and after the train/eval split, per split), the
completions are rotated by one within each block of `block` consecutive rows,

    (x_1, y_n), (x_2, y_1), …, (x_n, y_{n−1})      (`losses.kto_kl_pair_indices`)

fixed once, and each training micro-batch is one such block (the driver's block order,
`PreferenceAlgorithm.block_batches`), so the KL completions of a batch are the batch's own
completions paired with other prompts — TRL's `add_kl_completion_ids` with
`per_device_train_batch_size` = `block` and its required sequential sampler.

So row i becomes the pair: prompt_i, chosen = completion_i, rejected = completion_{kl(i)}
(`kto_rows` puts completion_i in both; `with_kl_completions` rotates the tokenized
rejected column), margin = label_i (1.0 desirable, 0.0 undesirable). The packed pair batch
then computes log p(y_i|x_i) and log p(y_kl(i)|x_i) in one forward with the prompt once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrlhf.data.tokenize import PreferenceData
from jaxrlhf.losses import kto_kl_pair_indices, unpair

UNPAIRED_COLUMNS = ("completion", "label")


def unpaired_rows(rows: Any) -> list[dict]:
    """`{"prompt", "completion", "label"}` rows: as given, or unpaired from
    `prompt`/`chosen`/`rejected` pairs (TRL's order: per block of 1000, chosen then
    rejected). A row without a boolean `label` is refused, naming the row."""
    columns = set(rows.column_names) if hasattr(rows, "column_names") else set(rows[0])
    if {"chosen", "rejected"} <= columns and "completion" not in columns:
        if "prompt" not in columns:
            raise ValueError("paired KTO rows need a 'prompt' column to unpair them")
        return unpair(
            [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]
        )
    missing = [c for c in ("prompt", *UNPAIRED_COLUMNS) if c not in columns]
    if missing:
        raise ValueError(
            f"KTO rows need prompt, completion and a boolean label (or prompt, chosen, "
            f"rejected to unpair); missing column(s) {missing} (columns: {sorted(columns)})"
        )
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row["label"], bool):
            raise ValueError(
                f"row {i + 1}: field 'label' must be true or false (desirable or not), "
                f"got {row['label']!r}"
            )
        out.append(
            {"prompt": row["prompt"], "completion": row["completion"], "label": row["label"]}
        )
    return out


def kto_rows(rows: Any) -> list[dict]:
    """Each unpaired row as a pair row: its completion as "chosen" and, until
    `with_kl_completions` rotates it, also as "rejected"; its label as `margin`."""
    rows = unpaired_rows(rows)
    if len(rows) < 2:
        raise ValueError(f"KTO needs at least 2 rows (a KL pair is another row), got {len(rows)}")
    return [
        {
            "prompt": row["prompt"],
            "chosen": row["completion"],
            "rejected": row["completion"],
            "margin": 1.0 if row["label"] else 0.0,
        }
        for row in rows
    ]


def with_kl_completions(data: PreferenceData, *, block: int, max_length: int) -> PreferenceData:
    """`data` (tokenized `kto_rows`) with each row's "rejected" completion replaced by its
    KL completion: the completion of row kl(i) (`losses.kto_kl_pair_indices(n, block)`),
    cut to fit after row i's prompt (prompt + completion <= `max_length`, keeping the
    start, as TRL's collator truncates the KL sequence)."""
    kl = kto_kl_pair_indices(len(data), block)
    rejected = tuple(
        data.chosen_ids[int(j)][: max_length - len(p)]
        for p, j in zip(data.prompt_ids, kl, strict=True)
    )
    return dataclasses.replace(data, rejected_ids=rejected)
