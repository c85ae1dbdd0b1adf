"""Malformed inputs, generated: each one ends `jaxrlhf.cli.main` with exit code 2 and exactly
one line on stderr that names the file (and line or row), the field or the option at fault,
with no traceback and no checkpoint written.

Families: truncated and invalid JSON lines, rows with wrong types, empty strings or unknown
chat roles, integers Arrow cannot store, wrong file extensions, empty files, non-UTF-8 bytes,
CSV files missing a required column, and configs (overrides and YAML files) with wrong
types, out-of-range numbers and unknown keys. Every failure happens before training, in
well under a second once the first call has imported everything."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrlhf import cli
from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.config import to_dict
from jaxrlhf.data.rows import CHAT_ROLES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"rm": ROOT / "configs" / "rm_tiny.yaml", "ppo": ROOT / "configs" / "ppo_tiny.yaml"}
GOOD = {
    "rm": {"prompt": "say ab", "chosen": " AB", "rejected": " ab"},
    "ppo": {"prompt": "BCDE"},
}
FIELDS = {"rm": ("prompt", "chosen", "rejected"), "ppo": ("prompt",)}
REQUIRED = {"rm": ("chosen", "rejected"), "ppo": ("prompt",)}  # rm's prompt is optional
# derandomize: the same few hundred inputs every run, so the default suite cannot flake;
# raise max_examples (and drop derandomize) locally to explore further.
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

commands = st.sampled_from(sorted(CONFIGS))
line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"),
    min_size=1,
    max_size=30,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def run_cli(capsys, argv: list[str], run_dir: Path) -> str:
    """`cli.main(argv)`; asserts exit 2, one line on stderr, no traceback, no checkpoint.
    Returns the line."""
    capsys.readouterr()
    code = cli.main([*argv, f"run.run_dir={run_dir}", "run.progress=false"])
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    ckpt = run_dir / "checkpoints"
    assert not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())), ckpt
    return err


def run_data(capsys, workdir: Path, command: str, suffix: str, content: bytes) -> tuple[str, Path]:
    """Train `command` on a file holding `content`; the error line and the file."""
    folder = Path(tempfile.mkdtemp(dir=workdir))
    path = folder / f"data{suffix}"
    path.write_bytes(content)
    err = run_cli(
        capsys, [command, "--config", str(CONFIGS[command]), f"data.train={path}"], folder / "run"
    )
    assert str(path) in err, err
    return err, path


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def names_row(err: str, number: int) -> bool:
    """The 1-based row (or, for a file Arrow cannot read, the same line) is named."""
    return re.search(rf"\b(row|line) {number}\b", err) is not None


# ----------------------------------------------------------------------------- JSON


@st.composite
def broken_line(draw) -> str:
    """A line that is not valid JSON: a good row cut short, or arbitrary text."""
    text = json.dumps(draw(st.sampled_from(list(GOOD.values()))))
    line = draw(
        st.one_of(
            st.integers(1, len(text) - 1).map(lambda k: text[:k]),
            line_text,
        )
    )
    try:
        json.loads(line, parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError):
        return line
    return line + "{"  # arbitrary text that happened to be JSON: break it


@FUZZ
@given(
    command=commands,
    before=st.integers(0, 4),
    after=st.integers(0, 3),
    line=broken_line(),
    suffix=st.sampled_from([".jsonl", ".json"]),
)
def test_invalid_json_line_names_file_and_line(
    capsys, workdir, command, before, after, line, suffix
):
    good = json.dumps(GOOD[command])
    lines = [good] * before + [line] + [good] * after
    content = ("\n".join(lines) + "\n").encode()
    if suffix == ".json" and before == 0 and (after == 0 or line.lstrip().startswith("[")):
        # One JSON document, not lines (its error is where the parser stops, maybe the end):
        # the .json document case of test_data_sources.
        return
    err, _ = run_data(capsys, workdir, command, suffix, content)
    assert f"line {before + 1}:" in err, err


# ----------------------------------------------------------------------------- rows

unknown_role = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
    lambda r: r not in CHAT_ROLES
)
bad_values = st.one_of(
    st.integers(-(10**6), 10**6),
    st.integers(2**64, 2**80),  # beyond what Arrow stores
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.just(""),
    st.text(alphabet=" \t", min_size=1, max_size=4),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.lists(st.text(max_size=5), min_size=1, max_size=2),
    st.dictionaries(st.sampled_from(["x", "y"]), st.integers(), min_size=1, max_size=2),
    st.just([]),
    unknown_role.map(lambda r: [{"role": r, "content": "hello"}]),
    st.just([{"role": "user"}]),
    st.just([{"content": "hello"}]),
)


@FUZZ
@given(
    command=commands,
    before=st.integers(0, 4),
    after=st.integers(0, 3),
    data=st.data(),
    value=bad_values,
)
def test_bad_row_names_file_row_and_field(capsys, workdir, command, before, after, data, value):
    field = data.draw(st.sampled_from(FIELDS[command]))
    bad = {**GOOD[command], field: value}
    rows = [GOOD[command]] * before + [bad] + [GOOD[command]] * after
    err, _ = run_data(capsys, workdir, command, ".jsonl", jsonl(rows))
    assert names_row(err, before + 1), err
    assert f"'{field}'" in err or "fields" in err, err


@FUZZ
@given(before=st.integers(0, 4), margin=st.sampled_from(["big", "", None, [1.0], {"m": 1}]))
def test_bad_margin_names_row_and_field(capsys, workdir, before, margin):
    rows = [dict(GOOD["rm"], margin=1.0)] * before + [dict(GOOD["rm"], margin=margin)]
    err, _ = run_data(capsys, workdir, "rm", ".jsonl", jsonl(rows))
    assert names_row(err, before + 1) and "'margin'" in err, err


# ----------------------------------------------------------------------------- files


@FUZZ
@given(
    command=commands,
    suffix=st.one_of(
        st.sampled_from(["", ".txt", ".tsv", ".xlsx", ".yaml", ".gz", ".jsonl.bak"]),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=5)
        .map(lambda s: "." + s)
        .filter(lambda s: s not in (".json", ".jsonl", ".csv", ".parquet")),
    ),
)
def test_wrong_extension_says_what_is_accepted(capsys, workdir, command, suffix):
    err, _ = run_data(capsys, workdir, command, suffix, jsonl([GOOD[command]]))
    assert "unknown data file extension" in err and ".jsonl" in err and "dataset id" in err, err


@FUZZ
@given(
    command=commands,
    suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
    content=st.sampled_from([b"", b"\n", b"  \n\n", b"\t", b"\r\n"]),
)
def test_empty_file(capsys, workdir, command, suffix, content):
    err, _ = run_data(capsys, workdir, command, suffix, content)
    assert "the file is empty" in err, err


@FUZZ
@given(
    command=commands,
    before=st.integers(0, 4),
    junk=st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\xe9"]),
    suffix=st.sampled_from([".jsonl", ".csv"]),
)
def test_non_utf8_bytes_name_the_line(capsys, workdir, command, before, junk, suffix):
    if suffix == ".csv":
        header = ",".join(GOOD[command]).encode() + b"\n"
        row = ",".join(GOOD[command].values()).encode() + b"\n"
        content = header + row * before + b"caf" + junk + b"," * (len(GOOD[command]) - 1) + b"x\n"
        line = before + 2
    else:
        row = json.dumps(GOOD[command]).encode() + b"\n"
        content = row * before + b'{"prompt": "caf' + junk + b'"}\n'
        line = before + 1
    err, _ = run_data(capsys, workdir, command, suffix, content)
    assert f"line {line}: not UTF-8 text" in err, err


@FUZZ
@given(
    command=commands,
    data=st.data(),
    extra=st.lists(st.sampled_from(["answer", "notes", "id"]), unique=True, max_size=2),
    n_rows=st.integers(1, 5),
)
def test_csv_missing_a_column_names_file_and_column(capsys, workdir, command, data, extra, n_rows):
    required = list(REQUIRED[command])
    kept = data.draw(st.lists(st.sampled_from(required), unique=True, max_size=len(required) - 1))
    columns = kept + extra or ["other"]
    lines = [",".join(columns)] + [",".join(f"v{i}" for i in range(len(columns)))] * n_rows
    err, _ = run_data(capsys, workdir, command, ".csv", ("\n".join(lines) + "\n").encode())
    missing = [c for c in required if c not in kept]
    assert "rows have no" in err and any(f"'{c}' column" in err for c in missing), err


# ----------------------------------------------------------------------------- configs

NUMBER_OPTIONS = {
    # option: values that are out of range for it
    "batch_size": st.integers(-(10**9), 0),
    "max_steps": st.integers(-(10**9), 0),
    "eval_batch_size": st.integers(-(10**9), 0),
    "num_epochs": st.floats(-1e30, 0),
    "run.save_every": st.integers(-(10**9), 0),
    "run.keep_checkpoints": st.integers(-(10**9), 0),
    "optim.learning_rate": st.floats(-1e30, 0),
    "optim.grad_accum_steps": st.integers(-(10**9), 0),
    "optim.warmup_ratio": st.one_of(st.floats(1, 1e300), st.floats(-1e300, -1e-9)),
    "data.eval_fraction": st.one_of(st.floats(1, 1e300), st.floats(-1e300, -1e-9)),
    "data.max_length": st.integers(-(10**9), 1),
    "lora.r": st.integers(-(10**9), 0),
    "lora.dropout": st.floats(1, 1e30),
}
TYPED_OPTIONS = [
    "batch_size",
    "max_steps",
    "run.seed",
    "run.tensorboard",
    "data.skip_bad_rows",
    "data.max_length",
    "data.length_buckets",
    "optim.learning_rate",
    "optim.schedule",
    "lora.r",
    "lora.alpha",
    "model.dtype",
    "data",
    "optim",
]
wrong_values = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).filter(
        lambda s: s not in ("true", "false", "yes", "no", "on", "off", "null", "y", "n")
    ),
    st.just("[1, 2]"),
    st.just("{a: 1}"),
    st.just("[]"),
)
section = st.sampled_from(["", "optim.", "data.", "run.", "lora.", "model.", "mesh."])
key_name = st.from_regex(r"\A[a-z][a-z_]{0,10}\Z")


def rm_config(capsys, workdir, overrides: list[str], config: Path = CONFIGS["rm"]) -> str:
    run_dir = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    return run_cli(capsys, ["rm", "--config", str(config), *overrides], run_dir)


@FUZZ
@given(data=st.data(), option=st.sampled_from(sorted(NUMBER_OPTIONS)))
def test_out_of_range_number_names_the_option(capsys, workdir, data, option):
    value = data.draw(NUMBER_OPTIONS[option])
    err = rm_config(capsys, workdir, [f"{option}={value!r}"])
    assert f"{option} must be" in err, err


@FUZZ
@given(option=st.sampled_from(TYPED_OPTIONS), value=wrong_values)
def test_wrong_type_names_the_option(capsys, workdir, option, value):
    err = rm_config(capsys, workdir, [f"{option}={value}"])
    # "lora.r must be an integer, got 'abc'", "model.dtype='x' is not valid; ...",
    # "Unknown config key(s) data.a; ..." (a mapping where a section is expected).
    assert re.search(rf"error: (Unknown config key\(s\) )?{re.escape(option)}\b", err), err


def is_option(dotted: str) -> bool:
    node = to_dict(RMConfig())
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@FUZZ
@given(prefix=section, key=key_name)
def test_unknown_key_names_the_key(capsys, workdir, prefix, key):
    if is_option(prefix + key):
        return  # a real option
    err = rm_config(capsys, workdir, [f"{prefix}{key}=1"])
    assert f"Unknown config key(s) {prefix}{key};" in err, err


@FUZZ
@given(
    where=st.sampled_from(["top", "data", "optim", "lora"]),
    key=key_name,
    value=st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
)
def test_config_file_with_a_bad_key_or_value(capsys, workdir, where, key, value):
    raw = yaml.safe_load(CONFIGS["rm"].read_text())
    if where == "top":
        if is_option(key):
            return
        raw[key] = value
        expected = f"Unknown config key(s) {key};"
    else:
        raw[where] = value  # a section that is not a mapping
        expected = f"{where} must be a mapping"
    path = Path(tempfile.mkdtemp(dir=workdir)) / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    err = rm_config(capsys, workdir, [], config=path)
    assert expected in err, err
