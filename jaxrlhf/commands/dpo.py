"""`jaxrlhf dpo`: direct preference optimisation, LoRA (reference = adapter off) or full.

The flow mirrors `jaxrlhf rm`: tokenized pairs -> packed or unshared batches -> one jitted
step per batch with explicit shardings -> metrics / eval / Orbax checkpoints (exact resume,
SIGTERM-safe) -> the adapter exported in PEFT format (or the full model as an HF folder).
With `precompute_ref_logps` the reference log-probs of every train and eval pair are
computed once, kept on the host and attached to each batch by pair index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrlhf import data as D
from jaxrlhf.algorithms import dpo as A
from jaxrlhf.algorithms.common import TrainState, init_train_state
from jaxrlhf.commands.common import (
    announce,
    gather_to_host,
    host_batch,
    load_base,
    log,
    maybe_init_distributed,
    micro_batches,
    prepare_run_dir,
    split_trainable,
)
from jaxrlhf.commands.rm import load_preferences, local_rows, total_steps_for
from jaxrlhf.config import DPOConfig
from jaxrlhf.packing import pack_pairs
from jaxrlhf.sharding import (
    ShardedStep,
    make_mesh,
    put_tree,
    replicated,
    shard_batch,
    tree_shardings,
)
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.metrics import MetricsLogger
from jaxrlhf.train.optim import make_optimizer

RefLogps = tuple[np.ndarray, np.ndarray]


def dpo_batch(
    prefs: D.PreferenceData,
    idx: np.ndarray,
    *,
    pad_id: int,
    buckets: tuple[int, ...],
    batch_size: int,
    share_prompt: bool,
    ref: RefLogps | None = None,
) -> dict:
    """Host arrays for one batch of pairs `idx` of `prefs`: packed (prompt once, with
    `prev_index` and response masks) or chosen/rejected rows with response masks; plus the
    pairs' precomputed reference log-probs when `ref` ([N] chosen, [N] rejected) is given."""
    batch = D.pad_preference_batch(
        prefs, idx, pad_id=pad_id, buckets=buckets, batch_size=batch_size
    )
    if share_prompt:
        packed = pack_pairs(batch, pad_id=pad_id, buckets=buckets)
        out = {f"packed_{k}": v for k, v in packed.items() if f"packed_{k}" in A.PACKED_KEYS}
    else:
        out = {k: batch[k] for k in A.UNSHARED_KEYS}
    out["pair_mask"] = batch["pair_mask"]
    if ref is not None:
        # Dummy rows (pair_mask 0) repeat the first pair, as pad_preference_batch does.
        full = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])]).astype(np.int64)
        out["ref_chosen_logps"] = ref[0][full].astype(np.float32)
        out["ref_rejected_logps"] = ref[1][full].astype(np.float32)
    return host_batch(out)


def _ordered_batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


def precompute_ref_logps(
    ref_step,
    frozen,
    prefs: D.PreferenceData,
    *,
    mesh,
    pad_id: int,
    buckets: tuple[int, ...],
    batch_size: int,
    share_prompt: bool,
) -> RefLogps:
    """Reference log-probs of every pair of `prefs`, in order, as float32 numpy [N] x 2."""
    chosen, rejected = [], []
    for idx in _ordered_batches(len(prefs), batch_size):
        batch = dpo_batch(
            prefs,
            idx,
            pad_id=pad_id,
            buckets=buckets,
            batch_size=batch_size,
            share_prompt=share_prompt,
        )
        c, r = ref_step(frozen, shard_batch(local_rows(batch), mesh))
        chosen.append(np.asarray(c)[: len(idx)])
        rejected.append(np.asarray(r)[: len(idx)])
    return np.concatenate(chosen), np.concatenate(rejected)


def evaluate_dpo(
    eval_step,
    trainable,
    frozen,
    prefs: D.PreferenceData,
    *,
    mesh,
    pad_id: int,
    buckets: tuple[int, ...],
    batch_size: int,
    share_prompt: bool,
    ref: RefLogps | None,
    beta: float,
    loss_type: str,
    label_smoothing: float,
) -> dict:
    """DPO metrics over the whole eval set (in order, the last batch padded with masked pairs)."""
    outs: list[list[np.ndarray]] = [[], [], [], []]
    masks = []
    for idx in _ordered_batches(len(prefs), batch_size):
        batch = dpo_batch(
            prefs,
            idx,
            pad_id=pad_id,
            buckets=buckets,
            batch_size=batch_size,
            share_prompt=share_prompt,
            ref=ref,
        )
        for acc, x in zip(
            outs, eval_step(trainable, frozen, shard_batch(local_rows(batch), mesh)), strict=True
        ):
            acc.append(np.asarray(x))
        masks.append(batch["pair_mask"])
    return A.eval_metrics(
        *(np.concatenate(x) for x in outs),
        np.concatenate(masks),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )


def run_dpo(cfg: DPOConfig, *, resume: bool = False, source: Any = None) -> dict:
    """Train, evaluate, checkpoint and export a DPO policy. Returns a summary dict."""
    maybe_init_distributed()
    prepare_run_dir(cfg.run, cfg, resume=resume)
    mesh = make_mesh(cfg.mesh)
    model_cfg, base, tokenizer = load_base(cfg.model, seed=cfg.run.seed)
    splits = load_preferences(cfg.data, tokenizer, seed=cfg.run.seed, source=source)
    n_train = len(splits.train)
    # Computed once: the per-step batch order reads it for every pair of the train set.
    train_lengths = splits.train.batching_lengths(cfg.share_prompt)
    log(f"data: {n_train} train pairs, {len(splits.eval) if splits.eval else 0} eval pairs")
    total_steps = total_steps_for(n_train, cfg.batch_size, cfg.num_epochs, cfg.max_steps)

    key = jax.random.PRNGKey(cfg.run.seed)
    # LoRA: `frozen` is the base, read with the adapter (policy) and without (reference).
    # Full fine-tuning: the trainable tree is a float32 copy and `frozen` the reference.
    trainable, _ = split_trainable(key, base, model_cfg, cfg.lora)
    frozen = put_tree(base, mesh)
    del base
    frozen_sh = tree_shardings(frozen, mesh)
    optimizer = make_optimizer(cfg.optim, total_steps)
    state = init_train_state(trainable, optimizer, jax.random.fold_in(key, 1))
    state_sh = tree_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    pad_id = tokenizer.pad_token_id
    batching = {"pad_id": pad_id, "buckets": splits.buckets, "share_prompt": cfg.share_prompt}

    train_ref = eval_ref = None
    if cfg.precompute_ref_logps:
        ref_step = ShardedStep(
            A.make_ref_logps_step(model_cfg=model_cfg, loss_type=cfg.loss_type),
            mesh=mesh,
            arg_shardings=(frozen_sh, "batch"),
            out_shardings=replicated(mesh),
        )
        args = {"mesh": mesh, "batch_size": cfg.eval_batch_size, **batching}
        train_ref = precompute_ref_logps(ref_step, frozen, splits.train, **args)
        if splits.eval is not None:
            eval_ref = precompute_ref_logps(ref_step, frozen, splits.eval, **args)
        log(
            f"precomputed reference log-probs of {n_train + (len(splits.eval) if splits.eval else 0)} pairs"
        )
        if cfg.lora is None:  # the reference copy is no longer needed
            frozen, frozen_sh = None, None
    announce(mesh, frozen=frozen, trainable=state.trainable, opt_state=state.opt_state)

    train_step = ShardedStep(
        A.make_train_step(
            model_cfg=model_cfg,
            lora_cfg=cfg.lora,
            optimizer=optimizer,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
        ),
        mesh=mesh,
        arg_shardings=(state_sh, frozen_sh, "micro_batch"),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = ShardedStep(
        A.make_eval_step(model_cfg=model_cfg, lora_cfg=cfg.lora, loss_type=cfg.loss_type),
        mesh=mesh,
        arg_shardings=(state_sh.trainable, frozen_sh, "batch"),
        out_shardings=replicated(mesh),
    )

    checkpointer = Checkpointer(
        Path(cfg.run.run_dir) / "checkpoints", keep=cfg.run.keep_checkpoints
    )
    position, start_step = 0, 0
    if resume and checkpointer.latest_step() is not None:
        state, meta, start_step = checkpointer.restore(state)
        position = int(meta["data_position"])
        log(f"resumed from step {start_step} (data position {position})")
    host = {"position": position}

    def step_fn(state: TrainState):
        idx, host["position"] = D.batch_indices(
            n_train,
            batch_size=cfg.batch_size,
            seed=cfg.run.seed,
            position=host["position"],
            lengths=train_lengths,
        )
        batch = local_rows(
            dpo_batch(splits.train, idx, batch_size=len(idx), ref=train_ref, **batching)
        )
        mb = shard_batch(micro_batches(batch, cfg.optim.grad_accum_steps), mesh, batch_axis=1)
        return train_step(state, frozen, mb)

    def evaluate(state: TrainState) -> dict:
        if splits.eval is None:
            return {}
        return evaluate_dpo(
            eval_step,
            state.trainable,
            frozen,
            splits.eval,
            mesh=mesh,
            batch_size=cfg.eval_batch_size,
            ref=eval_ref,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
            **batching,
        )

    logger = MetricsLogger(cfg.run.run_dir, tensorboard=cfg.run.tensorboard)
    initial_eval = evaluate(state) if start_step == 0 else {}
    if initial_eval:
        logger.log(0, initial_eval, split="eval")
        log(
            f"eval before training: loss {initial_eval['loss']:.4f}, "
            f"accuracy {initial_eval['rewards/accuracies']:.3f}"
        )
    state = run_loop(
        state=state,
        start_step=start_step,
        total_steps=total_steps,
        train_step=step_fn,
        eval_fn=evaluate if splits.eval is not None else None,
        meta=lambda s: {"data_position": host["position"]},
        run=cfg.run,
        checkpointer=checkpointer,
        logger=logger,
        desc="dpo",
        bar_keys=("loss", "rewards/accuracies", "rewards/margins"),
    )
    final_eval = evaluate(state)
    logger.close()
    checkpointer.close()
    out_dir = export_policy(cfg, state.trainable, model_cfg, tokenizer)
    if final_eval:
        log(
            f"eval after training: loss {final_eval['loss']:.4f}, "
            f"accuracy {final_eval['rewards/accuracies']:.3f}, "
            f"margin {final_eval['rewards/margins']:.4f}"
        )
    return {
        "steps": total_steps,
        "eval_before": initial_eval,
        "eval": final_eval,
        "export": str(out_dir),
        "trainable": state.trainable,
        "model_cfg": model_cfg,
    }


def export_policy(cfg: DPOConfig, trainable, model_cfg, tokenizer) -> Path:
    """Process 0 writes the PEFT adapter (LoRA, CAUSAL_LM) or the full model (HF folder)."""
    from jaxrlhf.models.loading import save_hf_folder
    from jaxrlhf.peft_format import export_peft

    out = Path(cfg.run.run_dir) / ("adapter" if cfg.lora is not None else "model")
    trainable = gather_to_host(trainable)  # collective: before process 0 alone goes on
    if jax.process_index() != 0:
        return out
    if cfg.lora is not None:
        export_peft(trainable, cfg.lora, model_cfg, out, base_model_name_or_path=cfg.model.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    else:
        save_hf_folder(trainable, model_cfg, out, tokenizer=tokenizer)
    log(f"exported {'adapter' if cfg.lora is not None else 'model'} to {out}")
    return out
