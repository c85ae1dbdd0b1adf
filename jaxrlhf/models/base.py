"""The frozen base of a run: `load_base(model_section)` -> (config, host params, tokenizer).

`model.path` is a local HF folder, a .gguf file, `default` (the embedded SmolLM2-135M) or
`tiny` (a small random model with the byte tokenizer). Weights stay on the host until the
run places them on its mesh, so no full copy ever sits on one device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxrlhf.models.byte_tokenizer import VOCAB_SIZE, byte_tokenizer
from jaxrlhf.models.config import ModelConfig, tiny_config
from jaxrlhf.models.quant import load_quantized, quant_summary, quantize_params
from jaxrlhf.models.transformer import cast_params, init_params

if TYPE_CHECKING:
    from jaxrlhf.config import ModelSection


def host_device() -> jax.Device:
    """This process's own CPU device: host-side work that is multi-host safe."""
    return jax.local_devices(backend="cpu")[0]


def load_base(model: ModelSection, *, seed: int = 0, log=print) -> tuple[ModelConfig, dict, Any]:
    """(config, params on host, tokenizer) for `model.path`."""
    quant = model.quant
    if model.path == "tiny":
        params, cfg, tokenizer = _tiny_base(model.tiny, seed)
    elif quant.kind == "gguf":  # the file's own blocks, never dequantized at load
        cfg, params, tokenizer = load_quantized(model.path, quant)
    else:
        from jaxrlhf.models.loading import load_model

        cfg, params, tokenizer = load_model(model.path, dtype=jnp.float32)
        params = jax.device_get(params)
    cfg = cfg.replace(dtype=model.dtype, remat=model.remat, layer_loop=model.layer_loop)
    cfg = with_router_aux_loss_coef(cfg, model.router_aux_loss_coef, path=model.path)
    if model.adapter:
        params = merge_adapter_into_base(params, cfg, model.adapter, log=log)
    if quant.kind in ("int8", "nf4"):
        params = quantize_params(params, quant)
    elif quant.kind == "gguf" and model.path == "tiny":
        raise ValueError("model.quant.kind=gguf keeps a .gguf file's blocks; model.path is tiny")
    if model.param_dtype != "float32":
        params = cast_params(params, jnp.dtype(model.param_dtype))  # quantized leaves stay
    if quant.kind != "none":
        log(f"frozen base stored as {quant.kind}: {quant_summary(params)}")
    return cfg, params, tokenizer


def with_router_aux_loss_coef(cfg: ModelConfig, coef: float | None, *, path: str) -> ModelConfig:
    """`cfg` with the training option `model.router_aux_loss_coef` in place of the
    checkpoint's (None keeps it); a non-zero one on a dense model is refused (as TRL)."""
    if coef is None:
        return cfg
    if coef != 0.0 and not cfg.num_experts:
        raise ValueError(
            f"model.router_aux_loss_coef={coef}: {path} is not a mixture of experts "
            f"(no router, so no load-balancing loss); remove the option or set it to 0"
        )
    return cfg.replace(router_aux_loss_coef=float(coef))


def _tiny_base(tiny: dict, seed: int) -> tuple[dict, ModelConfig, Any]:
    overrides = {
        "vocab_size": VOCAB_SIZE,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": (2,),
        **tiny,
    }
    if isinstance(overrides.get("eos_token_id"), list):
        overrides["eos_token_id"] = tuple(overrides["eos_token_id"])
    cfg = tiny_config(**overrides)
    if cfg.vocab_size < VOCAB_SIZE:
        raise ValueError(f"model.tiny.vocab_size must be >= {VOCAB_SIZE} for the byte tokenizer")
    with jax.default_device(host_device()):
        params = jax.device_get(init_params(jax.random.PRNGKey(seed), cfg))
    return params, cfg, byte_tokenizer()


def merge_adapter_into_base(params: dict, cfg: ModelConfig, adapter_dir: str, *, log=print) -> dict:
    """Fold a trained PEFT adapter (and its heads) into the base once, so "adapter off" means
    this model, not the raw base."""
    from jaxrlhf.lora import merge
    from jaxrlhf.peft_format import load_peft

    lora, lora_cfg = load_peft(adapter_dir, cfg)
    log(f"merged adapter {adapter_dir} (r={lora_cfg.r}) into the base")
    with jax.default_device(host_device()):
        return jax.device_get(merge(params, lora, lora_cfg, with_heads=True))
