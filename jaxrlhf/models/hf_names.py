"""Mapping between Hugging Face tensor names (torch layout) and our stacked params tree.

HF stores a linear layer as `weight: [out, in]`; we store `kernel: [in, out]`, and stack
the decoder blocks on a leading axis. These two functions are each other's inverse.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.quant import is_quantized, stack

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def module_path(name: str) -> str:
    """HF module path of a projection inside block `{i}`, e.g. `self_attn.q_proj`."""
    return f"self_attn.{name}" if name in _ATTN else f"mlp.{name}"


def layer_tensor_names(cfg: ModelConfig) -> dict[tuple[str, str], str]:
    """(our module, leaf) -> HF name template with `{i}` for the block index."""
    names = {
        ("input_norm", "scale"): "model.layers.{i}.input_layernorm.weight",
        ("post_attn_norm", "scale"): "model.layers.{i}.post_attention_layernorm.weight",
    }
    for proj in _ATTN + _MLP:
        names[(proj, "kernel")] = f"model.layers.{{i}}.{module_path(proj)}.weight"
        if cfg.attention_bias and proj in ("q_proj", "k_proj", "v_proj"):
            names[(proj, "bias")] = f"model.layers.{{i}}.{module_path(proj)}.bias"
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the backbone and lm head (not the optional heads)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    proj_shape = {
        "q_proj": (cfg.q_size, d),
        "k_proj": (cfg.kv_size, d),
        "v_proj": (cfg.kv_size, d),
        "o_proj": (d, cfg.q_size),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for (mod, leaf), tmpl in layer_tensor_names(cfg).items():
        if leaf == "scale":
            shape = (d,)
        elif leaf == "bias":
            shape = (proj_shape[mod][0],)
        else:
            shape = proj_shape[mod]
        for i in range(cfg.num_layers):
            shapes[tmpl.format(i=i)] = shape
    return shapes


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, *, source: str = "checkpoint"
) -> dict:
    """Our params tree (numpy) from HF-named tensors. Checks every shape and refuses unknown
    names, naming the tensor at fault. `score.weight` and a `value` head are kept if present."""
    expected = expected_shapes(cfg)
    optional = {"score.weight", "lm_head.weight", "value.weight", "value.bias"}
    ignored = re.compile(r".*rotary_emb\.inv_freq$")
    unknown = [
        k for k in state_dict if k not in expected and k not in optional and not ignored.match(k)
    ]
    if unknown:
        raise ValueError(
            f"Unknown tensor names in {source}: {sorted(unknown)[:10]} "
            f"(expected a {cfg.model_type} checkpoint)"
        )
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(
            f"Missing tensors in {source}: {missing[:10]}"
            + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        )
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise ValueError(
                f"Shape mismatch for tensor {name!r} in {source}: "
                f"the config implies {shape}, the file has {got}"
            )

    def get(name: str, transpose: bool) -> np.ndarray:
        if is_quantized(state_dict[name]):  # kept in torch layout, read as its transpose
            return dataclasses.replace(state_dict[name], transposed=transpose)
        t = np.asarray(state_dict[name])
        return np.ascontiguousarray(t.T) if transpose else t

    layers: dict = {}
    for (mod, leaf), tmpl in layer_tensor_names(cfg).items():
        stacked = stack([get(tmpl.format(i=i), leaf == "kernel") for i in range(cfg.num_layers)])
        layers.setdefault(mod, {})[leaf] = stacked
    params: dict = {
        "embed": get("model.embed_tokens.weight", False),
        "layers": layers,
        "final_norm": {"scale": get("model.norm.weight", False)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", True)}
    if "score.weight" in state_dict:
        w = get("score.weight", True)
        if w.shape != (cfg.hidden_size, cfg.num_labels):
            raise ValueError(
                f"Shape mismatch for tensor 'score.weight' in {source}: expected "
                f"{(cfg.num_labels, cfg.hidden_size)}, the file has {w.T.shape}"
            )
        params["score"] = {"kernel": w}
    if "value.weight" in state_dict:
        params["value"] = {
            "kernel": get("value.weight", True),
            "bias": get("value.bias", False)
            if "value.bias" in state_dict
            else np.zeros((1,), np.float32),
        }
    return params


def state_dict_from_params(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named float32 numpy tensors from our params tree (inverse of the above)."""

    def np32(x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np32(params["embed"]),
        "model.norm.weight": np32(params["final_norm"]["scale"]),
    }
    if "lm_head" in params:
        out["lm_head.weight"] = np.ascontiguousarray(np32(params["lm_head"]["kernel"]).T)
    for (mod, leaf), tmpl in layer_tensor_names(cfg).items():
        stacked = np32(params["layers"][mod][leaf])
        for i in range(cfg.num_layers):
            t = stacked[i].T if leaf == "kernel" else stacked[i]
            out[tmpl.format(i=i)] = np.ascontiguousarray(t)
    if "score" in params:
        out["score.weight"] = np.ascontiguousarray(np32(params["score"]["kernel"]).T)
    if "value" in params:
        out["value.weight"] = np.ascontiguousarray(np32(params["value"]["kernel"]).T)
        out["value.bias"] = np32(params["value"]["bias"])
    return out


def parse_layer_name(name: str) -> tuple[int, str] | None:
    """`model.layers.3.self_attn.q_proj.weight` -> (3, 'self_attn.q_proj.weight')."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None
