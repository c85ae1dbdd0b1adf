"""`ModelConfig`: the architecture of one decoder family, built from a transformers config.

The families are one decoder with a few switches, not copies of it:

| switch                 | llama/mistral/qwen2 | qwen3   | gemma2/gemma3_text | phi3  | olmo2      | qwen3_moe/mixtral |
|------------------------|---------------------|---------|--------------------|-------|------------|-------------------|
| `norm_offset`          | 0 (`x·w`)           | 0       | 1 (`x·(1+w)`)      | 0     | 0          | 0                 |
| `norm_placement`       | pre                 | pre     | sandwich           | pre   | post       | pre               |
| `qk_norm`              | none                | head    | none / head (g3)   | none  | projection | head (qwen3_moe)  |
| `embed_scale`          | no                  | no      | sqrt(hidden)       | no    | no         | no                |
| `mlp_activation`       | silu                | silu    | gelu_tanh          | silu  | silu       | silu              |
| `fused_qkv`/`_gate_up` | no                  | no      | no                 | yes   | no         | no                |
| soft-caps, window      | window (mistral, qwen2) | window  | both (g2), window  | window| no         | window            |
| `num_experts`          | 0                   | 0       | 0                  | 0     | 0          | E (top-k routed)  |

Anything a config sets that the decoder does not implement is refused with an error that
names the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "qwen3_moe",
    "mixtral",
)

# model_type -> (causal LM class, sequence classification class) in transformers.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    "phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2ForSequenceClassification"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification"),
    "mixtral": ("MixtralForCausalLM", "MixtralForSequenceClassification"),
}
_GEMMA = ("gemma2", "gemma3_text")
_MOE = ("qwen3_moe", "mixtral")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary scaling: `linear` divides positions by `factor`; `llama3` rescales frequencies."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_labels: int = 1
    model_type: str = "llama"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of activations. Params may be stored in another dtype; see `cast_params`."""

    remat: Literal["none", "block"] = "none"
    """`block` recomputes each decoder block in the backward pass (less memory, ~1/3 more FLOPs)."""
    layer_loop: Literal["auto", "scan", "unroll"] = "auto"
    """How the uncached forward runs the blocks: `scan` (compile time flat in depth),
    `unroll` (a Python loop), `auto` (scan, but unrolled for bfloat16 on the CPU:
    `models.transformer.scans_layers`). The same numbers either way."""

    # ---- family switches (defaults are Llama's) -----------------------------------------
    norm_offset: float = 0.0
    """RMSNorm multiplies by `offset + w`: 0 for Llama, 1 for Gemma's `(1 + w)`."""
    norm_placement: Literal["pre", "sandwich", "post"] = "pre"
    """`pre`: x + f(norm(x)) (Llama). `sandwich`: x + norm(f(norm(x))) (Gemma 2/3, four norms
    a block). `post`: x + norm(f(x)) (OLMo 2)."""
    qk_norm: Literal["none", "head", "projection"] = "none"
    """RMSNorm on queries and keys before rope: per head over head_dim (Qwen3, Gemma 3) or
    over the whole projection (OLMo 2)."""
    embed_scale: bool = False
    """Multiply the embeddings by sqrt(hidden_size) (Gemma)."""
    mlp_activation: Literal["silu", "gelu_tanh"] = "silu"
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by `query_pre_attn_scalar ** -0.5` (Gemma), else head_dim's."""
    attn_logit_softcap: float | None = None
    """scores <- cap · tanh(scores / cap) before masking (Gemma 2)."""
    final_logit_softcap: float | None = None
    """LM logits <- cap · tanh(logits / cap) (Gemma 2)."""
    sliding_window: int | None = None
    """A query sees the keys at most `sliding_window - 1` positions back, on the layers
    `sliding_layers` marks (every layer when it is empty)."""
    sliding_layers: tuple[bool, ...] = ()
    local_rope_theta: float | None = None
    """Rope base of the sliding layers, which then take no rope scaling (Gemma 3)."""
    fused_qkv: bool = False
    """One `qkv_proj` [D, q + 2·kv] instead of q/k/v (Phi-3)."""
    fused_gate_up: bool = False
    """One `gate_up_proj` [D, 2F] (gate first) instead of gate/up (Phi-3)."""
    num_experts: int = 0
    """> 0: every block's MLP is a mixture of experts of size `intermediate_size` each."""
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to one (Mixtral always does)."""
    router_aux_loss_coef: float = 0.0
    moe_dispatch: Literal["dense", "ragged"] = "ragged"
    """How the experts run as one batched computation (see `transformer.moe_mlp`)."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"ModelConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}"
            )
        if self.layer_loop not in ("auto", "scan", "unroll"):
            raise ValueError(
                f"ModelConfig.layer_loop must be 'auto', 'scan' or 'unroll', got {self.layer_loop!r}"
            )
        if self.remat not in ("none", "block"):
            raise ValueError(f"ModelConfig.remat must be 'none' or 'block', got {self.remat!r}")
        choices = {
            "norm_placement": ("pre", "sandwich", "post"),
            "qk_norm": ("none", "head", "projection"),
            "mlp_activation": ("silu", "gelu_tanh"),
            "moe_dispatch": ("dense", "ragged"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window must be >= 1, got {self.sliding_window}")
        if self.sliding_layers:
            if len(self.sliding_layers) != self.num_layers:
                raise ValueError(
                    f"ModelConfig.sliding_layers has {len(self.sliding_layers)} entries for "
                    f"{self.num_layers} layers"
                )
            if any(self.sliding_layers) and self.sliding_window is None:
                raise ValueError(
                    "ModelConfig.sliding_layers marks layers but sliding_window is None"
                )
            object.__setattr__(self, "sliding_layers", tuple(bool(b) for b in self.sliding_layers))
        if self.num_experts < 0 or (
            self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts
        ):
            raise ValueError(
                f"ModelConfig.num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.num_experts and (self.fused_gate_up or self.mlp_activation != "silu"):
            raise ValueError("ModelConfig: experts are SwiGLU with separate gate/up kernels")

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the sliding window?"""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        return self.sliding_layers or (True,) * self.num_layers

    @property
    def projections(self) -> tuple[str, ...]:
        """Names of this family's projection kernels in a block (LoRA targets), HF's names."""
        attn = ("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")
        mlp = ("gate_up_proj",) if self.fused_gate_up else ("gate_proj", "up_proj")
        return (*attn, "o_proj", *mlp, "down_proj")

    @property
    def norm_names(self) -> tuple[str, ...]:
        """The block's norms (our names): pre-attention, after attention, before/after the MLP."""
        return {
            "pre": ("input_norm", "post_attn_norm"),
            "sandwich": ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm"),
            "post": ("post_attn_norm", "post_ffn_norm"),
        }[self.norm_placement]

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self, *, with_lm_head: bool = True) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.qk_norm != "none":
            attn += 2 * self.head_dim if self.qk_norm == "head" else self.q_size + self.kv_size
        mlp = 3 * d * f * max(self.num_experts, 1) + d * self.num_experts
        layer = attn + mlp + len(self.norm_names) * d
        head = 0 if (self.tie_word_embeddings or not with_lm_head) else d * v
        return v * d + self.num_layers * layer + d + head


def _rope_scaling_from_hf(raw: dict | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported (supported: 'linear', 'llama3', or none)"
    )


def _split_rope(raw: dict, model_type: str) -> tuple[dict | None, float, float | None]:
    """(global rope scaling dict, global theta, local theta) from either spelling: the old
    `rope_theta` / `rope_scaling` / `rope_local_base_freq` keys or transformers 5's
    `rope_parameters` (per layer type for Gemma 3: {"full_attention": ..., "sliding_attention": ...})."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    local_theta = None
    if "full_attention" in rope or "sliding_attention" in rope:
        local = rope.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ValueError(
                f"rope_parameters['sliding_attention'] rope_type={local['rope_type']!r} is not "
                f"supported (the local layers take plain rope)"
            )
        local_theta = local.get("rope_theta")
        rope = rope.get("full_attention") or {}
    if model_type == "gemma3_text" and local_theta is None:
        local_theta = raw.get("rope_local_base_freq", 10000.0)
    default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
    theta = raw.get("rope_theta") or rope.get("rope_theta") or default_theta
    factor = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise ValueError(f"Unsupported option partial_rotary_factor={factor} (only 1.0)")
    return rope, float(theta), None if local_theta is None else float(local_theta)


def _sliding_from_hf(raw: dict, model_type: str, num_layers: int) -> tuple[int | None, tuple]:
    """(window, per-layer flags) as transformers applies them: Qwen-family configs only with
    `use_sliding_window`; Gemma and the rest by `sliding_window` (+ `layer_types`)."""
    window = raw.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not raw.get("use_sliding_window"):
        window = None
    if window is None:
        return None, ()
    types = raw.get("layer_types")
    if types is None and model_type in ("qwen2", "qwen3"):
        start = raw.get("max_window_layers", num_layers)
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    if types is None and model_type in _GEMMA:
        period = 2 if model_type == "gemma2" else raw.get("sliding_window_pattern", 6)
        types = [
            "sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)
        ]
    if types is None:
        return int(window), ()
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"Unsupported layer_types {unknown} (supported: sliding, full attention)")
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    return int(window), tuple(t == "sliding_attention" for t in types)


# Options that change what a model computes and that the decoder does not implement: a
# config that sets one (to something other than the harmless value) is refused by name.
_REFUSED_IF_SET = (
    "mlp_bias",
    "use_bidirectional_attention",
    "clip_qkv",
    "router_jitter_noise",
    "shared_expert_intermediate_size",
)


def _key(raw: dict, key: str, default: Any) -> Any:
    """raw[key] when the config has the key (None included: "off"), else the default."""
    return raw[key] if key in raw else default


def config_from_hf(hf: Any, **overrides: Any) -> ModelConfig:
    """Build a `ModelConfig` from a transformers config object or its `config.json` dict."""
    raw = hf if isinstance(hf, dict) else hf.to_dict()
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported architecture model_type={model_type!r}; jaxrlhf supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    gemma = model_type in _GEMMA
    g2 = model_type == "gemma2"
    default_act = "gelu_pytorch_tanh" if gemma else "silu"
    act = raw.get("hidden_activation") or raw.get("hidden_act") or default_act
    activations = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if act not in activations:
        raise ValueError(
            f"Unsupported hidden_act={act!r} for {model_type} (supported: silu, gelu_pytorch_tanh)"
        )
    for key in _REFUSED_IF_SET:
        if raw.get(key):
            raise ValueError(f"Unsupported option {key}={raw[key]!r} for {model_type}")
    if raw.get("mlp_only_layers") or raw.get("decoder_sparse_step", 1) != 1:
        raise ValueError(
            "Unsupported options mlp_only_layers / decoder_sparse_step != 1: jaxrlhf stacks "
            "identical blocks, so every layer must be a mixture of experts"
        )
    num_heads = int(raw["num_attention_heads"])
    num_layers = int(raw["num_hidden_layers"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // num_heads
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
    attention_bias = bool(raw.get("attention_bias", model_type == "qwen2"))
    if attention_bias and model_type != "qwen2":
        raise ValueError(
            f"Unsupported option attention_bias=True for {model_type} (only Qwen2's q/k/v bias)"
        )
    rope, rope_theta, local_theta = _split_rope(raw, model_type)
    window, sliding_layers = _sliding_from_hf(raw, model_type, num_layers)
    num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    if model_type in _MOE and num_experts < 1:
        raise ValueError(f"{model_type}: num_experts must be >= 1")
    intermediate = (
        raw["moe_intermediate_size"] if model_type == "qwen3_moe" else raw["intermediate_size"]
    )
    kwargs: dict[str, Any] = dict(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling_from_hf(rope),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        attention_bias=attention_bias,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
        num_labels=int(raw.get("num_labels", len(raw.get("id2label") or {}) or 1)),
        model_type=model_type,
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos_ids,
        norm_offset=1.0 if gemma else 0.0,
        norm_placement="sandwich" if gemma else ("post" if model_type == "olmo2" else "pre"),
        qk_norm={"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head"}.get(
            model_type, "projection" if model_type == "olmo2" else "none"
        ),
        embed_scale=gemma,
        mlp_activation=activations[act],
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or 256) if gemma else None,
        # transformers' defaults where a config omits them: Gemma 2 caps at 50 and 30.
        attn_logit_softcap=_key(raw, "attn_logit_softcapping", 50.0 if g2 else None),
        final_logit_softcap=_key(raw, "final_logit_softcapping", 30.0 if g2 else None),
        sliding_window=window,
        sliding_layers=sliding_layers,
        local_rope_theta=local_theta,
        fused_qkv=model_type == "phi3",
        fused_gate_up=model_type == "phi3",
        num_experts=num_experts,
        num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0) if num_experts else 0,
        norm_topk_prob=bool(raw.get("norm_topk_prob", model_type == "mixtral")),
        router_aux_loss_coef=float(raw.get("router_aux_loss_coef") or 0.0),
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def to_hf_dict(cfg: ModelConfig) -> dict:
    """The `config.json` contents transformers needs to load our exported weights."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type][0]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu" if cfg.mlp_activation == "silu" else "gelu_pytorch_tanh",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id)
        if len(cfg.eos_token_id) != 1
        else cfg.eos_token_id[0],
    }
    if cfg.model_type == "llama":
        out["attention_bias"] = cfg.attention_bias
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope_scaling = {"rope_type": rs.kind, "factor": rs.factor}
        if rs.kind == "llama3":
            rope_scaling.update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
        out["rope_scaling"] = rope_scaling
    if cfg.model_type in _GEMMA:
        out["hidden_activation"] = out["hidden_act"]
        scalar = cfg.query_pre_attn_scalar
        out["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
        out["attn_logit_softcapping"] = cfg.attn_logit_softcap
        out["final_logit_softcapping"] = cfg.final_logit_softcap
    if cfg.model_type == "gemma3_text":
        full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(rope_scaling or {})}
        out.pop("rope_scaling", None)
        out["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta},
        }
    out["sliding_window"] = cfg.sliding_window
    if cfg.sliding_window is not None:
        out["use_sliding_window"] = True
        out["layer_types"] = [
            "sliding_attention" if s else "full_attention" for s in cfg.layer_is_sliding
        ]
        if cfg.model_type in ("mistral", "phi3", "mixtral"):
            del out["layer_types"]  # one window on every layer; these configs take no layer_types
    if cfg.num_experts:
        out["num_experts_per_tok"] = cfg.num_experts_per_tok
        out["router_aux_loss_coef"] = cfg.router_aux_loss_coef
        if cfg.model_type == "mixtral":
            out["num_local_experts"] = cfg.num_experts
        else:
            out["num_experts"] = cfg.num_experts
            out["moe_intermediate_size"] = cfg.intermediate_size
            out["norm_topk_prob"] = cfg.norm_topk_prob
    return out


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small random-init config for tests, smoke runs and benchmarks."""
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=(2,),
    )
    base.update(overrides)
    return ModelConfig(**base)


def rope_inv_freq(cfg: ModelConfig, *, local: bool = False):
    """Inverse frequencies of the rotary embedding, with `rope_scaling` applied (numpy);
    `local=True`: those of the sliding-window layers (`local_rope_theta`, when set)."""
    import numpy as np

    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    rs = cfg.rope_scaling
    if local:  # Gemma 3's sliding layers: their own base, no scaling
        theta = cfg.local_rope_theta or cfg.rope_theta
        inv = 1.0 / (theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
        return inv.astype(np.float32) if cfg.local_rope_theta else rope_inv_freq(cfg)
    if rs is None:
        return inv.astype(np.float32)
    if rs.kind == "linear":
        return (inv / rs.factor).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
