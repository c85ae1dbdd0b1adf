"""Checks of a model folder before its contents are used: the keys and types of
`config.json`, and each safetensors header (byte ranges inside the file) before any tensor
data is read. Each failure is one ValueError naming the file and the key or tensor."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

# What every supported decoder's config.json must hold, as positive integers.
REQUIRED_INT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# Optional keys read as numbers when present (null means "use the default").
OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
OPTIONAL_FLOAT_KEYS = ("rms_norm_eps", "rope_theta")
OPTIONAL_BOOL_KEYS = ("tie_word_embeddings", "attention_bias")

# Bytes per element of the safetensors dtypes (the format's own list).
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# A header larger than this is not a real header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_hf_config(raw: Any, file: str | Path) -> None:
    """Refuse a `config.json` (already parsed) that lacks a required key or holds a value of
    the wrong type, naming the file and the key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    if not isinstance(raw.get("model_type"), str):
        raise ValueError(f"{file} has no string 'model_type' (e.g. \"llama\")")
    for key in REQUIRED_INT_KEYS:
        if key not in raw:
            raise ValueError(f"{file} is missing the required key {key!r}")
    for key in (*REQUIRED_INT_KEYS, *OPTIONAL_INT_KEYS):
        value = raw.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{file}: {key!r} must be a positive integer, got {value!r}")
    for key in OPTIONAL_FLOAT_KEYS:
        value = raw.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
        ):
            raise ValueError(f"{file}: {key!r} must be a positive number, got {value!r}")
    for key in OPTIONAL_BOOL_KEYS:
        value = raw.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{file}: {key!r} must be true or false, got {value!r}")
    eos = raw.get("eos_token_id")
    if eos is not None and not (
        _is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos))
    ):
        raise ValueError(
            f"{file}: 'eos_token_id' must be an integer or a list of them, got {eos!r}"
        )


def check_safetensors_header(file: str | Path) -> dict:
    """The header of a safetensors file, after checking that it parses and that every
    tensor's byte range fits its dtype and shape and lies inside the file; a ValueError
    naming the file and the tensor otherwise. No tensor data is read.

    Layout: 8 bytes little-endian header length n, n bytes of JSON
    `{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {...}}`, then the
    data, with offsets relative to byte 8 + n."""
    file = Path(file)
    bad = f"{file} is not a valid safetensors file"
    size = file.stat().st_size
    if size < 8:
        raise ValueError(f"{bad}: {size} bytes, too short for a header")
    with file.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(
                f"{bad}: the header claims {header_len} bytes but the file holds {size} "
                "(truncated or not safetensors)"
            )
        try:
            header = json.loads(fh.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{bad}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: the header is not a JSON object")
    data_bytes = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        _check_entry(bad, name, entry, data_bytes)
    return header


def _check_entry(bad: str, name: str, entry: Any, data_bytes: int) -> None:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"{bad}: tensor {name!r} lacks dtype, shape or data_offsets")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{bad}: tensor {name!r} has shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{bad}: tensor {name!r} has data_offsets {offsets!r}")
    start, end = offsets
    if end > data_bytes:
        raise ValueError(
            f"{bad}: tensor {name!r} needs bytes [{start}, {end}) of the data but the file "
            f"holds {data_bytes} (truncated?)"
        )
    itemsize = _DTYPE_BYTES.get(entry["dtype"])
    if itemsize is not None and end - start != math.prod(shape) * itemsize:
        raise ValueError(
            f"{bad}: tensor {name!r} ({entry['dtype']} {shape}) needs "
            f"{math.prod(shape) * itemsize} bytes, its data_offsets span {end - start}"
        )
