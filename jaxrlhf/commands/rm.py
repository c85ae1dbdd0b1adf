"""`jaxrlhf rm`: train a Bradley–Terry reward model (LoRA SEQ_CLS, or full fine-tuning)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrlhf import data as D
from jaxrlhf.algorithms import reward_model as R
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
from jaxrlhf.config import PreferenceDataConfig, RMConfig
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

_PAIR_KEYS = (
    "chosen_input_ids",
    "chosen_attention_mask",
    "rejected_input_ids",
    "rejected_attention_mask",
    "margin",
    "pair_mask",
)


@dataclasses.dataclass(frozen=True)
class PreferenceSplits:
    train: D.PreferenceData
    eval: D.PreferenceData | None
    buckets: tuple[int, ...]
    report: D.TokenizeReport


def load_preferences(
    data_cfg: PreferenceDataConfig, tokenizer: Any, *, seed: int, source: Any = None
) -> PreferenceSplits:
    """Tokenized train/eval pairs from `data.train` (or an in-memory `source`)."""
    rows = D.load_rows(source if source is not None else data_cfg.train)
    prefs, report = D.tokenize_preferences(
        rows,
        tokenizer,
        max_length=data_cfg.max_length,
        max_prompt_length=data_cfg.max_prompt_length,
        skip_bad_rows=data_cfg.skip_bad_rows,
        add_eos=data_cfg.add_eos,
    )
    if report.n_skipped:
        log(
            f"data: skipped {report.n_skipped} bad rows of {report.n_rows} "
            f"(first: {report.skipped[:3]})"
        )
    if data_cfg.eval:
        eval_prefs, _ = D.tokenize_preferences(
            D.load_rows(data_cfg.eval),
            tokenizer,
            max_length=data_cfg.max_length,
            max_prompt_length=data_cfg.max_prompt_length,
            skip_bad_rows=data_cfg.skip_bad_rows,
            add_eos=data_cfg.add_eos,
        )
        train = prefs
    elif data_cfg.eval_fraction > 0 and len(prefs) > 1:
        tr, ev = D.train_eval_split(len(prefs), eval_fraction=data_cfg.eval_fraction, seed=seed)
        train, eval_prefs = prefs.select(tr), prefs.select(ev)
    else:
        train, eval_prefs = prefs, None
    buckets = tuple(data_cfg.length_buckets or D.default_buckets(data_cfg.max_length))
    return PreferenceSplits(train=train, eval=eval_prefs, buckets=buckets, report=report)


def pair_batch(
    prefs: D.PreferenceData,
    idx: np.ndarray,
    *,
    pad_id: int,
    buckets: tuple[int, ...],
    batch_size: int,
    share_prompt: bool,
) -> dict:
    """Host arrays for one batch of pairs: packed (prompt once) or chosen/rejected rows."""
    batch = D.pad_preference_batch(
        prefs, idx, pad_id=pad_id, buckets=buckets, batch_size=batch_size
    )
    if not share_prompt:
        return host_batch(batch, _PAIR_KEYS)
    # A packed pair (prompt once, two responses) can exceed the longest single sequence.
    packed = pack_pairs(
        batch, pad_id=pad_id, buckets=tuple(sorted({*buckets, *(2 * b for b in buckets)}))
    )
    out = {
        f"packed_{k}": v
        for k, v in packed.items()
        if k in ("input_ids", "attention_mask", "positions", "segment_ids")
    }
    out.update(
        chosen_last=packed["chosen_last"],
        rejected_last=packed["rejected_last"],
        margin=batch["margin"],
        pair_mask=batch["pair_mask"],
    )
    return host_batch(out)


def local_rows(batch: dict) -> dict:
    """This process's rows of a global host batch. Every process builds the same global batch
    (so all pick the same length bucket) and keeps its contiguous slice, which `shard_batch`
    assembles back into the global array."""
    n_proc = jax.process_count()
    if n_proc == 1:
        return batch
    return {
        k: D.process_slice(v, process_index=jax.process_index(), process_count=n_proc)
        for k, v in batch.items()
    }


def total_steps_for(n_train: int, batch_size: int, num_epochs: float, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    return max(1, math.floor(num_epochs * D.steps_per_epoch(n_train, batch_size)))


def run_rm(cfg: RMConfig, *, resume: bool = False, source: Any = None) -> dict:
    """Train, evaluate, checkpoint and export a reward model. Returns a summary dict."""
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
    trainable, frozen = split_trainable(key, base, model_cfg, cfg.lora, heads=("score",))
    optimizer = make_optimizer(cfg.optim, total_steps)
    frozen = None if frozen is None else put_tree(frozen, mesh)
    state = init_train_state(trainable, optimizer, jax.random.fold_in(key, 1))
    state_sh = tree_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    frozen_sh = None if frozen is None else tree_shardings(frozen, mesh)
    announce(mesh, frozen=frozen, trainable=state.trainable, opt_state=state.opt_state)

    train_step = ShardedStep(
        R.make_train_step(
            model_cfg=model_cfg,
            lora_cfg=cfg.lora,
            optimizer=optimizer,
            center_rewards_coefficient=cfg.center_rewards_coefficient,
        ),
        mesh=mesh,
        arg_shardings=(state_sh, frozen_sh, "micro_batch"),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = ShardedStep(
        R.make_eval_step(model_cfg=model_cfg, lora_cfg=cfg.lora),
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
    pad_id = tokenizer.pad_token_id

    def step_fn(state: TrainState):
        idx, host["position"] = D.batch_indices(
            n_train,
            batch_size=cfg.batch_size,
            seed=cfg.run.seed,
            position=host["position"],
            lengths=train_lengths,
        )
        batch = pair_batch(
            splits.train,
            idx,
            pad_id=pad_id,
            buckets=splits.buckets,
            batch_size=len(idx),
            share_prompt=cfg.share_prompt,
        )
        mb = shard_batch(
            micro_batches(local_rows(batch), cfg.optim.grad_accum_steps), mesh, batch_axis=1
        )
        return train_step(state, frozen, mb)

    def evaluate(state: TrainState) -> dict:
        if splits.eval is None:
            return {}
        return evaluate_pairs(
            eval_step,
            state.trainable,
            frozen,
            splits.eval,
            mesh=mesh,
            pad_id=pad_id,
            buckets=splits.buckets,
            batch_size=cfg.eval_batch_size,
            share_prompt=cfg.share_prompt,
        )

    logger = MetricsLogger(cfg.run.run_dir, tensorboard=cfg.run.tensorboard)
    initial_eval = evaluate(state) if start_step == 0 else {}
    if initial_eval:
        logger.log(0, initial_eval, split="eval")
        log(f"eval before training: accuracy {initial_eval['accuracy']:.3f}")
    last_eval: dict = {}
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
        desc="rm",
        bar_keys=("loss", "accuracy"),
        on_eval=lambda step, metrics: last_eval.update(metrics),
    )
    # The loop's last evaluation is of the final state; a run resumed at its end has none.
    final_eval = last_eval or evaluate(state)
    logger.close()
    checkpointer.close()
    out_dir = export_reward_model(cfg, state.trainable, base, model_cfg, tokenizer)
    if final_eval:
        log(
            f"eval after training: accuracy {final_eval['accuracy']:.3f}, "
            f"loss {final_eval['loss']:.4f}"
        )
    return {
        "steps": total_steps,
        "eval_before": initial_eval,
        "eval": final_eval,
        "export": str(out_dir),
        "trainable": state.trainable,
        "model_cfg": model_cfg,
    }


def evaluate_pairs(
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
) -> dict:
    """Metrics over the whole eval set (in order, last batch padded with masked pairs)."""
    rc, rr, masks, margins = [], [], [], []
    for start in range(0, len(prefs), batch_size):
        idx = np.arange(start, min(start + batch_size, len(prefs)))
        batch = pair_batch(
            prefs,
            idx,
            pad_id=pad_id,
            buckets=buckets,
            batch_size=batch_size,
            share_prompt=share_prompt,
        )
        c, r = eval_step(trainable, frozen, shard_batch(local_rows(batch), mesh))
        rc.append(np.asarray(c))
        rr.append(np.asarray(r))
        masks.append(batch["pair_mask"])
        margins.append(batch["margin"])
    return R.eval_metrics(
        np.concatenate(rc), np.concatenate(rr), np.concatenate(masks), np.concatenate(margins)
    )


def export_reward_model(cfg: RMConfig, trainable, base, model_cfg, tokenizer) -> Path | None:
    """Process 0 writes the PEFT adapter (LoRA) or the merged SEQ_CLS model (full)."""
    from jaxrlhf.lora import LoraConfig
    from jaxrlhf.peft_format import export_merged, export_peft

    out = Path(cfg.run.run_dir) / ("adapter" if cfg.lora is not None else "model")
    trainable = gather_to_host(trainable)  # collective: before process 0 alone goes on
    if jax.process_index() != 0:
        return out
    if cfg.lora is not None:
        export_peft(trainable, cfg.lora, model_cfg, out, base_model_name_or_path=cfg.model.path)
    else:  # a full *ForSequenceClassification folder (score head, num_labels, pad id)
        export_merged(
            trainable,
            None,
            LoraConfig(task_type="SEQ_CLS", modules_to_save=("score",)),
            model_cfg,
            out,
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    log(f"exported {'adapter' if cfg.lora is not None else 'model'} to {out}")
    return out
