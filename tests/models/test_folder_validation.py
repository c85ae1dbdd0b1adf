"""A damaged model folder is one ValueError naming the file and the key or tensor: a
config.json without a required key or with a wrong type, a safetensors file whose header
is unreadable or whose tensor byte ranges run past the end of the file, a missing tensor;
and through the CLI, one line and exit 2."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import pytest

from jaxrlhf.cli import main
from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.loading import load_hf_folder, save_hf_folder
from jaxrlhf.models.transformer import init_params
from jaxrlhf.models.validate import check_safetensors_header

CFG = tiny_config(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_dim=8)  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_hf_folder(jax.device_get(init_params(jax.random.PRNGKey(0), CFG)), CFG, folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    out = tmp_path / "m"
    out.mkdir()
    for f in saved.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v != "DROP"}))


def test_intact_folder_loads(folder):
    cfg, _ = load_hf_folder(folder)
    assert cfg.num_heads == 2


def test_config_missing_a_required_key(folder):
    edit_config(folder, num_attention_heads="DROP")
    with pytest.raises(
        ValueError, match=r"m/config\.json is missing the required key 'num_attention_heads'$"
    ):
        load_hf_folder(folder)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden_size", "16", r"'hidden_size' must be a positive integer, got '16'"),
        ("num_hidden_layers", 0, r"'num_hidden_layers' must be a positive integer, got 0"),
        ("num_key_value_heads", 1.5, r"'num_key_value_heads' must be a positive integer"),
        ("rms_norm_eps", "tiny", r"'rms_norm_eps' must be a positive number, got 'tiny'"),
        ("tie_word_embeddings", "yes", r"'tie_word_embeddings' must be true or false"),
        ("eos_token_id", ["2"], r"'eos_token_id' must be an integer or a list of them"),
        ("model_type", 7, r"has no string 'model_type'"),
    ],
)
def test_config_with_a_wrong_type(folder, key, value, message):
    edit_config(folder, **{key: value})
    with pytest.raises(ValueError, match=r"config\.json.*" + message):
        load_hf_folder(folder)


def test_truncated_safetensors_names_the_tensor_beyond_the_end(folder):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    with pytest.raises(
        ValueError,
        match=rf"model\.safetensors is not a valid safetensors file: tensor '{last}' needs "
        r"bytes \[\d+, \d+\) of the data but the file holds \d+ \(truncated\?\)",
    ):
        load_hf_folder(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:5], r"5 bytes, too short for a header"),
        (lambda d: struct.pack("<Q", 10**12) + d[8:], r"the header claims \d+ bytes"),
        (lambda d: d[:8] + b"\xff" + d[9:], r"the header is not JSON"),
    ],
)
def test_unreadable_header(folder, damage, message):
    file = folder / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file: "):
        load_hf_folder(folder)
    with pytest.raises(ValueError, match=message):
        check_safetensors_header(file)


def test_offsets_that_do_not_match_the_shape(folder):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] * 2]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))  # same header length: the data stays where it was
    assert len(text) == n
    file.write_bytes(data[:8] + text + data[8 + n :])
    with pytest.raises(
        ValueError,
        match=rf"tensor '{name}' \(F32 \[32\]\) needs 128 bytes, its data_offsets span 64",
    ):
        load_hf_folder(folder)


def test_missing_tensor_is_named(folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"Missing tensors in .*m: \['model\.layers\.0\.mlp\.up_proj"
    ):
        load_hf_folder(folder)


def test_cli_reports_one_line_and_exit_2(folder, capsys):
    edit_config(folder, num_attention_heads="DROP")
    assert main(["generate", "--model", str(folder), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == (
        f"jaxrlhf generate: error: {folder}/config.json is missing the required key "
        "'num_attention_heads'\n"
    )
