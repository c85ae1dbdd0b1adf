"""Rows in: `load_rows` (any source `datasets` reads) and the checks of one row's fields.

A problem with one row raises `RowError`; the tokenizers add "row i:" to it or, with
`skip_bad_rows`, record it as the reason the row was skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

# Loader name for each file suffix `datasets.load_dataset` understands.
_FILE_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: Any, *, split: str | None = None) -> datasets.Dataset:
    """Rows as a `datasets.Dataset` from a Dataset, a DatasetDict, a list of dicts or a file.

    Files: .json, .jsonl, .parquet and .csv, read with `datasets.load_dataset(kind,
    data_files=path, split=split or "train")` (`split` may slice, e.g. "train[:100]").
    """
    if isinstance(source, datasets.Dataset):
        if split is not None:
            raise ValueError(f"split={split!r} was given but source is already a single Dataset")
        return source
    if isinstance(source, datasets.DatasetDict):
        if split is None or split not in source:
            raise ValueError(
                f"source is a DatasetDict; pass split= one of {sorted(source)}, got {split!r}"
            )
        return source[split]
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        kind = _FILE_LOADERS.get(path.suffix.lower())
        if kind is None:
            raise ValueError(
                f"unknown data file extension {path.suffix!r} for {str(path)!r}; "
                f"use one of {sorted(_FILE_LOADERS)}"
            )
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {str(path)!r}")
        return datasets.load_dataset(kind, data_files=str(path), split=split or "train")
    if isinstance(source, list):
        if split is not None:
            raise ValueError(f"split={split!r} was given but source is a list of rows")
        for i, row in enumerate(source):
            if not isinstance(row, Mapping):
                raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")
        return datasets.Dataset.from_list(source)
    raise TypeError(
        "source must be a datasets.Dataset, a DatasetDict, a list of dicts or a file path, "
        f"got {type(source).__name__}"
    )


class RowError(Exception):
    """A problem with one row; the caller adds "row i: " or records it as a skip reason."""


def row_columns(rows: Any) -> list[str]:
    if isinstance(rows, datasets.Dataset):
        return list(rows.column_names)
    cols: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")
        cols.update(dict.fromkeys(row))
    return list(cols)


def check_rows(rows: Any) -> None:
    if isinstance(rows, datasets.DatasetDict):
        raise TypeError(f"rows is a DatasetDict; pick a split first, one of {sorted(rows)}")
    if not isinstance(rows, datasets.Dataset | Sequence) or isinstance(rows, str | bytes):
        raise TypeError(
            f"rows must be a datasets.Dataset or a list of dicts, got {type(rows).__name__}"
        )
    if len(rows) == 0:
        raise ValueError("rows is empty")


def is_messages(value: Any) -> bool:
    return isinstance(value, list | tuple)


def row_field(row: Mapping, name: str) -> Any:
    """The value of a str or message-list field, or a RowError naming the field."""
    if name not in row or row[name] is None:
        raise RowError(f"field {name!r} is missing")
    value = row[name]
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"field {name!r} is empty")
        return value
    if is_messages(value):
        if len(value) == 0:
            raise RowError(f"field {name!r} is empty")
        for j, msg in enumerate(value):
            if not isinstance(msg, Mapping):
                raise RowError(
                    f"field {name!r} message {j} is not a dict with 'role' and 'content'"
                )
            for key in ("role", "content"):
                if not isinstance(msg.get(key), str):
                    raise RowError(f"field {name!r} message {j} has no string {key!r}")
        return list(value)
    raise RowError(
        f"field {name!r} must be a string or a list of messages, got {type(value).__name__}"
    )


def row_margin(row: Mapping) -> float:
    value = row.get("margin")
    if value is None:
        raise RowError("field 'margin' is missing")
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise RowError(f"field 'margin' must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise RowError(f"field 'margin' must be finite, got {value!r}")
    return float(value)
