"""What every driver does first and last: join the processes, prepare the run directory, build
the mesh, load the frozen base, announce the memory, restore a checkpoint, export."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf.config import RunConfig, save_config
from jaxrlhf.data import process_slice
from jaxrlhf.lora import LoraConfig, trainable_summary
from jaxrlhf.models.base import load_base
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.sharding import describe_mesh, gather_to_host, make_mesh, per_device_bytes
from jaxrlhf.train.checkpoint import Checkpointer

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


@dataclasses.dataclass(frozen=True)
class RunStart:
    """A run's mesh, its frozen base (host arrays) and tokenizer."""

    mesh: Mesh
    model_cfg: ModelConfig
    base: dict
    tokenizer: Any


def start_run(cfg: Any, *, resume: bool) -> RunStart:
    """Join the processes, prepare `cfg.run.run_dir`, build the mesh, load `cfg.model`."""
    maybe_init_distributed()
    prepare_run_dir(cfg.run, cfg, resume=resume)
    mesh = make_mesh(cfg.mesh)
    model_cfg, base, tokenizer = load_base(cfg.model, seed=cfg.run.seed, log=log)
    return RunStart(mesh=mesh, model_cfg=model_cfg, base=base, tokenizer=tokenizer)


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


def run_signature(cfg: Any) -> dict:
    """What a checkpoint must agree with to resume: the base model and the adapters' shapes
    (compute dtype, remat and the MoE aux-loss weight may change between runs; they do not
    change the state)."""
    from jaxrlhf.config import to_dict

    free = ("dtype", "remat", "router_aux_loss_coef")
    model = {k: v for k, v in to_dict(cfg.model).items() if k not in free}
    out = {"model": model, "lora": to_dict(cfg.lora)}
    if hasattr(cfg, "value_lora"):
        out["value_lora"] = to_dict(cfg.value_lora)
    return out


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        return [
            d
            for k in sorted(set(saved) | set(now))
            for d in _differences(saved.get(k), now.get(k), f"{where}.{k}" if where else k)
        ]
    return [] if saved == now else [f"{where}: checkpoint {saved!r}, this run {now!r}"]


def _check_signature(checkpointer: Checkpointer, cfg: Any) -> None:
    """Refuse checkpoints written for another model or adapter shape, naming what differs
    (read from the newest checkpoint whose metadata is readable; older ones lack it)."""
    for step in sorted(checkpointer.all_steps(), reverse=True):
        meta = checkpointer.read_meta(step)
        if meta is None:
            continue
        saved = meta.get("signature")
        if saved is None:
            return
        diff = _differences(saved, json.loads(json.dumps(run_signature(cfg))))
        if diff:
            raise ValueError(
                f"the checkpoints in {cfg.run.run_dir} were written for another configuration ("
                + "; ".join(diff)
                + "); resume with the same model and LoRA settings or start a new run.run_dir"
            )
        return


def restore_or_start(
    cfg: Any, state: Any, *, resume: bool, unit: str = "step"
) -> tuple[Checkpointer, Any, int, int]:
    """(checkpointer, state, data position, first step): with `--resume`, the newest
    checkpoint of the run that restores (at most `run.resume_from`; a newer one that fails
    is reported and set aside), refused if it was written for another model or adapter
    shape; else the fresh `state` at step 0."""
    run = cfg.run
    checkpointer = Checkpointer(Path(run.run_dir) / "checkpoints", keep=run.keep_checkpoints)
    if not resume or checkpointer.latest_step() is None:
        if run.resume_from is not None:
            raise FileNotFoundError(
                f"run.resume_from={run.resume_from}: no checkpoints in {run.run_dir}"
            )
        return checkpointer, state, 0, 0
    _check_signature(checkpointer, cfg)
    state, meta, start, failed = checkpointer.restore_newest_good(state, at_most=run.resume_from)
    for step, why in failed:
        aside = checkpointer.set_aside(step)
        log(f"warning: checkpoint {step} does not restore ({why}); moved to {aside}")
    if failed:
        log(f"warning: resuming from the previous intact checkpoint, {unit} {start}")
    for step in [s for s in checkpointer.all_steps() if s > start]:  # run.resume_from
        aside = checkpointer.set_aside(step)
        log(f"checkpoint {step} is newer than run.resume_from; moved to {aside}")
    position = int(meta["data_position"])
    log(f"resumed from {unit} {start} (data position {position})")
    return checkpointer, state, position, start


def micro_batches(batch: dict, n: int, *, axis: int = 0) -> dict:
    """[..., B, ...] -> [..., n, B/n, ...] (B at `axis`) on the host, for gradient
    accumulation."""

    def split(x):
        b = x.shape[axis]
        if b % n:
            raise ValueError(
                f"a batch of {b} does not split into {n} micro-batches; "
                f"make batch_size a multiple of optim.grad_accum_steps"
            )
        return x.reshape(*x.shape[:axis], n, b // n, *x.shape[axis + 1 :])

    return {k: split(v) for k, v in batch.items()}


def local_rows(batch: dict) -> dict:
    """This process's rows of a global host batch. Every process builds the same global batch
    (so all pick the same length bucket) and keeps its contiguous slice, which `shard_batch`
    assembles back into the global array."""
    n_proc = jax.process_count()
    if n_proc == 1:
        return batch
    return {
        k: process_slice(v, process_index=jax.process_index(), process_count=n_proc)
        for k, v in batch.items()
    }


def mean_metrics(records: list[dict]) -> dict:
    """The mean of each metric over a list of step records (device scalars)."""
    return jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *records)


def export_trained(
    cfg: Any,
    trainable: Any,
    model_cfg: ModelConfig,
    tokenizer: Any,
    *,
    task: str,
    out: Path | None = None,
) -> Path:
    """Process 0 writes what a run (`cfg`: run dir, adapter config, base) trained: a PEFT adapter (LoRA; heads not in its task left
    out, e.g. PPO's shared value head), else the full model as an HF folder — a
    *ForSequenceClassification one for SEQ_CLS (score head, num_labels, pad id)."""
    from jaxrlhf.models.loading import save_hf_folder
    from jaxrlhf.peft_format import export_merged, export_peft

    lora_cfg, base_name = cfg.lora, cfg.model.path
    out = out or Path(cfg.run.run_dir) / ("adapter" if lora_cfg is not None else "model")
    trainable = gather_to_host(trainable)  # collective: before process 0 alone goes on
    if jax.process_index() != 0:
        return out
    keep = ("score",) if task == "SEQ_CLS" else ()
    if lora_cfg is not None:
        saved = tuple(m for m in lora_cfg.modules_to_save if m in keep)
        trainable = {
            k: v for k, v in trainable.items() if k not in lora_cfg.modules_to_save or k in saved
        }
        export_cfg = dataclasses.replace(lora_cfg, modules_to_save=saved)
        export_peft(trainable, export_cfg, model_cfg, out, base_model_name_or_path=base_name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    elif task == "SEQ_CLS":
        export_merged(
            trainable,
            None,
            LoraConfig(task_type="SEQ_CLS", modules_to_save=("score",)),
            model_cfg,
            out,
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    else:
        save_hf_folder(
            {k: v for k, v in trainable.items() if k != "value"},
            model_cfg,
            out,
            tokenizer=tokenizer,
        )
    log(f"exported {'adapter' if lora_cfg is not None else 'model'} to {out}")
    return out


ENSEMBLE_FILE = "ensemble.json"


def export_ensemble(
    cfg: Any, stacked: Any, model_cfg: ModelConfig, tokenizer: Any, *, task: str
) -> Path:
    """K stacked adapters: `adapter/member_k/` (each a PEFT folder) and `adapter/ensemble.json`
    naming them (what `reward_model.path` reads as an ensemble), plus the stacked tree in
    `adapter/stacked.safetensors` ([K, ...] per leaf)."""
    from safetensors.numpy import save_file

    from jaxrlhf.lora import adapter_member

    out = Path(cfg.run.run_dir) / "adapter"
    stacked = gather_to_host(stacked)
    k = jax.tree.leaves(stacked)[0].shape[0]
    names = [f"member_{i}" for i in range(k)]
    for i, name in enumerate(names):
        export_trained(
            cfg, adapter_member(stacked, i), model_cfg, tokenizer, task=task, out=out / name
        )
    if jax.process_index() == 0:
        flat = jax.tree_util.tree_flatten_with_path(stacked)[0]
        save_file(
            {jax.tree_util.keystr(path): np.ascontiguousarray(x) for path, x in flat},
            str(out / "stacked.safetensors"),
        )
        (out / ENSEMBLE_FILE).write_text(json.dumps({"members": names}, indent=1))
        log(f"exported an ensemble of {k} adapters to {out}")
    return out
