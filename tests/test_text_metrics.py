"""Degeneration metrics on texts whose counts can be done by hand."""

import pytest

from jaxrlhf.text_metrics import degeneration_metrics, distinct_n, has_repeated_ngram, words


def test_words_lowercase_and_strip_punctuation():
    assert words("Love, love. LOVE!  (joy)") == ["love", "love", "love", "joy"]


def test_distinct_counts_over_the_whole_corpus():
    texts = ["a b c", "a b d"]
    # unigrams a b c a b d: 4 unique of 6; bigrams (a b)(b c)(a b)(b d): 3 unique of 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) == 0.0  # no bigram at all


def test_repeated_trigram_flags_loops_not_repeated_words():
    assert has_repeated_ngram("a tapestry of love, love, love, love")  # (love love love) twice
    assert has_repeated_ngram("I like it and I like it")  # (i like it) twice
    assert not has_repeated_ngram("the cat and the dog")  # "the" twice, no 3-gram twice


def test_degeneration_metrics():
    m = degeneration_metrics(["love love love love", "a fine day"])
    assert m["repeated_3gram"] == 0.5
    assert m["mean_length"] == 3.5
    # unigrams: love×4, a, fine, day -> 4 unique of 7
    assert m["distinct_1"] == pytest.approx(4 / 7)
