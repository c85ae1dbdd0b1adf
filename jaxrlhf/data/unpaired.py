"""Unpaired feedback (KTO) as preference-shaped pairs, so the pair driver runs it unchanged.

A KTO row is `{"prompt", "completion", "label": bool}`; paired rows (`prompt`, `chosen`,
`rejected`) are unpaired first as TRL's `unpair_preference_dataset` does. KTO's reference
point z0 needs, for each row, a *mismatched* completion under its prompt: row i becomes the
pair

    prompt_i, chosen = completion_i, rejected = completion_{kl(i)}, margin = label_i

with kl(i) = `losses.kto_kl_pair_indices(n, block)` (completions rotated by one inside each
block of `block` consecutive rows). The packed pair batch then computes log p(y_i|x_i) and
log p(y_kl(i)|x_i) in one forward with the prompt once, and the label rides in the batch's
`margin` column (1.0 desirable, 0.0 undesirable).

TRL rotates within each *training batch* (its sampler's order); here the rotation is over
the fixed row order, so the pairing is decided once at load time: deterministic, the same
after `--resume`, and independent of the (length-grouped, shuffled) batch order. Either way
z0 is a batch mean over mismatched (x, y') pairs, which is what the estimate needs.
"""

from __future__ import annotations

from typing import Any

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


def kto_pairs(rows: Any, *, block: int) -> list[dict]:
    """Each unpaired row as a pair with its KL completion (see the module docstring)."""
    rows = unpaired_rows(rows)
    if len(rows) < 2:
        raise ValueError(f"KTO needs at least 2 rows (a KL pair is another row), got {len(rows)}")
    kl = kto_kl_pair_indices(len(rows), block)
    return [
        {
            "prompt": row["prompt"],
            "chosen": row["completion"],
            "rejected": rows[int(j)]["completion"],
            "margin": 1.0 if row["label"] else 0.0,
        }
        for row, j in zip(rows, kl, strict=True)
    ]
