"""`ModelConfig`: the architecture of a Llama-family decoder, built from a transformers config.

Llama, Mistral, Qwen2 and SmolLM2 (a Llama) differ only in a few switches: q/k/v bias
(Qwen2), tied embeddings, sliding windows (Mistral, unused at our lengths), rope scaling.
Anything else is refused with an error that names the option, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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
        if self.remat not in ("none", "block"):
            raise ValueError(f"ModelConfig.remat must be 'none' or 'block', got {self.remat!r}")

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
        layer = attn + 3 * d * f + 2 * d
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


def config_from_hf(hf: Any, **overrides: Any) -> ModelConfig:
    """Build a `ModelConfig` from a transformers config object or its `config.json` dict."""
    raw = hf if isinstance(hf, dict) else hf.to_dict()
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported architecture model_type={model_type!r}; jaxrlhf supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Unsupported hidden_act={act!r}: Llama-family models use 'silu'")
    if raw.get("mlp_bias"):
        raise ValueError("Unsupported option mlp_bias=True (no Llama-family checkpoint uses it)")
    if model_type == "qwen2" and raw.get("use_sliding_window"):
        raise ValueError("Unsupported option use_sliding_window=True for qwen2")
    num_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // num_heads
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
    attention_bias = bool(raw.get("attention_bias", model_type == "qwen2"))
    # Rope parameters moved to `rope_parameters` in recent transformers; accept both spellings.
    rope = raw.get("rope_scaling") or raw.get("rope_parameters")
    rope_theta = raw.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
    kwargs: dict[str, Any] = dict(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling_from_hf(rope),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        attention_bias=attention_bias,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        num_labels=int(raw.get("num_labels", len(raw.get("id2label") or {}) or 1)),
        model_type=model_type,
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos_ids,
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def to_hf_dict(cfg: ModelConfig) -> dict:
    """The `config.json` contents transformers needs to load our exported weights."""
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    out: dict[str, Any] = {
        "architectures": [arch[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
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
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": rs.kind, "factor": rs.factor}
        if rs.kind == "llama3":
            out["rope_scaling"].update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
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


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies of the rotary embedding, with `rope_scaling` applied (numpy)."""
    import numpy as np

    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    rs = cfg.rope_scaling
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
