"""Length buckets: sequences are padded to one of a few lengths, so a run compiles a handful
of programs. The one helper every batch builder and config check uses."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


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


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
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
    buckets = check_buckets(buckets)
    if n > buckets[-1]:
        raise ValueError(
            f"sequence length {n} exceeds the largest bucket {buckets[-1]}; add a larger "
            "bucket or tokenize with a smaller max_length"
        )
    return buckets[bisect.bisect_left(buckets, n)]


def packed_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Buckets for prefix-shared pairs: a packed row (prompt + chosen + rejected) can be up to
    twice the longest single sequence, so the doubled buckets join the plain ones."""
    buckets = check_buckets(buckets)
    return tuple(sorted({*buckets, *(2 * b for b in buckets)}))
