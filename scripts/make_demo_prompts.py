"""Rebuild jaxrlhf/assets/demo_prompts.txt: the openings of fortune-mod's cookies (BSD licence).

    apt-get download fortunes && dpkg -x fortunes_*.deb /tmp/fortunes
    python scripts/make_demo_prompts.py /tmp/fortunes/usr/share/games/fortunes

Takes the first 4-6 words of each entry's first line from a few family-friendly files,
keeps plain-ASCII openings of ordinary words, and draws 480 of them with seed 0.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

FILES = (
    "food",
    "love",
    "pets",
    "kids",
    "sports",
    "work",
    "people",
    "wisdom",
    "humorists",
    "literature",
    "education",
    "science",
    "art",
    "songs-poems",
    "platitudes",
)
WORD = re.compile(r"^[A-Za-z][A-Za-z']*,?$")


def openings(text: str, rng: random.Random) -> list[str]:
    out = []
    for entry in text.split("\n%\n"):
        first = entry.strip().split("\n")[0].strip()
        words = first.split()
        if len(words) < 5 or any(w.startswith("--") for w in words):
            continue
        k = rng.randint(4, 6)
        head = words[:k]
        if all(WORD.match(w) for w in head):
            out.append(" ".join(head).rstrip(","))
    return out


def main(folder: str, out: str = "jaxrlhf/assets/demo_prompts.txt", n: int = 480) -> None:
    rng = random.Random(0)
    pool: list[str] = []
    for name in FILES:
        path = Path(folder) / name
        if path.is_file():
            pool.extend(openings(path.read_text(encoding="latin-1"), rng))
    pool = sorted(set(pool))
    chosen = rng.sample(pool, min(n, len(pool)))
    header = (
        "# Openings of fortune-mod cookies (BSD licence; Debian package 'fortunes'),\n"
        "# first 4-6 words, drawn with seed 0 by scripts/make_demo_prompts.py.\n"
    )
    Path(out).write_text(header + "\n".join(chosen) + "\n")
    print(f"{len(chosen)} prompts of {len(pool)} -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
