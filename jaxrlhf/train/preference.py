"""The driver for training on a preference dataset (`jaxrlhf rm`, `dpo`, ...).

    pairs ──tokenize, split, buckets──> batch order (length-grouped, resumable)
          ──pair_batch (prompt once) ──> algorithm's step (sharded, donated) ──> metrics
          ──every eval_every: the whole eval set through the algorithm's eval step
          ──checkpoints (exact resume, SIGTERM-safe) ──> export (PEFT adapter or HF folder)

The algorithm (`algorithms.spec.PreferenceAlgorithm`) supplies its config, steps and
metrics; with `make_reference_step` and `precompute_reference(cfg)` its reference outputs
are computed once over the data and attached to every batch by pair index.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np

from jaxrlhf import data as D
from jaxrlhf.algorithms.common import init_train_state
from jaxrlhf.algorithms.spec import PreferenceAlgorithm
from jaxrlhf.lora import split_trainable, stack_adapters
from jaxrlhf.sharding import ShardedStep, put_tree, replicated, shard_batch, tree_shardings
from jaxrlhf.train.loop import train_with_evals
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.setup import (
    announce,
    export_ensemble,
    export_trained,
    local_rows,
    log,
    micro_batches,
    restore_or_start,
    start_run,
)


def total_steps_for(n_train: int, batch_size: int, num_epochs: float, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    return max(1, math.floor(num_epochs * D.steps_per_epoch(n_train, batch_size)))


def ordered_batches(n: int, batch_size: int):
    """Index batches over range(n) in order; the last may be short (padded by pair_batch)."""
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


def map_pairs(step, params, prefs: D.PreferenceData, *, mesh, batch_size: int, **batching):
    """Run `step(*params, batch)` over every pair of `prefs` in order; returns the outputs
    (a tuple or a dict of [B] arrays) concatenated over the real pairs, plus the pair
    masks and margins."""
    outs, masks, margins = [], [], []
    for idx in ordered_batches(len(prefs), batch_size):
        batch = D.pair_batch(prefs, idx, batch_size=batch_size, **batching)
        outs.append(jax.device_get(step(*params, shard_batch(local_rows(batch), mesh))))
        masks.append(batch["pair_mask"])
        margins.append(batch["margin"])
    # The pair axis is the last: [B], or [K, B] from K stacked adapters.
    joined = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=-1), *outs)
    return joined, np.concatenate(masks), np.concatenate(margins)


def train_preference(
    algo: PreferenceAlgorithm, cfg: Any, *, resume: bool = False, source: Any = None
) -> dict:
    """Train, evaluate, checkpoint and export `algo` with config `cfg`. `source` replaces
    `data.train` (rows or a `datasets.Dataset`). Returns a summary dict."""
    start = start_run(cfg, resume=resume)
    mesh, model_cfg = start.mesh, start.model_cfg
    prepare_rows = None
    if algo.prepare_rows is not None:
        prepare_rows = functools.partial(algo.prepare_rows, cfg)
    splits = D.load_preferences(
        cfg.data,
        start.tokenizer,
        seed=cfg.run.seed,
        source=source,
        log=log,
        prepare_rows=prepare_rows,
    )
    if algo.prepare_data is not None:
        splits = dataclasses.replace(
            splits,
            train=algo.prepare_data(cfg, splits.train),
            eval=None if splits.eval is None else algo.prepare_data(cfg, splits.eval),
        )
    n_train = len(splits.train)
    # Computed once: the per-step batch order reads it for every pair of the train set.
    train_lengths = splits.train.batching_lengths(cfg.share_prompt)
    log(f"data: {n_train} train pairs, {len(splits.eval) if splits.eval else 0} eval pairs")
    total_steps = total_steps_for(n_train, cfg.batch_size, cfg.num_epochs, cfg.max_steps)

    members = cfg.ensemble_size
    keys = [jax.random.PRNGKey(cfg.run.seed + k) for k in range(members)]  # member k: seed + k
    trainables = [
        split_trainable(k, start.base, model_cfg, cfg.lora, heads=algo.heads)[0] for k in keys
    ]
    frozen = None if cfg.lora is None else start.base
    if algo.needs_reference(cfg):
        frozen = start.base  # full fine-tuning: the base is the frozen reference copy
    frozen = None if frozen is None else put_tree(frozen, mesh)
    frozen_sh = None if frozen is None else tree_shardings(frozen, mesh)
    optimizer = make_optimizer(
        cfg.optim, total_steps, skip_nonfinite=cfg.run.on_nonfinite == "skip_step"
    )
    states = [
        init_train_state(t, optimizer, jax.random.fold_in(k, 1))
        for t, k in zip(trainables, keys, strict=True)
    ]
    # An ensemble is one state with a leading adapter axis (replicated: adapters are small).
    state = states[0] if members == 1 else stack_adapters(states)
    state_sh = tree_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    batching = {
        "pad_id": start.tokenizer.pad_token_id,
        "buckets": splits.buckets,
        "share_prompt": cfg.share_prompt,
    }

    train_extra = eval_extra = None
    if algo.make_reference_step is not None and algo.precompute_reference(cfg):
        ref_step = ShardedStep(
            algo.make_reference_step(cfg, model_cfg=model_cfg),
            mesh=mesh,
            arg_shardings=(frozen_sh, "batch"),
            out_shardings=replicated(mesh),
        )
        args = {"mesh": mesh, "batch_size": cfg.eval_batch_size, **batching}
        train_extra, _, _ = map_pairs(ref_step, (frozen,), splits.train, **args)
        if splits.eval is not None:
            eval_extra, _, _ = map_pairs(ref_step, (frozen,), splits.eval, **args)
        n_pairs = n_train + (len(splits.eval) if splits.eval else 0)
        log(f"precomputed reference outputs of {n_pairs} pairs")
        if cfg.lora is None:  # the reference copy is no longer needed
            frozen, frozen_sh = None, None
    announce(mesh, frozen=frozen, trainable=state.trainable, opt_state=state.opt_state)

    train_fn = algo.make_train_step(cfg, model_cfg=model_cfg, optimizer=optimizer)
    eval_fn = algo.make_eval_step(cfg, model_cfg=model_cfg)
    if members > 1:  # one compiled step for the K adapters; the frozen base is shared
        train_fn = jax.vmap(train_fn, in_axes=(0, None, 0))
        eval_fn = jax.vmap(eval_fn, in_axes=(0, None, None))
    train_step = ShardedStep(
        train_fn,
        mesh=mesh,
        arg_shardings=(
            state_sh,
            frozen_sh,
            "micro_batch" if members == 1 else "stacked_micro_batch",
        ),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = ShardedStep(
        eval_fn,
        mesh=mesh,
        arg_shardings=(state_sh.trainable, frozen_sh, "batch"),
        out_shardings=replicated(mesh),
    )
    checkpointer, state, position, start_step = restore_or_start(cfg, state, resume=resume)
    host = {"position": position}
    block_batches = algo.block_batches(cfg)

    def member_batch(k: int, position: int) -> dict:
        """Member k's batch (this process's rows) at `position`, in its own data order
        (seed + k)."""
        if block_batches:
            idx, _ = D.block_batch_indices(
                n_train, batch_size=cfg.batch_size, seed=cfg.run.seed + k, position=position
            )
        else:
            idx, _ = D.batch_indices(
                n_train,
                batch_size=cfg.batch_size,
                seed=cfg.run.seed + k,
                position=position,
                lengths=train_lengths,
            )
        batch = D.pair_batch(
            splits.train, idx, batch_size=len(idx), per_pair=train_extra, **batching
        )
        return local_rows(batch)

    def step_fn(state):
        position, host["position"] = host["position"], host["position"] + cfg.batch_size
        n_micro = cfg.optim.grad_accum_steps
        if members == 1:
            mb = micro_batches(member_batch(0, position), n_micro)
            return train_step(state, frozen, shard_batch(mb, mesh, batch_axis=1))
        batches = [member_batch(k, position) for k in range(members)]
        stacked = D.stack_batches(batches, pad_id=batching["pad_id"])
        mb = micro_batches(stacked, n_micro, axis=1)
        state, metrics = train_step(state, frozen, shard_batch(mb, mesh, batch_axis=2))
        # [K] per metric: the mean over members, and each member's loss.
        out = {name: v.mean() for name, v in metrics.items()}
        out.update({f"member_{k}/loss": metrics["loss"][k] for k in range(members)})
        return state, out

    def evaluate(state) -> dict:
        outputs, mask, margin = map_pairs(
            eval_step,
            (state.trainable, frozen),
            splits.eval,
            mesh=mesh,
            batch_size=cfg.eval_batch_size,
            per_pair=eval_extra,
            **batching,
        )
        if members == 1:
            return algo.eval_metrics(cfg, outputs, mask, margin)
        # The ensemble's mean output, and each member's metrics under member_k/.
        out = algo.eval_metrics(cfg, tuple(o.mean(axis=0) for o in outputs), mask, margin)
        for k in range(members):
            member = algo.eval_metrics(cfg, tuple(o[k] for o in outputs), mask, margin)
            out.update({f"member_{k}/{name}": v for name, v in member.items()})
        return out

    state, eval_before, eval_after = train_with_evals(
        cfg,
        state=state,
        start_step=start_step,
        total_steps=total_steps,
        train_step=step_fn,
        evaluate=evaluate if splits.eval is not None else None,
        position=lambda: host["position"],
        checkpointer=checkpointer,
        desc=algo.name,
        bar_keys=algo.bar_keys,
    )
    if members == 1:
        out_dir = export_trained(cfg, state.trainable, model_cfg, start.tokenizer, task=algo.task)
    else:
        out_dir = export_ensemble(cfg, state.trainable, model_cfg, start.tokenizer, task=algo.task)
    for when, metrics in (("before", eval_before), ("after", eval_after)):
        if metrics:
            shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in algo.summary_keys if k in metrics)
            log(f"eval {when} training: {shown}")
    return {
        "steps": total_steps,
        "eval_before": eval_before,
        "eval": eval_after,
        "export": str(out_dir),
        "trainable": state.trainable,
        "model_cfg": model_cfg,
    }
