"""The README's commands run as written: every ```bash block line that calls `jaxrlhf` on a
tiny config (`model.path: tiny`, no download or embedded model needed), and the `jaxrlhf
plot` lines after them, in order, through `jaxrlhf.cli.main`, must exit 0.

Run from the repository root (the configs' data paths are relative to it). `runs/...`
paths go under tmp_path; `mesh.data=1` and small step counts are appended (unless a line
sets them itself) so the whole file stays well under two minutes on CPU."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from jaxrlhf import cli

ROOT = Path(__file__).resolve().parents[1]
# Appended to a training line that does not set the key itself: a few steps prove the
# command runs; tests/test_ppo.py and friends check that the tiny configs learn.
SHORT = {
    "rm": ("max_steps=4",),
    "dpo": ("max_steps=4",),
    "ppo": ("num_iterations=3",),
    "grpo": ("max_steps=3",),
}


def bash_blocks(readme: str) -> list[list[str]]:
    """The command lines of every ```bash block (comments and blank lines dropped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", readme, flags=re.S | re.M)
    out = []
    for block in blocks:
        joined = block.replace("\\\n", " ")  # continued lines
        out.append([argv for line in joined.splitlines() if (argv := split(line))])
    return out


def split(line: str) -> list[str]:
    """A shell line's words; none for a line that opens a quote it closes on a later line
    (a remote command, never a tiny local one)."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return []


def is_tiny(argv: list[str]) -> bool:
    if "--config" not in argv:
        return False
    config = ROOT / argv[argv.index("--config") + 1]
    if not config.is_file():
        return False
    return (yaml.safe_load(config.read_text()).get("model") or {}).get("path") == "tiny"


def tiny_commands(readme: str) -> list[tuple[str, list[list[str]]]]:
    """(id, command lines) of each block holding a tiny training line: its tiny `jaxrlhf`
    lines and the `jaxrlhf plot` lines that follow them."""
    found = []
    for block in bash_blocks(readme):
        lines = [a for a in block if a[0].endswith("jaxrlhf")]
        keep = [a for a in lines if is_tiny(a)]
        if keep:
            keep += [a for a in lines if a[1] == "plot"]
            found.append(
                (keep[0][1] + ":" + Path(keep[0][keep[0].index("--config") + 1]).stem, keep)
            )
    return found


COMMANDS = tiny_commands((ROOT / "README.md").read_text())


def test_the_readme_has_a_tiny_command_for_every_algorithm():
    assert sorted(argv[1] for _, block in COMMANDS for argv in block[:1]) == sorted(SHORT)


def localize(argv: list[str], tmp_path: Path) -> list[str]:
    """The argument list for `cli.main`: `runs/...` under tmp_path, short runs, one device."""
    args = [str(tmp_path / a) if a.startswith("runs/") else a for a in argv[1:]]
    args = [
        f"run.run_dir={tmp_path / a.split('=', 1)[1]}" if a.startswith("run.run_dir=runs/") else a
        for a in args
    ]
    if args[0] in SHORT:
        keys = {a.split("=", 1)[0] for a in args if "=" in a}
        extra = [o for o in SHORT[args[0]] if o.split("=", 1)[0] not in keys]
        flags = [a for a in args if a.startswith("--") and a != "--config"]
        args = [a for a in args if a not in flags] + ["mesh.data=1", *extra] + flags
    return args


@pytest.mark.parametrize(("name", "block"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_readme_command_runs(name, block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for argv in block:
        args = localize(argv, tmp_path)
        code = cli.main(args)
        assert code == 0, (shlex.join(argv), capsys.readouterr().err)
