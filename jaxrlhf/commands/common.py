"""Set-up shared by the training commands: processes, mesh, base model, trainable tree."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.config import ModelSection, RunConfig, save_config
from jaxrlhf.lora import LoraConfig, init_lora, trainable_summary
from jaxrlhf.models.byte_tokenizer import VOCAB_SIZE, byte_tokenizer
from jaxrlhf.models.config import ModelConfig, tiny_config
from jaxrlhf.models.transformer import cast_params, init_head, init_params
from jaxrlhf.sharding import describe_mesh, per_device_bytes

_DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_init_distributed() -> None:
    """Join a multi-process run when one is configured (JAX_COORDINATOR_ADDRESS +
    JAX_NUM_PROCESSES + JAX_PROCESS_ID, or a cluster JAX detects: TPU pods, SLURM, ...)."""
    if jax.distributed.is_initialized():
        return
    address = next((os.environ[k] for k in _DIST_ENV if os.environ.get(k)), None)
    if address:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("JAXRLHF_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def load_base(model: ModelSection, *, seed: int = 0) -> tuple[ModelConfig, dict, Any]:
    """(config, params on host, tokenizer) for `model.path` (`tiny` builds a random model
    with the byte tokenizer)."""
    if model.path == "tiny":
        overrides = {
            "vocab_size": VOCAB_SIZE,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": (2,),
            **model.tiny,
        }
        if isinstance(overrides.get("eos_token_id"), list):
            overrides["eos_token_id"] = tuple(overrides["eos_token_id"])
        cfg = tiny_config(**overrides)
        if cfg.vocab_size < VOCAB_SIZE:
            raise ValueError(
                f"model.tiny.vocab_size must be >= {VOCAB_SIZE} for the byte tokenizer"
            )
        # On the host, as a loaded model (this process's own CPU device: multi-host safe).
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            params = jax.device_get(init_params(jax.random.PRNGKey(seed), cfg))
        tokenizer = byte_tokenizer()
    else:
        from jaxrlhf.models.loading import load_model

        cfg, params, tokenizer = load_model(model.path, dtype=jnp.float32)
        params = jax.device_get(params)
    cfg = cfg.replace(dtype=model.dtype, remat=model.remat)
    if model.adapter:
        params = merge_adapter_into_base(params, cfg, model.adapter)
    if model.param_dtype != "float32":
        params = cast_params(params, jnp.dtype(model.param_dtype))
    return cfg, params, tokenizer


def merge_adapter_into_base(params: dict, cfg: ModelConfig, adapter_dir: str) -> dict:
    """Fold a trained PEFT adapter (and its heads) into the base once, so "adapter off" means
    this model, not the raw base."""
    from jaxrlhf.lora import merge
    from jaxrlhf.peft_format import load_peft

    lora, lora_cfg = load_peft(adapter_dir, cfg)
    log(f"merged adapter {adapter_dir} (r={lora_cfg.r}) into the base")
    # On the host (this process's CPU device): no full copy of the base on an accelerator.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return jax.device_get(merge(params, lora, lora_cfg, with_heads=True))


def split_trainable(
    key: jax.Array,
    base: dict,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    heads: tuple[str, ...] = (),
) -> tuple[Any, Any]:
    """(trainable, frozen). LoRA: a fresh adapter over the frozen base (heads as
    modules_to_save). Full fine-tuning: a float32 copy of everything, heads added."""
    if lora_cfg is not None:
        missing = [h for h in heads if h not in lora_cfg.modules_to_save]
        if missing:
            raise ValueError(
                f"lora.modules_to_save must include {missing}: those heads start "
                f"random and must be trained"
            )
        return init_lora(key, base, lora_cfg, model_cfg), base
    trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), base)
    for i, head in enumerate(heads):
        if head not in trainable:
            trainable[head] = init_head(jax.random.fold_in(key, i), model_cfg, head)
    return trainable, None


def announce(
    mesh, *, frozen: Any, trainable: Any, opt_state: Any, extra: dict | None = None
) -> None:
    """Print the mesh, the per-device bytes of params / trainable / optimizer state and the
    trainable summary."""
    mib = 1024 * 1024
    log(f"mesh: {describe_mesh(mesh)}")
    parts = [
        f"frozen params {per_device_bytes(frozen) / mib:.1f} MiB"
        if frozen is not None
        else "frozen params 0 MiB (full fine-tuning)",
        f"trainable {per_device_bytes(trainable) / mib:.2f} MiB",
        f"optimizer {per_device_bytes(opt_state) / mib:.2f} MiB",
    ]
    for k, v in (extra or {}).items():
        parts.append(f"{k} {per_device_bytes(v) / mib:.1f} MiB")
    log("per-device bytes: " + ", ".join(parts))
    log(str(trainable_summary(trainable, frozen, opt_state)))


def prepare_run_dir(run: RunConfig, cfg: Any, *, resume: bool = False) -> None:
    """Create the run directory and save the config. A fresh run refuses a directory that
    already holds checkpoints, which a later --resume would otherwise mix up."""
    ckpt_dir = os.path.join(run.run_dir, "checkpoints")
    if not resume and os.path.isdir(ckpt_dir) and any(p.isdigit() for p in os.listdir(ckpt_dir)):
        raise ValueError(
            f"{ckpt_dir} already holds checkpoints; pass --resume to continue that "
            f"run or choose a new run.run_dir"
        )
    if jax.process_index() == 0:
        os.makedirs(run.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run.run_dir, "config.yaml"))


def host_batch(batch: dict, keys: tuple[str, ...] | None = None) -> dict:
    """Keep the arrays a step consumes, as int32/float32 numpy (no int64 on device)."""
    out = {}
    for k, v in batch.items():
        if keys is not None and k not in keys:
            continue
        v = np.asarray(v)
        out[k] = v.astype(np.int32) if v.dtype == np.int64 else v
    return out


def micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] on the host, for gradient accumulation."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(
                f"a batch of {x.shape[0]} does not split into {n} micro-batches; "
                f"make batch_size a multiple of optim.grad_accum_steps"
            )
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def gather_to_host(tree: Any) -> Any:
    """A (possibly sharded) tree as host numpy. Call on every process: with several
    processes, params split across hosts are all-gathered first, since no single process
    can fetch arrays that span non-addressable devices."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
