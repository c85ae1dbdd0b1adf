"""Rows in: `load_rows` (any source `datasets` reads) and the checks of one row's fields.

A file that cannot be read becomes one `ValueError` naming the file and, for JSON, the line;
a problem with one row raises `RowError`, to which the tokenizers add "row i:" (1-based: row
3 is line 3 of a .jsonl) or, with `skip_bad_rows`, record it as the reason the row was skipped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

# Loader name for each file suffix `datasets.load_dataset` understands.
_FILE_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
ACCEPTED_SOURCES = (
    "a .json/.jsonl/.parquet/.csv file, a folder written by Dataset.save_to_disk, a folder "
    "of such files, or a dataset id"
)
# Files `save_to_disk` writes: a Dataset folder has state.json, a DatasetDict folder
# dataset_dict.json.
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def load_rows(
    source: Any, *, split: str | None = None, config: str | None = None, name: str = "source"
) -> datasets.Dataset:
    """Rows as a `datasets.Dataset` from anything `datasets` reads.

    `source` is a Dataset, a DatasetDict (pick `split`), a list of dicts, or a string:
      a .json/.jsonl/.parquet/.csv file   `load_dataset(kind, data_files=path, split=)`
      a `save_to_disk` folder             `load_from_disk` (a DatasetDict: its `split`)
      a folder of data files              `load_dataset(folder, split=)`
      a dataset id                        `load_dataset(id, config, split=)` (offline: the cache)
    `split` defaults to "train" and may slice ("train[:100]") where `load_dataset` reads;
    `config` is the dataset's configuration name (TRL's `dataset_config`). `name` is how
    errors call the source (e.g. "data.train"). Every failure is one ValueError (or
    FileNotFoundError) naming the file and, for JSON, the 1-based line at fault.
    """
    if isinstance(source, datasets.Dataset):
        if split is not None:
            raise ValueError(f"split={split!r} was given but {name} is already a single Dataset")
        return source
    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, name)
    if isinstance(source, str | os.PathLike):
        if isinstance(source, str) and not source.strip():
            raise ValueError(f"{name} is not set: give a file, a folder or a dataset id")
        with _quiet_datasets():
            return _load_from_string(source, split=split, config=config, name=name)
    if isinstance(source, list):
        if split is not None:
            raise ValueError(f"split={split!r} was given but {name} is a list of rows")
        for i, row in enumerate(source):
            if not isinstance(row, Mapping):
                raise ValueError(f"row {i + 1}: expected a dict, got {type(row).__name__}")
        return datasets.Dataset.from_list(source)
    raise TypeError(
        f"{name} must be a datasets.Dataset, a DatasetDict, a list of dicts or a string "
        f"({ACCEPTED_SOURCES}), got {type(source).__name__}"
    )


def _pick_split(dd: datasets.DatasetDict, split: str | None, name: str) -> datasets.Dataset:
    split = split or "train"
    if split not in dd:
        raise ValueError(
            f"{name} has no split {split!r}; its splits are {sorted(dd)} "
            "(pass split=, or set data.split / data.eval_split)"
        )
    return dd[split]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from `datasets` while loading: a failure is reported
    once, as our error, not as a log line before it."""
    verbosity = datasets.logging.get_verbosity()
    bars = datasets.utils.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _looks_like_path(text: str) -> bool:
    """A local path rather than a dataset id ("org/name"): absolute or relative markers,
    more than one "/", or a file suffix."""
    return (
        text.startswith(("/", "./", "../", "~"))
        or text.count("/") > 1
        or os.sep != "/"
        and os.sep in text
        or re.search(r"\.[A-Za-z][A-Za-z0-9]{0,7}$", text) is not None
    )


def _load_from_string(
    source: str | os.PathLike, *, split: str | None, config: str | None, name: str
) -> datasets.Dataset:
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, split=split, config=config, name=name)
    if path.is_file() or isinstance(source, os.PathLike) or _looks_like_path(str(source)):
        return _load_file(path, split=split, name=name)
    try:
        loaded = datasets.load_dataset(str(source), config, split=split or "train")
    except Exception as err:  # the Hub client, the cache, the builder: all one user error
        raise ValueError(
            f"{name}={str(source)!r} is not a local file or folder, and datasets could not "
            f"load it as a dataset id ({_first_line(err)}); {name} takes {ACCEPTED_SOURCES}"
        ) from None
    return loaded


def _load_file(path: Path, *, split: str | None, name: str) -> datasets.Dataset:
    kind = _FILE_LOADERS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{name}: unknown data file extension {path.suffix!r} for {str(path)!r}; "
            f"{name} takes {ACCEPTED_SOURCES}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{name}: data file not found: {str(path)!r}")
    problem = _empty_or_not_utf8(path) if kind != "parquet" else None
    if problem is None:
        try:
            return datasets.load_dataset(kind, data_files=str(path), split=split or "train")
        except Exception as err:  # pyarrow, pandas and datasets errors alike
            problem = (_json_problem(path) if kind == "json" else None) or _first_line(err)
    raise ValueError(f"{name}: {path}: {problem}")


def _load_folder(
    path: Path, *, split: str | None, config: str | None, name: str
) -> datasets.Dataset:
    try:
        if any((path / marker).is_file() for marker in _SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _pick_split(loaded, split, f"{name} ({path})")
            if split not in (None, "train"):
                raise ValueError(
                    f"{name}: {path} is one saved Dataset; {name} split does not apply"
                )
            return loaded
        files = [p for p in path.rglob("*") if p.suffix.lower() in _FILE_LOADERS]
        if not files:
            raise ValueError(
                f"{name}: the folder {path} holds no .json/.jsonl/.parquet/.csv files and "
                f"is not a save_to_disk folder; {name} takes {ACCEPTED_SOURCES}"
            )
        for file in files:
            problem = _empty_or_not_utf8(file) if file.suffix.lower() != ".parquet" else None
            if problem is not None:
                raise ValueError(f"{name}: {file}: {problem}")
        try:
            return datasets.load_dataset(str(path), config, split=split or "train")
        except Exception as err:
            jsons = [f for f in files if _FILE_LOADERS[f.suffix.lower()] == "json"]
            found = next(((f, p) for f in jsons if (p := _json_problem(f))), None)
            if found is not None:
                raise ValueError(f"{name}: {found[0]}: {found[1]}") from None
            raise ValueError(f"{name}: the folder {path}: {_first_line(err)}") from None
    except (ValueError, OSError):
        raise
    except Exception as err:
        raise ValueError(f"{name}: the folder {path}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    """The most specific message of an error chain, on one line (datasets wraps the real
    cause in a DatasetGenerationError that says only that something went wrong)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _empty_or_not_utf8(path: Path) -> str | None:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return (
            f"line {line}: not UTF-8 text (byte {e.start} is {data[e.start : e.start + 1]!r}); "
            "save the file as UTF-8"
        )
    if not text.strip():
        return "the file is empty (no rows)"
    return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (write null or a number)")


def _parse_json(text: str) -> Any:
    """`json.loads` without Python's NaN/Infinity extension (Arrow refuses them too)."""
    return json.loads(text, parse_constant=_reject_constant)


def _json_error(err: ValueError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err.msg} at column {err.colno})"
    return str(err)


def _is_json_lines(path: Path, lines: list[str]) -> bool:
    """A .jsonl file is JSON lines; a .json file is when it does not open with "[" and some
    non-blank line is an object on its own."""
    if path.suffix.lower() == ".jsonl":
        return True
    body = [line for line in lines if line.strip()]
    if body[0].lstrip().startswith("["):
        return False
    for line in body:
        try:
            if isinstance(_parse_json(line), dict):
                return True
        except ValueError:
            continue
    return False


def _json_problem(path: Path) -> str | None:
    """What is wrong with a JSON or JSON-lines file, with its 1-based line, or None."""
    problem = _empty_or_not_utf8(path)
    if problem is not None:
        return problem
    lines = path.read_text(encoding="utf-8").split("\n")  # lines as `wc -l` and editors count
    if not _is_json_lines(path, lines):
        try:
            doc = _parse_json("\n".join(lines))
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: {_json_error(e)}"
        except ValueError as e:
            return str(e)
        if not isinstance(doc, list):
            return f"expected JSON lines or a list of objects, got {_kind(doc)}"
        for i, item in enumerate(doc):
            if not isinstance(item, dict):
                return f"item {i + 1} of the list is {_kind(item)}, not an object"
            if _too_big(item):
                return f"item {i + 1} of the list holds an integer beyond 64 bits"
        return None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = _parse_json(line)
        except ValueError as e:
            return f"line {n}: {_json_error(e)}"
        if not isinstance(value, dict):
            return f"line {n}: expected a JSON object {{...}}, got {_kind(value)}"
        big = next((k for k, v in value.items() if _too_big(v)), None)
        if big is not None:
            return (
                f"line {n}: field {big!r} holds an integer beyond 64 bits, which Arrow cannot store"
            )
    return None


def _too_big(value: Any) -> bool:
    """An integer Arrow cannot store (beyond int64 / uint64), anywhere inside `value`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return not -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return any(_too_big(v) for v in value.values())
    if isinstance(value, list):
        return any(_too_big(v) for v in value)
    return False


# The roles chat templates know (OpenAI's and Llama 3's); another role is a typo more often
# than a template feature, and most templates would render it silently.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


class RowError(Exception):
    """A problem with one row; the caller adds "row i: " or records it as a skip reason."""


def row_columns(rows: Any) -> list[str]:
    if isinstance(rows, datasets.Dataset):
        return list(rows.column_names)
    cols: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i + 1}: expected a dict, got {type(row).__name__}")
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
                    f"field {name!r} message {j + 1} is not a dict with 'role' and 'content'"
                )
            for key in ("role", "content"):
                if not isinstance(msg.get(key), str):
                    raise RowError(f"field {name!r} message {j + 1} has no string {key!r}")
            if msg["role"] not in CHAT_ROLES:
                raise RowError(
                    f"field {name!r} message {j + 1} has the unknown role {msg['role']!r}; "
                    f"use one of {', '.join(CHAT_ROLES)}"
                )
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
