"""Train/eval splits as a run loads them: tokenized pairs or prompts from the data section
(`data.train`, `data.eval` or a held-out share of train) and the run's length buckets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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


def _train_and_eval(cfg: Any, source: Any, tokenize, *, seed: int, log, what: str, **held_out):
    """(train, eval or None) tokenized from `source` or `cfg.train`, the eval set from the
    in-memory eval rows, `cfg.eval`, or held out of train (`held_out`: eval_fraction= or
    eval_size=, when non-zero)."""
    source, eval_source = _split_source(source)
    train, report = tokenize(load_rows(source if source is not None else cfg.train))
    if report.n_skipped:
        log(
            f"data: skipped {report.n_skipped} bad {what}rows of {report.n_rows} "
            f"(first: {report.skipped[:3]})"
        )
    if eval_source is not None or cfg.eval:
        evaluation, _ = tokenize(load_rows(eval_source if eval_source is not None else cfg.eval))
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
