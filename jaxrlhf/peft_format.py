"""The PEFT adapter format, both ways, and the merged Hugging Face export.

An adapter folder, as `peft` (0.21) writes it with `save_pretrained`:

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, ...}
    adapter_model.safetensors    torch layout, one tensor per block:
      base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
      base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]
      base_model.model.score.weight                                      [num_labels, D]
      base_model.model.value.weight, base_model.model.value.bias         [1, D], [1]

Our adapter tree stacks the blocks and uses `[in, out]` kernels (`lora_A: [L, in, r]`,
`lora_B: [L, r, out]`), so export is a transpose per block and import the inverse.

`modules_to_save` heads are saved by PEFT under the module's own name, without the
`modules_to_save.default.` wrapper prefix it uses in memory (verified against peft 0.21:
a `LlamaForSequenceClassification` with `modules_to_save=["score"]` saves
`base_model.model.score.weight`). The PPO `value` head has no Hugging Face module; we save
it by the same scheme as `base_model.model.value.{weight,bias}`. PEFT cannot put it into a
transformers model (`PeftModel.from_pretrained` skips those keys without a word), but
`load_peft` reads it back.

Mixture-of-experts models (`qwen3_moe`, `mixtral`): transformers 5 keeps a block's experts as
two 3-D parameters (`mlp.experts.gate_up_proj: [E, 2F, D]`, `mlp.experts.down_proj:
[E, D, F]`), which PEFT adapts through `target_parameters` (its `ParamWrapper`): per
parameter one `lora_A.weight: [r·E, in]` and `lora_B.weight: [out, r·E]`, expert e's delta
being `B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]`. When both are targeted the
wrappers nest in definition order: gate_up's factors are saved under
`mlp.experts.base_layer.lora_*`, down's under `mlp.experts.lora_*`. Our tree keeps gate and up
apart, so a PEFT gate_up adapter imports exactly (gate and up share its A), and an export
stacks gate's and up's factors block-diagonally: rank 2r, with every other factor zero-padded
to 2r and `lora_alpha` rescaled so `alpha / r` (or `alpha / sqrt(r)`) is unchanged.

`load_peft` also accepts keys that carry an adapter name (`lora_A.default.weight`,
`score.modules_to_save.default.weight`), as a raw `PeftModel.state_dict()` has them.
Only `.safetensors` is read: a pickled `adapter_model.bin` is refused (convert it with
`peft` first). PEFT features with no counterpart here (DoRA, per-module ranks, PiSSA-style
initialisations that rewrite the base weights, LoRA biases, ...) are refused by name.

    export_peft(lora, lora_cfg, model_cfg, "out/adapter")
    lora, lora_cfg = load_peft("out/adapter", model_cfg)
    export_merged(params, lora, lora_cfg, model_cfg, "out/merged", tokenizer=tok)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxrlhf.lora import HEADS, LoraConfig, merge, target_name, targeted_modules
from jaxrlhf.models.config import ARCHITECTURES, ModelConfig, to_hf_dict
from jaxrlhf.models.hf_names import module_path, state_dict_from_params
from jaxrlhf.models.loading import read_safetensors
from jaxrlhf.models.transformer import is_expert_projection, projection_shapes

Params = dict[str, Any]
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

_LORA_KEY = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.(?P<path>(?:self_attn|mlp|block_sparse_moe)\.[\w.]+?)"
    r"\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_EXPERT_KEY = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<inner>base_layer\.)?"
    r"lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)
# PEFT's `target_parameters` for transformers 5's fused experts, in nesting order (inner first).
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_HEAD_KEY = re.compile(
    r"^(?P<head>score|value)(?:\.modules_to_save(?:\.(?P<adapter>[^.]+))?)?\.(?P<leaf>weight|bias)$"
)

# adapter_config.json fields whose non-default values change what the adapter computes and
# that jaxrlhf does not implement; a file that sets one is refused rather than misread.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layers_to_transform": "adapting only some layers (layers_to_transform)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "use_qalora": "QALoRA",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
# Initialisations that rewrite the base weights: the adapter is only valid on that rewritten
# base unless it was converted at save time (which also resets init_lora_weights to true).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


# ----------------------------------------------------------------------------- export


def _proj_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Projection -> HF weight shape `[out, in]` (one expert's, for an expert stack)."""
    return {p: (o, i) for p, (i, o) in projection_shapes(model_cfg).items()}


def _flat_factors(lora: Params) -> dict[str, Params]:
    """Projection -> {lora_A, lora_B}, the expert stacks' included."""
    layers = lora.get("layers", {})
    return {**{k: v for k, v in layers.items() if k != "experts"}, **layers.get("experts", {})}


def _module_paths(model_cfg: ModelConfig, proj: str) -> list[tuple[int | None, str]]:
    """(expert or None, HF module path inside a block) of a projection."""
    if not is_expert_projection(model_cfg, proj):
        return [(None, module_path(proj))]
    return [(e, module_path(proj, model_cfg, expert=e)) for e in range(model_cfg.num_experts)]


def _check_tree(lora: Params, lora_cfg: LoraConfig, model_cfg: ModelConfig) -> tuple[str, ...]:
    targets = targeted_modules(lora_cfg, model_cfg)
    layers = _flat_factors(lora)
    if set(layers) != set(targets):
        raise ValueError(
            f"The adapter tree has projections {sorted(layers)} but lora_cfg targets "
            f"{list(targets)}; pass the LoraConfig the adapter was made with"
        )
    shapes = _proj_shapes(model_cfg)
    for proj in targets:
        out_dim, in_dim = shapes[proj]
        lead = (model_cfg.num_layers,)
        if is_expert_projection(model_cfg, proj):
            lead = (model_cfg.num_layers, model_cfg.num_experts)
        want = {
            "lora_A": (*lead, in_dim, lora_cfg.r),
            "lora_B": (*lead, lora_cfg.r, out_dim),
        }
        for leaf, shape in want.items():
            got = tuple(layers[proj][leaf].shape)
            if got != shape:
                raise ValueError(
                    f"adapter {proj}.{leaf} has shape {got}; lora_cfg (r={lora_cfg.r}) "
                    f"and the model config imply {shape}"
                )
    for head in lora_cfg.modules_to_save:
        if head not in lora:
            raise ValueError(
                f"lora_cfg.modules_to_save lists {head!r} but the adapter tree has no {head!r} head"
            )
    extra = [h for h in HEADS if h in lora and h not in lora_cfg.modules_to_save]
    if extra:
        raise ValueError(
            f"The adapter tree has heads {extra} that lora_cfg.modules_to_save does "
            f"not list; they would be lost. Pass the LoraConfig the adapter was made with"
        )
    return targets


def _np(x: Any) -> np.ndarray:
    arr = np.asarray(x)
    return arr if arr.dtype != np.float64 else arr.astype(np.float32)


def _alpha_json(alpha: float) -> int | float:
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def _expert_targets(lora_cfg: LoraConfig, model_cfg: ModelConfig) -> tuple[str, ...]:
    return tuple(
        p for p in targeted_modules(lora_cfg, model_cfg) if is_expert_projection(model_cfg, p)
    )


def _peft_parameters(lora_cfg: LoraConfig, model_cfg: ModelConfig) -> list[str]:
    """The `target_parameters` an export writes: gate_up if gate or up is adapted, down if
    down is."""
    experts = _expert_targets(lora_cfg, model_cfg)
    wanted = [bool({"gate_proj", "up_proj"} & set(experts)), "down_proj" in experts]
    return [p for p, w in zip(EXPERT_PARAMETERS, wanted, strict=True) if w]


def _peft_rank(lora_cfg: LoraConfig, model_cfg: ModelConfig) -> int:
    """The rank written to PEFT: 2r when gate and up are stacked into one gate_up factor."""
    gate_up = EXPERT_PARAMETERS[0] in _peft_parameters(lora_cfg, model_cfg)
    return 2 * lora_cfg.r if gate_up else lora_cfg.r


def _peft_alpha(lora_cfg: LoraConfig, model_cfg: ModelConfig) -> float:
    """lora_alpha for the written rank, so the scale alpha/r (alpha/sqrt(r)) is unchanged."""
    ratio = _peft_rank(lora_cfg, model_cfg) / lora_cfg.r
    return lora_cfg.alpha * (ratio**0.5 if lora_cfg.use_rslora else ratio)


def _pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero columns of A [..., in, r] and rows of B [..., r, out] up to `rank`: A·B unchanged."""
    extra = rank - a.shape[-1]
    lead = [(0, 0)] * (a.ndim - 2)
    return np.pad(a, (*lead, (0, 0), (0, extra))), np.pad(b, (*lead, (0, extra), (0, 0)))


def _expert_state_dict(
    factors: dict[str, Params], lora_cfg: LoraConfig, model_cfg: ModelConfig
) -> dict[str, np.ndarray]:
    """PEFT `target_parameters` tensors of the expert factors ([L, E, in, r] / [L, E, r, out])."""
    experts = _expert_targets(lora_cfg, model_cfg)
    params = _peft_parameters(lora_cfg, model_cfg)
    n_layers, n_exp, r = model_cfg.num_layers, model_cfg.num_experts, lora_cfg.r
    d, f = model_cfg.hidden_size, model_cfg.intermediate_size
    out: dict[str, np.ndarray] = {}
    stacked: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if EXPERT_PARAMETERS[0] in params:
        # gate_up = [gate | up] on the outputs: A = [A_gate | A_up], B = diag(B_gate, B_up).
        zero = (np.zeros((n_layers, n_exp, d, r), np.float32), np.zeros((n_layers, n_exp, r, f)))
        ga, gb = (
            (_np(factors["gate_proj"][k]) for k in ("lora_A", "lora_B"))
            if ("gate_proj" in experts)
            else zero
        )
        ua, ub = (
            (_np(factors["up_proj"][k]) for k in ("lora_A", "lora_B"))
            if ("up_proj" in experts)
            else zero
        )
        a = np.concatenate([ga, ua], axis=-1)
        b = np.zeros((n_layers, n_exp, 2 * r, 2 * f), np.float32)
        b[..., :r, :f], b[..., r:, f:] = gb, ub
        stacked[EXPERT_PARAMETERS[0]] = (a, b)
    if EXPERT_PARAMETERS[1] in params:
        dn = factors["down_proj"]
        stacked[EXPERT_PARAMETERS[1]] = _pad_rank(
            _np(dn["lora_A"]), _np(dn["lora_B"]), _peft_rank(lora_cfg, model_cfg)
        )
    for param, (a, b) in stacked.items():
        inner = len(params) == 2 and param == EXPERT_PARAMETERS[0]
        for i in range(n_layers):
            name = f"{PREFIX}model.layers.{i}.mlp.experts.{'base_layer.' if inner else ''}"
            # A [E, in, r] -> [E·r, in] (expert-major rows); B [E, r, out] -> [out, r·E].
            out[f"{name}lora_A.weight"] = np.ascontiguousarray(
                a[i].transpose(0, 2, 1).reshape(-1, a.shape[-2])
            )
            out[f"{name}lora_B.weight"] = np.ascontiguousarray(
                b[i].transpose(2, 1, 0).reshape(b.shape[-1], -1)
            )
    return out


def _expert_factors_from_peft(
    tensors: dict[tuple[int, bool, str], np.ndarray],
    parameters: list[str],
    model_cfg: ModelConfig,
    r: int,
    source: str,
) -> dict[str, dict[str, np.ndarray]]:
    """Our expert factors (gate/up/down, [L, E, in, r] / [L, E, r, out]) from PEFT's
    `target_parameters` tensors, keyed (layer, under base_layer?, 'A'|'B')."""
    unknown = sorted(set(parameters) - set(EXPERT_PARAMETERS))
    if unknown:
        raise ValueError(
            f"{source}: target_parameters {unknown} are not supported; jaxrlhf adapts the "
            f"expert parameters {list(EXPERT_PARAMETERS)}"
        )
    n_layers, n_exp = model_cfg.num_layers, model_cfg.num_experts
    d, f = model_cfg.hidden_size, model_cfg.intermediate_size
    shapes = {EXPERT_PARAMETERS[0]: (d, 2 * f), EXPERT_PARAMETERS[1]: (f, d)}
    ordered = [p for p in EXPERT_PARAMETERS if p in parameters]
    out: dict[str, dict[str, np.ndarray]] = {}
    for param in ordered:
        inner = len(ordered) == 2 and param == EXPERT_PARAMETERS[0]
        fan_in, fan_out = shapes[param]
        a_layers, b_layers = [], []
        for i in range(n_layers):
            key = f"{PREFIX}model.layers.{i}.mlp.experts.{'base_layer.' if inner else ''}lora_"
            for ab, want in (("A", (r * n_exp, fan_in)), ("B", (fan_out, r * n_exp))):
                if (i, inner, ab) not in tensors:
                    raise ValueError(f"{source}: missing tensor {key}{ab}.weight for {param}")
                got = tuple(tensors[(i, inner, ab)].shape)
                if got != want:
                    raise ValueError(
                        f"{source}: tensor {key}{ab}.weight has shape {got}; r={r}, "
                        f"{n_exp} experts and the model config imply {want} for {param}"
                    )
            a = tensors[(i, inner, "A")].astype(np.float32).reshape(n_exp, r, fan_in)
            b = tensors[(i, inner, "B")].astype(np.float32).reshape(fan_out, r, n_exp)
            a_layers.append(a.transpose(0, 2, 1))  # [E, in, r]
            b_layers.append(b.transpose(2, 1, 0))  # [E, r, out]
        a, b = np.stack(a_layers), np.stack(b_layers)
        if param == EXPERT_PARAMETERS[0]:  # gate first, then up, on the outputs
            out["gate_proj"] = {"lora_A": a, "lora_B": b[..., :f]}
            out["up_proj"] = {"lora_A": a, "lora_B": b[..., f:]}
        else:
            out["down_proj"] = {"lora_A": a, "lora_B": b}
    return out


def adapter_config_dict(
    lora_cfg: LoraConfig, model_cfg: ModelConfig, *, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """`adapter_config.json` as peft writes it (the long-standing fields only, so that older
    peft versions, which refuse unknown fields, read it too)."""
    if isinstance(lora_cfg.target_modules, str):
        target_modules: str | list[str] = lora_cfg.target_modules
    else:
        target_modules = [
            target_name(model_cfg, p)
            for p in targeted_modules(lora_cfg, model_cfg)
            if not is_expert_projection(model_cfg, p)
        ]
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True if lora_cfg.init == "kaiming" else "gaussian",
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": _alpha_json(_peft_alpha(lora_cfg, model_cfg)),
        "lora_dropout": lora_cfg.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": list(lora_cfg.modules_to_save) or None,
        "peft_type": "LORA",
        "r": _peft_rank(lora_cfg, model_cfg),
        "rank_pattern": {},
        "revision": None,
        "target_modules": target_modules or None,
        **(
            {"target_parameters": _peft_parameters(lora_cfg, model_cfg)}
            if _expert_targets(lora_cfg, model_cfg)
            else {}
        ),
        "task_type": lora_cfg.task_type,
        "use_dora": False,
        "use_rslora": lora_cfg.use_rslora,
    }


def adapter_state_dict(
    lora: Params, lora_cfg: LoraConfig, model_cfg: ModelConfig
) -> dict[str, np.ndarray]:
    """PEFT-named tensors in torch layout, as stored in `adapter_model.safetensors`."""
    targets = _check_tree(lora, lora_cfg, model_cfg)
    out: dict[str, np.ndarray] = {}
    factors = _flat_factors(lora)
    rank = _peft_rank(lora_cfg, model_cfg)
    out.update(_expert_state_dict(factors, lora_cfg, model_cfg))
    for proj in targets:
        if is_expert_projection(model_cfg, proj):
            continue
        a, b = _pad_rank(_np(factors[proj]["lora_A"]), _np(factors[proj]["lora_B"]), rank)
        for i in range(model_cfg.num_layers):
            for e, path in _module_paths(model_cfg, proj):
                a_i, b_i = (a[i], b[i]) if e is None else (a[i, e], b[i, e])
                name = f"{PREFIX}model.layers.{i}.{path}"
                out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_i.T)  # [r, in]
                out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_i.T)  # [out, r]
    for head in lora_cfg.modules_to_save:
        out[f"{PREFIX}{head}.weight"] = np.ascontiguousarray(_np(lora[head]["kernel"]).T)
        if "bias" in lora[head]:
            out[f"{PREFIX}{head}.bias"] = np.ascontiguousarray(_np(lora[head]["bias"]))
    return out


def export_peft(
    lora: Params,
    lora_cfg: LoraConfig,
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` so that
    `peft.PeftModel.from_pretrained(base, out_dir)` reproduces the adapted model (the
    `value` head excepted: it has no transformers module)."""
    tensors = adapter_state_dict(lora, lora_cfg, model_cfg)
    os.makedirs(out_dir, exist_ok=True)
    cfg = adapter_config_dict(lora_cfg, model_cfg, base_model_name_or_path=base_model_name_or_path)
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- import


def _lora_config_from_peft(
    raw: dict[str, Any], heads: set[str], source: str, expert_targets: tuple[str, ...] = ()
) -> LoraConfig:
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{source}: peft_type={raw.get('peft_type')!r}; only 'LORA' adapters can be loaded"
        )
    for field, what in _UNSUPPORTED.items():
        if raw.get(field):
            raise ValueError(
                f"{source}: {field}={raw[field]!r} is set, but jaxrlhf does not support {what}"
            )
    if raw.get("bias", "none") != "none":
        raise ValueError(
            f"{source}: bias={raw['bias']!r}; jaxrlhf adapters train no biases "
            f"(bias must be 'none')"
        )
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_BASE_REWRITING_INITS):
        raise ValueError(
            f"{source}: init_lora_weights={init!r} rewrites the base weights, so this adapter "
            f"only works on that rewritten base; save it from peft with "
            f"path_initial_model_for_weight_conversion= to get a plain LoRA adapter"
        )
    task_type = raw.get("task_type") or "CAUSAL_LM"
    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ValueError(
            f"{source}: task_type={task_type!r}; jaxrlhf loads CAUSAL_LM and SEQ_CLS adapters"
        )
    # PEFT appends its default classifier names ("classifier", "score") to a SEQ_CLS adapter's
    # modules_to_save, so duplicates and an unmatched "classifier" are normal.
    listed = []
    for m in raw.get("modules_to_save") or ():
        if m == "classifier" and task_type == "SEQ_CLS":
            continue
        if m not in HEADS:
            raise ValueError(
                f"{source}: modules_to_save lists {m!r}; jaxrlhf adapters can carry "
                f"only the heads {', '.join(HEADS)}"
            )
        if m not in listed:
            listed.append(m)
    missing = [m for m in listed if m not in heads]
    if missing:
        raise ValueError(
            f"{source}: modules_to_save lists {missing} but the weights file has no "
            f"such tensor (expected {PREFIX}{missing[0]}.weight)"
        )
    modules_to_save = tuple(listed) + tuple(h for h in HEADS if h in heads and h not in listed)
    target = raw.get("target_modules")
    if expert_targets:  # adapted through target_parameters: our per-expert projection names
        if isinstance(target, str):
            raise ValueError(
                f"{source}: a regex target_modules together with target_parameters is not "
                f"supported; list the module names"
            )
        target = [*(target or ()), *expert_targets]
    if not target:
        raise ValueError(f"{source}: target_modules is empty")
    if not isinstance(raw.get("r"), int):
        raise ValueError(f"{source}: r must be an integer rank, got {raw.get('r')!r}")
    try:
        return LoraConfig(
            r=raw["r"],
            alpha=float(raw.get("lora_alpha", 8)),
            dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=target if isinstance(target, str) else tuple(target),
            modules_to_save=modules_to_save,
            use_rslora=bool(raw.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
            task_type=task_type,
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def load_peft(
    path: str | os.PathLike, model_cfg: ModelConfig, *, dtype: Any = jnp.float32
) -> tuple[Params, LoraConfig]:
    """Read a PEFT LoRA folder (written by `peft` or by `export_peft`) into an adapter tree.

    Every tensor is checked: unknown names, shapes against `model_cfg`, and that each adapted
    projection has both factors in every block; errors name the tensor at fault.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"No {CONFIG_NAME} in {path!r}: not a PEFT adapter folder")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(
                f"{path!r} holds a pickled adapter_model.bin; jaxrlhf reads only safetensors. "
                f"Convert it: PeftModel.from_pretrained(base, path).save_pretrained(new_path)"
            )
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {path!r}")
    with open(cfg_path) as f:
        raw = json.load(f)
    tensors = read_safetensors(weights_path)

    # Sort every tensor into LoRA factors and heads, refusing anything else.
    paths = {
        path: (proj, e)
        for proj in model_cfg.projections
        for e, path in _module_paths(model_cfg, proj)
    }
    factors: dict[str, dict[str, dict[tuple, np.ndarray]]] = {}
    expert_tensors: dict[tuple[int, bool, str], np.ndarray] = {}
    head_tensors: dict[str, dict[str, np.ndarray]] = {}
    adapter_names: set[str] = set()
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        m = _LORA_KEY.match(name) if name != key else None
        h = _HEAD_KEY.match(name) if name != key else None
        x = _EXPERT_KEY.match(name) if name != key and model_cfg.num_experts else None
        if x:
            adapter_names.add(x["adapter"] or "")
            expert_tensors[(int(x["layer"]), bool(x["inner"]), x["ab"])] = value
        elif m and m["path"] in paths:
            if int(m["layer"]) >= model_cfg.num_layers:
                raise ValueError(
                    f"{weights_path}: tensor {key!r} is for block {m['layer']}, but "
                    f"the model has {model_cfg.num_layers} blocks"
                )
            adapter_names.add(m["adapter"] or "")
            proj, e = paths[m["path"]]
            factors.setdefault(proj, {}).setdefault(m["ab"], {})[(int(m["layer"]), e)] = value
        elif h:
            adapter_names.add(h["adapter"] or "")
            head_tensors.setdefault(h["head"], {})[h["leaf"]] = value
        else:
            raise ValueError(
                f"{weights_path}: unknown tensor {key!r}; expected LoRA factors named like "
                f"'{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight' or heads "
                f"'{PREFIX}score.weight' / '{PREFIX}value.weight'"
            )
    if len(adapter_names) > 1:
        names = ", ".join(repr(n) if n else "(no adapter name)" for n in sorted(adapter_names))
        raise ValueError(
            f"{weights_path}: tensors of several adapters ({names}); save one adapter per folder"
        )

    expert_factors = {}
    if raw.get("target_parameters") or expert_tensors:
        if not isinstance(raw.get("r"), int):
            raise ValueError(f"{cfg_path}: r must be an integer rank, got {raw.get('r')!r}")
        expert_factors = _expert_factors_from_peft(
            expert_tensors,
            list(raw.get("target_parameters") or ()),
            model_cfg,
            raw["r"],
            weights_path,
        )
    lora_cfg = _lora_config_from_peft(
        raw,
        set(head_tensors),
        cfg_path,
        tuple(target_name(model_cfg, p) for p in expert_factors),
    )
    try:
        targets = targeted_modules(lora_cfg, model_cfg)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    extra = sorted(set(factors) - set(targets))
    if extra:
        raise ValueError(
            f"{weights_path}: holds LoRA factors for {extra}, which "
            f"adapter_config.json's target_modules={raw['target_modules']!r} does not "
            f"target"
        )

    shapes = _proj_shapes(model_cfg)
    r = lora_cfg.r
    tree: Params = {"layers": {}}
    for proj in targets:
        if proj in expert_factors:
            tree["layers"].setdefault("experts", {})[proj] = {
                k: jnp.asarray(v, dtype) for k, v in expert_factors[proj].items()
            }
            continue
        out_dim, in_dim = shapes[proj]
        stacked = {}
        for ab, want in (("A", (r, in_dim)), ("B", (out_dim, r))):
            per_layer = factors.get(proj, {}).get(ab, {})
            blocks = []
            for i in range(model_cfg.num_layers):
                per_expert = []
                for e, path in _module_paths(model_cfg, proj):
                    key = f"{PREFIX}model.layers.{i}.{path}.lora_{ab}.weight"
                    if (i, e) not in per_layer:
                        raise ValueError(
                            f"{weights_path}: missing tensor {key!r}; jaxrlhf adapts {proj} in "
                            f"every block (and expert), so each needs lora_A and lora_B"
                        )
                    got = tuple(per_layer[(i, e)].shape)
                    if got != want:
                        raise ValueError(
                            f"{weights_path}: tensor {key!r} has shape {got}; r={r} and the "
                            f"model config imply {want}"
                        )
                    per_expert.append(per_layer[(i, e)].astype(np.float32).T)
                blocks.append(per_expert[0] if e is None else np.stack(per_expert))
            stacked[f"lora_{ab}"] = jnp.asarray(np.stack(blocks), dtype)
        if is_expert_projection(model_cfg, proj):
            tree["layers"].setdefault("experts", {})[proj] = stacked
        else:
            tree["layers"][proj] = stacked

    d = model_cfg.hidden_size
    head_shapes = {
        "score": {"weight": (model_cfg.num_labels, d)},
        "value": {"weight": (1, d), "bias": (1,)},
    }
    for head, leaves in head_tensors.items():
        want = head_shapes[head]
        for leaf, value in leaves.items():
            key = f"{PREFIX}{head}.{leaf}"
            if leaf not in want:
                raise ValueError(
                    f"{weights_path}: unknown tensor {key!r} (the {head} head has no {leaf})"
                )
            if tuple(value.shape) != want[leaf]:
                raise ValueError(
                    f"{weights_path}: tensor {key!r} has shape {tuple(value.shape)}; "
                    f"the model config implies {want[leaf]}"
                )
        if "weight" not in leaves:
            raise ValueError(f"{weights_path}: missing tensor '{PREFIX}{head}.weight'")
        tree[head] = {"kernel": jnp.asarray(leaves["weight"].astype(np.float32).T, dtype)}
        if head == "value":
            bias = leaves.get("bias", np.zeros((1,), np.float32))
            tree[head]["bias"] = jnp.asarray(bias.astype(np.float32), dtype)
    return tree, lora_cfg


# ----------------------------------------------------------------------------- merged export


def export_merged(
    params: Params,
    lora: Params | None,
    lora_cfg: LoraConfig | None,
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
) -> None:
    """Fold the adapter into the base (`W + s·A·B`, trained heads replacing the base's) and
    write a Hugging Face folder: `config.json` + `model.safetensors` (+ the tokenizer).

    A SEQ_CLS adapter becomes a `*ForSequenceClassification` (score head, `num_labels`,
    `pad_token_id`; no lm_head), loadable with `AutoModelForSequenceClassification`; a
    CAUSAL_LM one a `*ForCausalLM`. A `value` head, which has no transformers module, is
    written as `value.weight`/`value.bias`: transformers lists it as UNEXPECTED in its load
    report and skips it; jaxrlhf reads it back.
    With `lora=None` the base params are written as they are.
    """
    if lora is not None:
        if lora_cfg is None:
            raise ValueError("export_merged: pass the adapter's lora_cfg with the adapter")
        _check_tree(lora, lora_cfg, model_cfg)
        merged = merge(params, lora, lora_cfg)
    else:
        merged = params
    seq_cls = lora_cfg is not None and lora_cfg.task_type == "SEQ_CLS"
    hf_cfg = to_hf_dict(model_cfg)
    state = state_dict_from_params(merged, model_cfg)
    if seq_cls:
        if "score" not in merged:
            raise ValueError(
                "export_merged: a SEQ_CLS model needs a score head; the adapter "
                "and the base params have none"
            )
        if model_cfg.pad_token_id is None:
            raise ValueError(
                "export_merged: a SEQ_CLS model needs ModelConfig.pad_token_id (the "
                "transformers model finds the last token of each row by it)"
            )
        state.pop("lm_head.weight", None)
        hf_cfg["architectures"] = [ARCHITECTURES[model_cfg.model_type][1]]
        hf_cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(model_cfg.num_labels)}
        hf_cfg["label2id"] = {f"LABEL_{i}": i for i in range(model_cfg.num_labels)}
    else:
        state.pop("score.weight", None)
        hf_cfg["architectures"] = [ARCHITECTURES[model_cfg.model_type][0]]
    if model_cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
