"""Write the small data files the tiny configs train on (configs/data/*.jsonl), once.

    python scripts/make_tiny_data.py

- `case_pairs.jsonl` (rm_tiny, dpo_tiny): preference pairs whose chosen response is the
  rejected one in upper case, a rule a tiny random model learns from scratch (the task of
  tests/helpers/tasks.py).
- `upper_prompts.jsonl` (ppo_tiny, grpo_tiny): upper-case prompts; the tiny configs reward
  the share of lower-case letters in the response, something the model must learn to
  produce rather than copy (the prompts of tests/test_ppo.py and tests/test_grpo.py).

Seeded, so a rerun writes the same bytes.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "configs" / "data"


def case_pairs(n: int, seed: int) -> list[dict]:
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


def upper_prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choices("BCDEFGH", k=rng.randint(3, 8)))} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "case_pairs.jsonl", case_pairs(240, seed=0))
    write_jsonl(OUT / "upper_prompts.jsonl", upper_prompts(256, seed=0))


if __name__ == "__main__":
    main()
