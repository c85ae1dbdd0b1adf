"""Rebuild README.md's sections that come from docs/*.md.

Each docs/NAME.md is a chapter whose `# Title` opens the section `## Title` in the README
(every heading one level down). A README section is replaced when its heading matches a
chapter's title; everything else in the README is left as it is.

    python scripts/build_readme.py          # rewrite README.md
    python scripts/build_readme.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demote(text: str) -> str:
    """Every Markdown heading one level down, code blocks left alone."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#+ ", line) else line)
    return "\n".join(out)


def sections(readme: str) -> list[tuple[str, str]]:
    """(heading, body) of every `## ` section (the part before the first one: heading "")."""
    parts, heading, body, fenced = [], "", [], False
    for line in readme.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            parts.append((heading, "\n".join(body)))
            heading, body = line, []
        else:
            body.append(line)
    parts.append((heading, "\n".join(body)))
    return parts


def build(readme: str, docs: dict[str, str]) -> str:
    chapters = {}
    for text in docs.values():
        demoted = demote(text.strip())
        title, _, rest = demoted.partition("\n")
        chapters[title] = rest
    out = []
    for heading, body in sections(readme):
        if heading in chapters:
            body = chapters[heading] + "\n"
        out.append((heading + "\n" if heading else "") + body)
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    readme_path = ROOT / "README.md"
    docs = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
    old = readme_path.read_text()
    new = build(old, docs)
    if "--check" in sys.argv:
        return 0 if new == old else 1
    readme_path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
