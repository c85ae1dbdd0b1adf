"""Python reward functions for PPO/GRPO: `fn(prompts, completions, **columns) -> list[float]`.

The signature is TRL's: `prompts` and `completions` are lists of strings (or chat messages
for prompts), and every other column of the prompt dataset arrives as a keyword list (e.g.
`answer=[...]`), so verifiable rewards can check against it. A config names a function by a
built-in name (`vader_sentiment`, `contains`, `char_share`, `exact_answer`) or by
`package.module:function`, with keyword arguments and a weight.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RewardFn = Callable[..., Sequence[float]]


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float]:
    """VADER's compound sentiment of each completion, in [-1, 1] (an outside judge: the
    lexicon ships with the `vadersentiment` package)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(c)["compound"]) for c in completions]


def contains(
    prompts: Sequence[Any], completions: Sequence[str], *, text: str, **_: Any
) -> list[float]:
    """1.0 when the completion contains `text`, else 0.0."""
    return [float(text in c) for c in completions]


def char_share(
    prompts: Sequence[Any], completions: Sequence[str], *, chars: str, **_: Any
) -> list[float]:
    """The share of the completion's characters that are in `chars` (0 for an empty one)."""
    return [sum(ch in chars for ch in c) / len(c) if c else 0.0 for c in completions]


def exact_answer(
    prompts: Sequence[Any], completions: Sequence[str], *, answer: Sequence[Any], **_: Any
) -> list[float]:
    """1.0 when the completion, stripped, starts with the row's `answer` column."""
    return [
        float(c.strip().startswith(str(a).strip()))
        for c, a in zip(completions, answer, strict=True)
    ]


BUILTINS: dict[str, RewardFn] = {
    "vader_sentiment": vader_sentiment,
    "contains": contains,
    "char_share": char_share,
    "exact_answer": exact_answer,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardFuncConfig:
    fn: str
    """A built-in name or `package.module:function`."""
    weight: float = 1.0
    kwargs: dict = dataclasses.field(default_factory=dict)
    name: str | None = None
    """The metric name (default: the function's name)."""

    @property
    def label(self) -> str:
        return self.name or self.fn.split(":")[-1]


def resolve(spec: str) -> RewardFn:
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec:
        raise ValueError(
            f"reward function {spec!r} is neither a built-in ({', '.join(BUILTINS)}) "
            f"nor of the form package.module:function"
        )
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} could not be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


def compute_rewards(
    funcs: Sequence[RewardFuncConfig],
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: dict[str, Sequence[Any]],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The weighted sum of every function's rewards [B] and each function's own [B]."""
    total = np.zeros(len(completions), np.float32)
    parts: dict[str, np.ndarray] = {}
    for f in funcs:
        values = np.asarray(
            resolve(f.fn)(list(prompts), list(completions), **columns, **f.kwargs), dtype=np.float32
        )
        if values.shape != (len(completions),):
            raise ValueError(
                f"reward function {f.fn!r} returned shape {values.shape}, expected "
                f"one float per completion ({len(completions)})"
            )
        if not np.all(np.isfinite(values)):
            raise ValueError(f"reward function {f.fn!r} returned a non-finite value")
        parts[f.label] = values
        total += f.weight * values
    return total, parts
