"""Degeneration metrics of sampled completions: what an over-optimised policy loses first.

    distinct_n      = |unique word n-grams| / |word n-grams|  over all completions
                      (corpus-level, Li et al., 2016); lower = more repetitive
    repeated_3gram  = share of completions in which some word 3-gram occurs twice or more
                      ("love, love, love, ..." or a looping phrase)
    mean_length     = mean completion length in words

Words are whitespace-separated and lower-cased, with surrounding punctuation stripped, so
"Love," and "love" count as one word.
"""

from __future__ import annotations

from collections.abc import Sequence

_PUNCT = ".,;:!?\"'()[]{}«»“”‘’"


def words(text: str) -> list[str]:
    out = (w.strip(_PUNCT).lower() for w in text.split())
    return [w for w in out if w]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of all texts (0.0 when there are none)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_repeated_ngram(text: str, n: int = 3) -> bool:
    grams = ngrams(words(text), n)
    return len(set(grams)) < len(grams)


def degeneration_metrics(texts: Sequence[str]) -> dict[str, float]:
    """`distinct_1`, `distinct_2`, `repeated_3gram` and `mean_length` (see the module doc)."""
    n = max(len(texts), 1)
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_3gram": sum(has_repeated_ngram(t, 3) for t in texts) / n,
        "mean_length": sum(len(words(t)) for t in texts) / n,
    }
