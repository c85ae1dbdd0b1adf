"""The data edge: dataset rows -> tokenized pairs and prompts -> padded, bucketed numpy batches.

Everything here is numpy and plain Python; the training code puts arrays on devices.

Rows
    `load_rows` turns an in-memory `datasets.Dataset`, a list of dicts or a local
    .json/.jsonl/.parquet/.csv file into a `datasets.Dataset`. The tokenizers below also
    take a plain list of dicts directly.

Preference pairs (reward model, DPO) come in two forms, as in TRL:

    plain           {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
    conversational  {"prompt": [{"role": "user", "content": "2+2?"}],
                     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [...]}

    In the conversational form the prompt is rendered with
    `apply_chat_template(prompt, add_generation_prompt=True)` and a response is the text the
    chat template adds after it when rendering `prompt + response`. Without a `prompt`
    column, `chosen`/`rejected` are whole conversations and their common leading messages
    are the prompt. Without a `prompt` column in the plain form the prompt is empty (just
    BOS): the shared text is then scored in both responses, which cancels in DPO and in a
    Bradley-Terry reward model. An optional `margin` column gives a per-pair float.

Tokens
    prompt   = [BOS if the tokenizer adds one] + tokens(prompt text)
    response = tokens(response text, no special tokens) + [EOS]  (EOS only if add_eos and
               the text does not already end in it, as chat templates often do)
    Truncation keeps the prompt's END (left-truncation to max_prompt_length, BOS kept) and
    the response's START (right-truncation so prompt + response <= max_length; a truncated
    response loses its EOS). A bad row raises `ValueError("row 17: field 'chosen' is
    empty")`, or with skip_bad_rows=True is skipped and listed in the `TokenizeReport`.

Batches
    Sequences are padded to a length bucket (`default_buckets`: powers of two from 16, the
    1.5x step between each two, and max_length itself) so a run compiles a handful of
    programs and a sequence longer than the smallest bucket is padded by less than a third
    of its bucket. A short batch is filled
    up to `batch_size` with dummy rows whose `pair_mask`/`row_mask` is 0. A dummy row repeats
    the first row's tokens, so no row is fully masked (a fully masked attention row is NaN
    with -inf masking, and NaN * 0 is still NaN); its response masks and margin are 0.

Order and resume
    `batch_indices(n, batch_size=, seed=, position=)` is pure: `position` counts examples
    consumed since the start, the epoch is `position // (n // batch_size * batch_size)`,
    and each epoch is a fresh `epoch_order` permutation whose incomplete last batch is
    DROPPED (static shapes; the dropped rows differ every epoch). A checkpoint stores just
    `position`; resuming yields exactly the batches an uninterrupted run would have.
    Passing `lengths=` groups similar lengths into batches within windows of
    `group_factor * batch_size` examples (less padding, still deterministic).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np

__all__ = [
    "PreferenceData",
    "PromptData",
    "TokenizeReport",
    "batch_indices",
    "bucket_length",
    "default_buckets",
    "epoch_order",
    "load_rows",
    "pad_preference_batch",
    "pad_prompt_batch",
    "padding_fraction",
    "process_slice",
    "steps_per_epoch",
    "tokenize_preferences",
    "tokenize_prompts",
    "train_eval_split",
]

# Loader name for each file suffix `datasets.load_dataset` understands.
_FILE_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# numpy's SeedSequence ignores trailing zeros ((s, 0) == (s,)), so each derived stream ends
# in its own non-zero tag at a fixed position; `epoch_order` keeps the plain (seed, epoch).
_TAG_WINDOW = 1
_TAG_SPLIT = 2


# ----------------------------------------------------------------------------- loading


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


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeReport:
    """What tokenization did: rows seen, kept, skipped (with reasons) and truncated."""

    n_rows: int
    n_kept: int
    n_skipped: int
    skipped: tuple[tuple[int, str], ...] = ()
    """(row_index, reason) for each skipped row, e.g. (17, "field 'chosen' is empty")."""
    n_truncated: int = 0
    """Kept rows where the prompt or a response lost tokens."""

    def __post_init__(self) -> None:
        if self.n_kept + self.n_skipped != self.n_rows:
            raise ValueError(
                f"TokenizeReport: n_kept ({self.n_kept}) + n_skipped ({self.n_skipped}) "
                f"!= n_rows ({self.n_rows})"
            )
        if len(self.skipped) != self.n_skipped:
            raise ValueError("TokenizeReport: len(skipped) must equal n_skipped")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceData:
    """Tokenized preference pairs, one entry per kept row (int32 token id arrays)."""

    prompt_ids: tuple[np.ndarray, ...]
    chosen_ids: tuple[np.ndarray, ...]
    """Response tokens only (the prompt is not repeated)."""
    rejected_ids: tuple[np.ndarray, ...]
    margin: np.ndarray | None
    """float32 [N] when the rows had a `margin` column, else None."""
    row_index: np.ndarray
    """int64 [N]: each pair's index in the source rows."""

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        lens = {
            "chosen_ids": len(self.chosen_ids),
            "rejected_ids": len(self.rejected_ids),
            "row_index": len(self.row_index),
        }
        if self.margin is not None:
            lens["margin"] = len(self.margin)
        for name, m in lens.items():
            if m != n:
                raise ValueError(f"PreferenceData.{name} has {m} entries, prompt_ids has {n}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: Any) -> PreferenceData:
        """The pairs at `indices` (e.g. the train half of `train_eval_split`)."""
        idx = np.asarray(indices, np.int64)
        return PreferenceData(
            prompt_ids=tuple(self.prompt_ids[i] for i in idx),
            chosen_ids=tuple(self.chosen_ids[i] for i in idx),
            rejected_ids=tuple(self.rejected_ids[i] for i in idx),
            margin=None if self.margin is None else self.margin[idx],
            row_index=self.row_index[idx],
        )

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N]: the longer of prompt+chosen and prompt+rejected (for buckets, grouping)."""
        return np.array(
            [
                len(p) + max(len(c), len(r))
                for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids, strict=True)
            ],
            dtype=np.int64,
        )

    @property
    def packed_lengths(self) -> np.ndarray:
        """int64 [N]: prompt + chosen + rejected, a pair's length packed with the prompt once."""
        return np.array(
            [
                len(p) + len(c) + len(r)
                for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids, strict=True)
            ],
            dtype=np.int64,
        )

    def batching_lengths(self, share_prompt: bool) -> np.ndarray:
        """The lengths that decide a pair's padding: grouping batches by them pads least."""
        return self.packed_lengths if share_prompt else self.lengths


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptData:
    """Tokenized RL prompts plus what reward functions need, one entry per kept row."""

    prompt_ids: tuple[np.ndarray, ...]
    prompts: tuple[Any, ...]
    """The original prompt values (a string or a list of messages), as in the rows."""
    prompt_text: tuple[str, ...]
    """The text that was tokenized (chat prompts rendered with the generation prompt)."""
    extras: dict[str, tuple[Any, ...]]
    """Every other column of the kept rows, e.g. {"answer": ("4", "7", ...)}."""
    row_index: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        lens = {
            "prompts": len(self.prompts),
            "prompt_text": len(self.prompt_text),
            "row_index": len(self.row_index),
        }
        lens.update({f"extras[{k!r}]": len(v) for k, v in self.extras.items()})
        for name, m in lens.items():
            if m != n:
                raise ValueError(f"PromptData.{name} has {m} entries, prompt_ids has {n}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: Any) -> PromptData:
        """The prompts at `indices`, with their texts and extra columns."""
        idx = np.asarray(indices, np.int64)
        return PromptData(
            prompt_ids=tuple(self.prompt_ids[i] for i in idx),
            prompts=tuple(self.prompts[i] for i in idx),
            prompt_text=tuple(self.prompt_text[i] for i in idx),
            extras={k: tuple(v[i] for i in idx) for k, v in self.extras.items()},
            row_index=self.row_index[idx],
        )

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(p) for p in self.prompt_ids], dtype=np.int64)


# ----------------------------------------------------------------------------- rendering


class _RowError(Exception):
    """A problem with one row; the caller adds "row i: " or records it as a skip reason."""


def _columns(rows: Any) -> list[str]:
    if isinstance(rows, datasets.Dataset):
        return list(rows.column_names)
    cols: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")
        cols.update(dict.fromkeys(row))
    return list(cols)


def _check_rows(rows: Any) -> None:
    if isinstance(rows, datasets.DatasetDict):
        raise TypeError(f"rows is a DatasetDict; pick a split first, one of {sorted(rows)}")
    if not isinstance(rows, datasets.Dataset | Sequence) or isinstance(rows, str | bytes):
        raise TypeError(
            f"rows must be a datasets.Dataset or a list of dicts, got {type(rows).__name__}"
        )
    if len(rows) == 0:
        raise ValueError("rows is empty")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list | tuple)


def _field(row: Mapping, name: str) -> Any:
    """The value of a str or message-list field, or a _RowError naming the field."""
    if name not in row or row[name] is None:
        raise _RowError(f"field {name!r} is missing")
    value = row[name]
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(f"field {name!r} is empty")
        return value
    if _is_messages(value):
        if len(value) == 0:
            raise _RowError(f"field {name!r} is empty")
        for j, msg in enumerate(value):
            if not isinstance(msg, Mapping):
                raise _RowError(
                    f"field {name!r} message {j} is not a dict with 'role' and 'content'"
                )
            for key in ("role", "content"):
                if not isinstance(msg.get(key), str):
                    raise _RowError(f"field {name!r} message {j} has no string {key!r}")
        return list(value)
    raise _RowError(
        f"field {name!r} must be a string or a list of messages, got {type(value).__name__}"
    )


def _render(tokenizer: Any, messages: list, *, add_generation_prompt: bool, name: str) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        # A setup problem, not a row problem: raised at once, even with skip_bad_rows.
        raise ValueError("rows hold lists of messages but the tokenizer has no chat_template")
    # Arrow fills keys that only some messages have (e.g. tool_calls) with None; drop them so
    # a template's `'key' in message` tests see the message as written.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as err:  # jinja raise_exception(...), e.g. roles that must alternate
        raise _RowError(f"field {name!r}: the chat template failed: {err}") from err


def _continuation(tokenizer: Any, prompt: list, prompt_text: str, response: list, name: str) -> str:
    full = _render(tokenizer, prompt + response, add_generation_prompt=False, name=name)
    if not full.startswith(prompt_text):
        raise _RowError(
            f"field {name!r}: the chat template's rendering of prompt + {name} does not start "
            "with its rendering of the prompt (with add_generation_prompt=True), so the "
            "response text cannot be cut out; use a template that renders prefixes stably"
        )
    if not full[len(prompt_text) :].strip():
        raise _RowError(f"field {name!r} renders to no text after the prompt")
    return full[len(prompt_text) :]


def _strip_prefix(messages: list, prefix: list) -> list:
    n = len(prefix)
    if len(messages) > n and [dict(m) for m in messages[:n]] == [dict(m) for m in prefix]:
        return messages[n:]
    return messages


def _render_preference(row: Mapping, tokenizer: Any, has_prompt: bool) -> tuple[str, str, str]:
    """(prompt_text, chosen_text, rejected_text) for one row, in either form."""
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _RowError("fields 'chosen' and 'rejected' mix a string and a list of messages")
    prompt = _field(row, "prompt") if has_prompt else None
    if isinstance(chosen, str):
        if prompt is not None and not isinstance(prompt, str):
            raise _RowError("field 'prompt' is a list of messages but 'chosen' is a string")
        return prompt or "", chosen, rejected
    if prompt is None:
        # Implicit prompt: the messages chosen and rejected share at the start.
        k = 0
        while k < min(len(chosen), len(rejected)) and dict(chosen[k]) == dict(rejected[k]):
            k += 1
        if k == 0:
            raise _RowError(
                "fields 'chosen' and 'rejected' share no leading messages to use as the "
                "prompt; add a 'prompt' field"
            )
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        for name, resp in (("chosen", chosen), ("rejected", rejected)):
            if not resp:
                raise _RowError(f"field {name!r} has no messages after the shared prompt")
    else:
        if isinstance(prompt, str):
            raise _RowError("field 'prompt' is a string but 'chosen' is a list of messages")
        # Whole conversations next to an explicit prompt: drop the repeated prompt.
        chosen, rejected = _strip_prefix(chosen, prompt), _strip_prefix(rejected, prompt)
    prompt_text = _render(tokenizer, prompt, add_generation_prompt=True, name="prompt")
    return (
        prompt_text,
        _continuation(tokenizer, prompt, prompt_text, chosen, "chosen"),
        _continuation(tokenizer, prompt, prompt_text, rejected, "rejected"),
    )


def _margin(row: Mapping) -> float:
    value = row.get("margin")
    if value is None:
        raise _RowError("field 'margin' is missing")
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise _RowError(f"field 'margin' must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise _RowError(f"field 'margin' must be finite, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- tokenizing


def _bos_policy(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer adds one in front of text, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and without[:1] != [bos] else None


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _prompt_tokens(
    ids: list[int], bos: int | None, max_prompt_length: int
) -> tuple[list[int], bool]:
    """BOS + ids, left-truncated to max_prompt_length keeping BOS; (tokens, truncated)."""
    if bos is not None and ids[:1] != [bos]:  # a chat template may have rendered BOS itself
        ids = [bos, *ids]
    if len(ids) <= max_prompt_length:
        return ids, False
    if bos is not None:
        return [bos, *ids[len(ids) - max_prompt_length + 1 :]], True
    return ids[len(ids) - max_prompt_length :], True


def _response_tokens(ids: list[int], eos: int | None, room: int) -> tuple[list[int], bool]:
    if eos is not None and ids[-1:] != [eos]:
        ids = [*ids, eos]
    return (ids, False) if len(ids) <= room else (ids[:room], True)


def _raise_or_skip(skip: bool, index: int, reason: str, skipped: list) -> None:
    if not skip:
        raise ValueError(f"row {index}: {reason} (pass skip_bad_rows=True to skip such rows)")
    skipped.append((index, reason))


def _finish_report(n_rows: int, n_kept: int, skipped: list, n_truncated: int) -> TokenizeReport:
    if n_kept == 0:
        first = "; ".join(f"row {i}: {r}" for i, r in skipped[:3])
        raise ValueError(f"all {n_rows} rows were skipped ({first}, ...)")
    skipped = sorted(skipped)
    return TokenizeReport(
        n_rows=n_rows,
        n_kept=n_kept,
        n_skipped=len(skipped),
        skipped=tuple(skipped),
        n_truncated=n_truncated,
    )


def tokenize_preferences(
    rows: Any,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    skip_bad_rows: bool = False,
    add_eos: bool = True,
) -> tuple[PreferenceData, TokenizeReport]:
    """Tokenize preference pairs (plain or conversational; see the module docstring).

    The prompt keeps its END (left-truncated to `max_prompt_length`, default
    `max_length // 2`, BOS kept); each response keeps its START (cut so prompt + response
    <= `max_length`). Bad rows raise `ValueError("row i: field 'f' ...")` unless
    `skip_bad_rows`, in which case they are listed in the report.
    """
    _check_rows(rows)
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if not 1 <= max_prompt_length <= max_length:
        raise ValueError(
            f"max_prompt_length must be in [1, max_length={max_length}], got {max_prompt_length}"
        )
    columns = _columns(rows)
    for col in ("chosen", "rejected"):
        if col not in columns:
            raise ValueError(f"rows have no {col!r} column (columns: {columns})")
    has_prompt, has_margin = "prompt" in columns, "margin" in columns
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        raise ValueError(
            "add_eos=True but the tokenizer has no eos_token; set one or add_eos=False"
        )

    skipped: list[tuple[int, str]] = []
    kept: list[int] = []
    texts: list[tuple[str, str, str]] = []
    margins: list[float] = []
    for i, row in enumerate(rows):
        try:
            rendered = _render_preference(row, tokenizer, has_prompt)
            margin = _margin(row) if has_margin else 0.0
        except _RowError as err:
            _raise_or_skip(skip_bad_rows, i, str(err), skipped)
            continue
        kept.append(i)
        texts.append(rendered)
        margins.append(margin)

    prompt_toks = _encode(tokenizer, [t[0] for t in texts])
    chosen_toks = _encode(tokenizer, [t[1] for t in texts])
    rejected_toks = _encode(tokenizer, [t[2] for t in texts])
    bos = _bos_policy(tokenizer)

    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "row": [], "margin": []}
    n_truncated = 0
    for k, i in enumerate(kept):
        try:
            for name, toks in (("chosen", chosen_toks[k]), ("rejected", rejected_toks[k])):
                if not toks:
                    raise _RowError(f"field {name!r} has no tokens")
            prompt, cut_p = _prompt_tokens(prompt_toks[k], bos, max_prompt_length)
            room = max_length - len(prompt)
            if room < 1:
                raise _RowError(
                    f"field 'prompt' leaves no room for a response ({len(prompt)} prompt "
                    f"tokens, max_length {max_length}); lower max_prompt_length"
                )
        except _RowError as err:
            _raise_or_skip(skip_bad_rows, i, str(err), skipped)
            continue
        chosen, cut_c = _response_tokens(chosen_toks[k], eos, room)
        rejected, cut_r = _response_tokens(rejected_toks[k], eos, room)
        n_truncated += cut_p or cut_c or cut_r
        out["prompt"].append(np.asarray(prompt, np.int32))
        out["chosen"].append(np.asarray(chosen, np.int32))
        out["rejected"].append(np.asarray(rejected, np.int32))
        out["row"].append(i)
        out["margin"].append(margins[k])

    report = _finish_report(len(rows), len(out["row"]), skipped, n_truncated)
    data = PreferenceData(
        prompt_ids=tuple(out["prompt"]),
        chosen_ids=tuple(out["chosen"]),
        rejected_ids=tuple(out["rejected"]),
        margin=np.asarray(out["margin"], np.float32) if has_margin else None,
        row_index=np.asarray(out["row"], np.int64),
    )
    return data, report


def tokenize_prompts(
    rows: Any,
    tokenizer: Any,
    *,
    max_prompt_length: int,
    field: str = "prompt",
    skip_bad_rows: bool = False,
) -> tuple[PromptData, TokenizeReport]:
    """Tokenize RL prompts: strings as they are, message lists with the generation prompt.

    Over-long prompts keep their END (BOS kept). The original prompts, the tokenized text
    and every other column (e.g. `answer` for verifiable rewards) are kept for rewards.
    """
    _check_rows(rows)
    if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be an int >= 1, got {max_prompt_length!r}")
    columns = _columns(rows)
    if field not in columns:
        raise ValueError(f"rows have no {field!r} column (columns: {columns}); set field=")

    skipped: list[tuple[int, str]] = []
    kept: list[int] = []
    originals: list[Any] = []
    texts: list[str] = []
    for i, row in enumerate(rows):
        try:
            value = _field(row, field)
            text = (
                value
                if isinstance(value, str)
                else _render(tokenizer, value, add_generation_prompt=True, name=field)
            )
        except _RowError as err:
            _raise_or_skip(skip_bad_rows, i, str(err), skipped)
            continue
        kept.append(i)
        originals.append(row[field])
        texts.append(text)

    bos = _bos_policy(tokenizer)
    ids_out: list[np.ndarray] = []
    keep_k: list[int] = []
    n_truncated = 0
    for k, toks in enumerate(_encode(tokenizer, texts)):
        if not toks:
            _raise_or_skip(skip_bad_rows, kept[k], f"field {field!r} has no tokens", skipped)
            continue
        ids, cut = _prompt_tokens(toks, bos, max_prompt_length)
        n_truncated += cut
        ids_out.append(np.asarray(ids, np.int32))
        keep_k.append(k)

    report = _finish_report(len(rows), len(keep_k), skipped, n_truncated)
    row_index = [kept[k] for k in keep_k]
    others = [c for c in columns if c != field]
    if isinstance(rows, datasets.Dataset):
        sub = rows.select(row_index)
        extras = {c: tuple(sub[c]) for c in others}
    else:
        extras = {c: tuple(rows[i].get(c) for i in row_index) for c in others}
    data = PromptData(
        prompt_ids=tuple(ids_out),
        prompts=tuple(originals[k] for k in keep_k),
        prompt_text=tuple(texts[k] for k in keep_k),
        extras=extras,
        row_index=np.asarray(row_index, np.int64),
    )
    return data, report


# ----------------------------------------------------------------------------- batching


def default_buckets(
    max_length: int, *, min_length: int = 16, midpoints: bool = True
) -> tuple[int, ...]:
    """Powers of two from `min_length` and, with `midpoints`, the 1.5x step between each two
    (16, 24, 32, 48, 64, 96, ...) below `max_length`, then `max_length` itself.

    With powers of two alone a sequence just past a power wastes half its bucket; the middle
    step halves that worst case for twice the (still logarithmic) number of compiled shapes.
    Prompt batches for sampling use `midpoints=False`: prefill is a small part of a rollout
    and every prompt shape compiles a sampler."""
    if max_length < 1 or min_length < 1:
        raise ValueError(f"max_length and min_length must be >= 1, got {max_length}, {min_length}")
    out, b = [], min_length
    while b < max_length:
        out.append(b)
        if midpoints and b < b * 3 // 2 < max_length:
            out.append(b * 3 // 2)
        b *= 2
    return (*out, max_length)


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in buckets)
    if (
        not buckets
        or buckets[0] < 1
        or any(a >= b for a, b in zip(buckets, buckets[1:], strict=False))
    ):
        raise ValueError(
            f"buckets must be a non-empty, strictly increasing tuple of positive ints, got {buckets}"
        )
    return buckets


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; an error if n exceeds the largest."""
    buckets = _check_buckets(buckets)
    if n > buckets[-1]:
        raise ValueError(
            f"sequence length {n} exceeds the largest bucket {buckets[-1]}; add a larger "
            "bucket or tokenize with a smaller max_length"
        )
    return buckets[bisect.bisect_left(buckets, n)]


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


# ----------------------------------------------------------------------------- order


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
