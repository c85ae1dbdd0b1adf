"""Rows -> token ids: preference pairs (`tokenize_preferences`) and RL prompts
(`tokenize_prompts`), plain text or conversations rendered with the chat template.
See the package docstring for the token layout and truncation rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np

from jaxrlhf.data.rows import (
    RowError,
    check_rows,
    row_columns,
    row_field,
    row_margin,
)

# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeReport:
    """What tokenization did: rows seen, kept, skipped (with reasons) and truncated."""

    n_rows: int
    n_kept: int
    n_skipped: int
    skipped: tuple[tuple[int, str], ...] = ()
    """(row number, reason) for each skipped row, 1-based as in the error messages (row 3 is
    line 3 of a .jsonl), e.g. (17, "field 'chosen' is empty")."""
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
        raise RowError(f"field {name!r}: the chat template failed: {err}") from err


def _continuation(tokenizer: Any, prompt: list, prompt_text: str, response: list, name: str) -> str:
    full = _render(tokenizer, prompt + response, add_generation_prompt=False, name=name)
    if not full.startswith(prompt_text):
        raise RowError(
            f"field {name!r}: the chat template's rendering of prompt + {name} does not start "
            "with its rendering of the prompt (with add_generation_prompt=True), so the "
            "response text cannot be cut out; use a template that renders prefixes stably"
        )
    if not full[len(prompt_text) :].strip():
        raise RowError(f"field {name!r} renders to no text after the prompt")
    return full[len(prompt_text) :]


def _strip_prefix(messages: list, prefix: list) -> list:
    n = len(prefix)
    if len(messages) > n and [dict(m) for m in messages[:n]] == [dict(m) for m in prefix]:
        return messages[n:]
    return messages


def _render_preference(row: Mapping, tokenizer: Any, has_prompt: bool) -> tuple[str, str, str]:
    """(prompt_text, chosen_text, rejected_text) for one row, in either form."""
    chosen, rejected = row_field(row, "chosen"), row_field(row, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError("fields 'chosen' and 'rejected' mix a string and a list of messages")
    prompt = row_field(row, "prompt") if has_prompt else None
    if isinstance(chosen, str):
        if prompt is not None and not isinstance(prompt, str):
            raise RowError("field 'prompt' is a list of messages but 'chosen' is a string")
        return prompt or "", chosen, rejected
    if prompt is None:
        # Implicit prompt: the messages chosen and rejected share at the start.
        k = 0
        while k < min(len(chosen), len(rejected)) and dict(chosen[k]) == dict(rejected[k]):
            k += 1
        if k == 0:
            raise RowError(
                "fields 'chosen' and 'rejected' share no leading messages to use as the "
                "prompt; add a 'prompt' field"
            )
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        for name, resp in (("chosen", chosen), ("rejected", rejected)):
            if not resp:
                raise RowError(f"field {name!r} has no messages after the shared prompt")
    else:
        if isinstance(prompt, str):
            raise RowError("field 'prompt' is a string but 'chosen' is a list of messages")
        # Whole conversations next to an explicit prompt: drop the repeated prompt.
        chosen, rejected = _strip_prefix(chosen, prompt), _strip_prefix(rejected, prompt)
    prompt_text = _render(tokenizer, prompt, add_generation_prompt=True, name="prompt")
    return (
        prompt_text,
        _continuation(tokenizer, prompt, prompt_text, chosen, "chosen"),
        _continuation(tokenizer, prompt, prompt_text, rejected, "rejected"),
    )


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
    """Raise or record the problem of the row at 0-based `index`, which messages call row
    index + 1 (row 3 is the third row, line 3 of a .jsonl)."""
    if not skip:
        raise ValueError(f"row {index + 1}: {reason} (pass skip_bad_rows=True to skip such rows)")
    skipped.append((index + 1, reason))


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
    check_rows(rows)
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if not 1 <= max_prompt_length <= max_length:
        raise ValueError(
            f"max_prompt_length must be in [1, max_length={max_length}], got {max_prompt_length}"
        )
    columns = row_columns(rows)
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
            margin = row_margin(row) if has_margin else 0.0
        except RowError as err:
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
                    raise RowError(f"field {name!r} has no tokens")
            prompt, cut_p = _prompt_tokens(prompt_toks[k], bos, max_prompt_length)
            room = max_length - len(prompt)
            if room < 1:
                raise RowError(
                    f"field 'prompt' leaves no room for a response ({len(prompt)} prompt "
                    f"tokens, max_length {max_length}); lower max_prompt_length"
                )
        except RowError as err:
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
    check_rows(rows)
    if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be an int >= 1, got {max_prompt_length!r}")
    columns = row_columns(rows)
    if field not in columns:
        raise ValueError(f"rows have no {field!r} column (columns: {columns}); set field=")

    skipped: list[tuple[int, str]] = []
    kept: list[int] = []
    originals: list[Any] = []
    texts: list[str] = []
    for i, row in enumerate(rows):
        try:
            value = row_field(row, field)
            text = (
                value
                if isinstance(value, str)
                else _render(tokenizer, value, add_generation_prompt=True, name=field)
            )
        except RowError as err:
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
