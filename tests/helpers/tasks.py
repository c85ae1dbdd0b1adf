"""Small learnable tasks generated in the tests (no downloads)."""

from __future__ import annotations

import random
import string


def case_preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose chosen response is the rejected one in upper case: a rule a tiny model
    learns from scratch, so held-out accuracy must rise from chance to near 1."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "say: " + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6)))
        word = " ".join(
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 5)))
            for _ in range(rng.randint(1, 3))
        )
        rows.append({"prompt": prompt, "chosen": " " + word.upper(), "rejected": " " + word})
    return rows
