"""Train/eval splits as a run loads them: tokenized pairs or prompts from the data section
(`data.train` at `data.split`; `data.eval`, `data.eval_split` or a held-out share of train)
and the run's length buckets. An error in the data names its source ("data.train
pairs.jsonl: row 3: field 'chosen' is empty")."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import datasets

from jaxrlhf.data.buckets import default_buckets
from jaxrlhf.data.order import train_eval_split
from jaxrlhf.data.rows import load_rows
from jaxrlhf.data.tokenize import (
    PreferenceData,
    PromptData,
    TokenizeReport,
    tokenize_preferences,
    tokenize_prompts,
)

if TYPE_CHECKING:  # the config sections (imported for annotations only: config imports data)
    from jaxrlhf.config import PreferenceDataConfig, PromptDataConfig


@dataclasses.dataclass(frozen=True)
class PreferenceSplits:
    train: PreferenceData
    eval: PreferenceData | None
    buckets: tuple[int, ...]
    report: TokenizeReport


@dataclasses.dataclass(frozen=True)
class PromptSplits:
    train: PromptData
    eval: PromptData | None
    buckets: tuple[int, ...]


def _split_source(source: Any) -> tuple[Any, Any]:
    """An in-memory `{"train": rows, "eval": rows}` or just the train rows."""
    if isinstance(source, dict) and "train" in source:
        return source["train"], source.get("eval")
    return source, None


def _tokenize_source(tokenize, rows: Any, label: str | None):
    """`tokenize(rows)`, its errors prefixed with where the rows came from (`label`)."""
    try:
        return tokenize(rows)
    except ValueError as err:
        if label is None:
            raise
        raise ValueError(f"{label}: {err}") from err


def _configured(cfg: Any, option: str, split: str | None):
    """(rows, label) of `data.train` or `data.eval` at `split`."""
    location = getattr(cfg, option)
    if location is None or not location.strip():
        raise ValueError(f"data.{option} is not set: give a file, a folder or a dataset id")
    rows = load_rows(location, split=split, config=cfg.config, name=f"data.{option}")
    return rows, f"data.{option} {location}" + (f" (split {split})" if split else "")


def _train_and_eval(cfg: Any, source: Any, tokenize, *, seed: int, log, what: str, **held_out):
    """(train, eval or None) tokenized from `source` or `cfg.train` (at `cfg.split`), the
    eval set from the in-memory eval rows, `cfg.eval`, `cfg.train` at `cfg.eval_split`, or
    held out of train (`held_out`: eval_fraction= or eval_size=, when non-zero)."""
    source, eval_source = _split_source(source)
    if source is not None:
        dict_split = cfg.split if isinstance(source, datasets.DatasetDict) else None
        rows, label = load_rows(source, split=dict_split), None
    else:
        rows, label = _configured(cfg, "train", cfg.split)
    train, report = _tokenize_source(tokenize, rows, label)
    if report.n_skipped:
        log(
            f"data: skipped {report.n_skipped} bad {what}rows of {report.n_rows} "
            f"(first: {report.skipped[:3]})"
        )
    if eval_source is not None:
        rows, label = load_rows(eval_source), None
    elif cfg.eval:
        rows, label = _configured(cfg, "eval", cfg.eval_split)
    elif cfg.eval_split and source is None:
        rows, label = _configured(cfg, "train", cfg.eval_split)
    else:
        rows = None
    if rows is not None:
        evaluation, _ = _tokenize_source(tokenize, rows, label)
        return train, evaluation, report
    if any(held_out.values()) and len(train) > 1:
        tr, ev = train_eval_split(len(train), seed=seed, **held_out)
        return train.select(tr), train.select(ev), report
    return train, None, report


def load_preferences(
    cfg: PreferenceDataConfig,
    tokenizer: Any,
    *,
    seed: int,
    source: Any = None,
    log=print,
    prepare_rows: Callable[[list], list] | None = None,
) -> PreferenceSplits:
    """Tokenized train/eval pairs from `cfg.train` (or an in-memory `source`);
    `prepare_rows` rewrites each split's loaded rows into pairs first (e.g. KTO's)."""

    def tokenize(rows):
        if prepare_rows is not None:
            rows = load_rows(prepare_rows(rows))
        return tokenize_preferences(
            rows,
            tokenizer,
            max_length=cfg.max_length,
            max_prompt_length=cfg.max_prompt_length,
            skip_bad_rows=cfg.skip_bad_rows,
            add_eos=cfg.add_eos,
        )

    train, evaluation, report = _train_and_eval(
        cfg, source, tokenize, seed=seed, log=log, what="", eval_fraction=cfg.eval_fraction
    )
    buckets = tuple(cfg.length_buckets or default_buckets(cfg.max_length))
    return PreferenceSplits(train=train, eval=evaluation, buckets=buckets, report=report)


def load_prompts(
    cfg: PromptDataConfig, tokenizer: Any, *, seed: int, source: Any = None, log=print
) -> PromptSplits:
    """Tokenized train/eval prompts from `cfg.train` (or an in-memory `source`)."""

    def tokenize(rows):
        return tokenize_prompts(
            rows,
            tokenizer,
            max_prompt_length=cfg.max_prompt_length,
            field=cfg.field,
            skip_bad_rows=cfg.skip_bad_rows,
        )

    train, evaluation, _ = _train_and_eval(
        cfg, source, tokenize, seed=seed, log=log, what="prompt ", eval_size=cfg.eval_size
    )
    # Prompt batches keep powers of two: every prompt shape compiles a sampler.
    buckets = tuple(cfg.length_buckets or default_buckets(cfg.max_prompt_length, midpoints=False))
    return PromptSplits(train=train, eval=evaluation, buckets=buckets)
