"""Mapping between Hugging Face tensor names (torch layout) and our stacked params tree.

HF stores a linear layer as `weight: [out, in]`; we store `kernel: [in, out]`, and stack
the decoder blocks on a leading axis. These two functions are each other's inverse.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.quant import is_quantized, stack
from jaxrlhf.models.transformer import is_expert_projection, projection_shapes

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NORMS = {
    "input_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "pre_ffn_norm": "pre_feedforward_layernorm",
    "post_ffn_norm": "post_feedforward_layernorm",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
}
# Mixtral's checkpoints name the MoE block and its expert kernels in their own way.
_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _moe_block(cfg: ModelConfig | None) -> str:
    return "block_sparse_moe" if cfg is not None and cfg.model_type == "mixtral" else "mlp"


def module_path(name: str, cfg: ModelConfig | None = None, expert: int | None = None) -> str:
    """HF module path of a projection inside block `{i}`, e.g. `self_attn.q_proj`; of an
    expert's projection with `expert=e`, e.g. `mlp.experts.3.gate_proj`."""
    if name in _ATTN:
        return f"self_attn.{name}"
    if expert is not None:
        leaf = _MIXTRAL_EXPERT[name] if cfg is not None and cfg.model_type == "mixtral" else name
        return f"{_moe_block(cfg)}.experts.{expert}.{leaf}"
    return f"mlp.{name}"


def layer_tensor_names(cfg: ModelConfig) -> dict[tuple[str, ...], str]:
    """Path in our block tree (modules..., leaf) -> HF name template with `{i}` for the
    block index (and `{e}` for the expert index of an expert kernel)."""
    norms = [*cfg.norm_names, *(("q_norm", "k_norm") if cfg.qk_norm != "none" else ())]
    names = {(n, "scale"): f"model.layers.{{i}}.{_NORMS[n]}.weight" for n in norms}
    for proj in cfg.projections:
        if is_expert_projection(cfg, proj):
            path = module_path(proj, cfg, expert=0).replace(".0.", ".{e}.")
            names[("experts", proj, "kernel")] = f"model.layers.{{i}}.{path}.weight"
            continue
        names[(proj, "kernel")] = f"model.layers.{{i}}.{module_path(proj)}.weight"
        if cfg.attention_bias and proj in ("q_proj", "k_proj", "v_proj"):
            names[(proj, "bias")] = f"model.layers.{{i}}.{module_path(proj)}.bias"
    if cfg.num_experts:
        names[("router", "kernel")] = f"model.layers.{{i}}.{_moe_block(cfg)}.gate.weight"
    return names


def _tensor_shape(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[int, ...]:
    """HF (torch layout) shape of one block tensor, per expert for expert kernels."""
    d = cfg.hidden_size
    if path[-1] == "scale":
        sizes = {"q_norm": cfg.q_size, "k_norm": cfg.kv_size}
        return (
            (cfg.head_dim,)
            if cfg.qk_norm == "head" and path[0] in sizes
            else (sizes.get(path[0], d),)
        )
    if path[0] == "router":
        return (cfg.num_experts, d)
    i, o = projection_shapes(cfg)[path[-2]]
    return (o,) if path[-1] == "bias" else (o, i)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the backbone and lm head (not the optional heads)."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.norm.weight": (cfg.hidden_size,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for path, tmpl in layer_tensor_names(cfg).items():
        shape = _tensor_shape(cfg, path)
        for i in range(cfg.num_layers):
            for e in range(cfg.num_experts if "{e}" in tmpl else 1):
                shapes[tmpl.format(i=i, e=e)] = shape
    return shapes


WeightHook = Callable[[tuple[str, ...], Any], Any]


def _shape_of(state_dict: Mapping[str, Any], name: str) -> tuple[int, ...]:
    """A tensor's shape, without reading it when the mapping can tell (`loading.LazyTensors`)."""
    shape = getattr(state_dict, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(state_dict[name].shape)


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    cfg: ModelConfig,
    *,
    source: str = "checkpoint",
    weight_hook: WeightHook | None = None,
) -> dict:
    """Our params tree (numpy) from HF-named tensors. Checks every shape and refuses unknown
    names, naming the tensor at fault. `score.weight` and a `value` head are kept if present.

    Each tensor is read from `state_dict` once, when its place in the tree is built (a lazy
    mapping is read one tensor at a time), and `weight_hook(path, array)` — `path` its place
    in the tree, e.g. `("layers", "q_proj", "kernel")`, the array one layer's, in our layout —
    may replace it before the layers are stacked: a base is quantized while it loads
    (`models.quant.quantizing_hook`) without its float copy ever existing whole."""
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
        got = _shape_of(state_dict, name)
        if got != shape:
            raise ValueError(
                f"Shape mismatch for tensor {name!r} in {source}: "
                f"the config implies {shape}, the file has {got}"
            )

    def get(name: str, transpose: bool, path: tuple[str, ...] = ()) -> Any:
        w = state_dict[name]
        if is_quantized(w):  # kept in torch layout, read as its transpose
            w = dataclasses.replace(w, transposed=transpose)
        else:
            t = np.asarray(w)
            w = np.ascontiguousarray(t.T) if transpose else t
        return weight_hook(path, w) if weight_hook is not None and path else w

    def block_tensor(tmpl: str, i: int, transpose: bool, path: tuple[str, ...]) -> Any:
        if "{e}" not in tmpl:
            return get(tmpl.format(i=i), transpose, path)
        experts = [get(tmpl.format(i=i, e=e), transpose) for e in range(cfg.num_experts)]
        return stack(experts)

    layers: dict = {}
    for path, tmpl in layer_tensor_names(cfg).items():
        transpose = path[-1] == "kernel"
        where = ("layers", *path)
        stacked = stack([block_tensor(tmpl, i, transpose, where) for i in range(cfg.num_layers)])
        node = layers
        for key in path[:-2]:
            node = node.setdefault(key, {})
        node.setdefault(path[-2], {})[path[-1]] = stacked
    params: dict = {
        "embed": get("model.embed_tokens.weight", False, ("embed",)),
        "layers": layers,
        "final_norm": {"scale": get("model.norm.weight", False)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", True, ("lm_head", "kernel"))}
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
    for path, tmpl in layer_tensor_names(cfg).items():
        node = params["layers"]
        for key in path:
            node = node[key]
        stacked = np32(node)
        for i in range(cfg.num_layers):
            for e in range(cfg.num_experts if "{e}" in tmpl else 1):
                t = stacked[i, e] if "{e}" in tmpl else stacked[i]
                t = t.T if path[-1] == "kernel" else t
                out[tmpl.format(i=i, e=e)] = np.ascontiguousarray(t)
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
