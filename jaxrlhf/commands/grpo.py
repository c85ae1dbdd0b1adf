"""`jaxrlhf grpo`: GRPO with a LoRA policy over one frozen base (no critic)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import data as D
from jaxrlhf.algorithms import grpo as G
from jaxrlhf.algorithms.common import TrainState, init_train_state
from jaxrlhf.commands.common import (
    announce,
    load_base,
    log,
    maybe_init_distributed,
    prepare_run_dir,
    split_trainable,
)
from jaxrlhf.commands.ppo import evaluate_policy, export_policy
from jaxrlhf.commands.rollout import Sampler, Scorer, host_view, load_prompts, prompt_batch
from jaxrlhf.config import GRPOConfig
from jaxrlhf.sharding import ShardedStep, make_mesh, put_tree, replicated, tree_shardings
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.metrics import MetricsLogger
from jaxrlhf.train.optim import make_optimizer


def hyper_from(cfg: GRPOConfig) -> G.GRPOHyper:
    mini_batches = cfg.generation_batch_size // cfg.effective_mini_batch_size
    return G.GRPOHyper(
        num_generations=cfg.num_generations,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        temperature=cfg.generation.temperature,
        max_completion_length=cfg.generation.max_new_tokens,
        use_old_logprobs=cfg.num_iterations > 1 or mini_batches > 1,
        log_entropy=cfg.log_entropy,
        share_prompt=cfg.share_prompt,
    )


def run_grpo(
    cfg: GRPOConfig,
    *,
    resume: bool = False,
    source: Any = None,
    eval_hook: Callable[[list, list[str]], dict] | None = None,
) -> dict:
    """Train a policy with GRPO. `source` replaces `data.train` (rows or a `datasets`
    dataset); `eval_hook(prompts, completions) -> metrics` adds metrics to each evaluation.
    Returns a summary dict (evaluations, export folder, final state)."""
    maybe_init_distributed()
    prepare_run_dir(cfg.run, cfg, resume=resume)
    mesh = make_mesh(cfg.mesh)
    model_cfg, base_host, tokenizer = load_base(cfg.model, seed=cfg.run.seed)
    base = put_tree(base_host, mesh)
    splits = load_prompts(cfg.data, tokenizer, seed=cfg.run.seed, source=source)
    if len(splits.train) < cfg.prompts_per_iteration:
        raise ValueError(
            f"{len(splits.train)} training prompts, fewer than "
            f"prompts_per_iteration={cfg.prompts_per_iteration}"
        )
    scorer = Scorer(
        model_cfg=model_cfg,
        frozen=base,
        mesh=mesh,
        section=cfg.reward_model,
        funcs=cfg.reward_funcs,
        tokenizer=tokenizer,
        missing_eos_penalty=cfg.missing_eos_penalty,
        score_clip=None,
    )
    key = jax.random.PRNGKey(cfg.run.seed)
    # LoRA: a fresh adapter over the shared base. Full fine-tuning: a float32 copy is trained
    # and `base` stays as the frozen reference.
    policy, _ = split_trainable(key, base_host if cfg.lora is None else base, model_cfg, cfg.lora)
    frozen = base
    hyper = hyper_from(cfg)
    batch_size, mini = cfg.generation_batch_size, cfg.effective_mini_batch_size
    n_mb = batch_size // mini
    optimizer = make_optimizer(cfg.optim, cfg.max_steps * cfg.num_iterations * n_mb)
    state = init_train_state(policy, optimizer, jax.random.fold_in(key, 7))
    state_sh = tree_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    frozen_sh = tree_shardings(frozen, mesh)
    announce(
        mesh,
        frozen=frozen if cfg.lora is not None else None,
        trainable=state.trainable,
        opt_state=state.opt_state,
        extra={"reference copy": frozen} if cfg.lora is None else None,
    )

    eos = tuple(model_cfg.eos_token_id) or (
        (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    )
    sampler = Sampler(
        model_cfg,
        cfg.generation,
        lora_cfg=cfg.lora,
        eos_token_ids=eos,
        pad_token_id=tokenizer.pad_token_id,
        mesh=mesh,
    )
    steps: dict[int, tuple] = {}

    def steps_for(prompt_len: int):
        """The compiled prepare and update steps for one prompt bucket."""
        if prompt_len not in steps:
            prep = G.make_prepare_fn(
                model_cfg=model_cfg, lora_cfg=cfg.lora, hyper=hyper, prompt_len=prompt_len
            )
            upd = G.make_update_fn(
                model_cfg=model_cfg,
                lora_cfg=cfg.lora,
                hyper=hyper,
                optimizer=optimizer,
                prompt_len=prompt_len,
                micro_batches=cfg.optim.grad_accum_steps,
            )
            steps[prompt_len] = (
                ShardedStep(
                    prep,
                    mesh=mesh,
                    arg_shardings=(state_sh.trainable, frozen_sh, "batch", "batch"),
                    out_shardings=(None, replicated(mesh)),
                ),
                ShardedStep(
                    upd,
                    mesh=mesh,
                    # Indices split like the batch: replicated ones made the gathered
                    # minibatch replicated, so every device ran all of it.
                    arg_shardings=(state_sh, frozen_sh, "batch", "batch"),
                    out_shardings=(state_sh, replicated(mesh)),
                    donate_argnums=(0,),
                ),
            )
        return steps[prompt_len]

    checkpointer = Checkpointer(
        Path(cfg.run.run_dir) / "checkpoints", keep=cfg.run.keep_checkpoints
    )
    position, start = 0, 0
    if resume and checkpointer.latest_step() is not None:
        state, meta, start = checkpointer.restore(state)
        position = int(meta["data_position"])
        log(f"resumed from iteration {start} (prompt position {position})")
    host = {"position": position}
    n_train, pad_id = len(splits.train), tokenizer.pad_token_id

    def iteration(state: TrainState):
        idx, host["position"] = D.batch_indices(
            n_train,
            batch_size=cfg.prompts_per_iteration,
            seed=cfg.run.seed,
            position=host["position"],
        )
        prompts, values, columns = prompt_batch(
            splits.train,
            idx,
            pad_id=pad_id,
            buckets=splits.buckets,
            mesh=mesh,
            repeat=cfg.num_generations,
        )
        rng, k_sample, k_perm = jax.random.split(state.rng, 3)
        state = state.replace(rng=rng)
        t0 = time.perf_counter()
        rollout = sampler(
            state.trainable, frozen, prompts, k_sample, prompt_repeats=cfg.num_generations
        )
        scores, score_metrics, _ = scorer(rollout, values, columns)
        jax.block_until_ready(rollout["input_ids"])
        t1 = time.perf_counter()
        prepare_step, update_step = steps_for(prompts["input_ids"].shape[1])
        rollout_in = {
            k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask", "finished")
        }
        batch, metrics = prepare_step(state.trainable, frozen, rollout_in, jnp.asarray(scores))
        update_metrics = []
        for epoch in range(cfg.num_iterations):
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_perm, epoch), batch_size))
            if cfg.share_prompt:  # shuffle whole groups: each micro-batch packs its prompts
                g = cfg.num_generations
                perm = (perm[perm % g == 0][:, None] + np.arange(g)).reshape(-1)
            for j in range(n_mb):
                state, m = update_step(
                    state, frozen, batch, jnp.asarray(perm[j * mini : (j + 1) * mini])
                )
                update_metrics.append(m)
        jax.block_until_ready(state.step)
        t2 = time.perf_counter()
        n_tokens = float(np.sum(host_view(rollout["response_mask"])))
        upd = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *update_metrics)
        score_metrics = {k: v for k, v in score_metrics.items() if k != "rewards/total"}
        out = {
            **metrics,
            **score_metrics,
            **upd,
            "time/rollout_tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
            "time/update_tokens_per_s": n_tokens * cfg.num_iterations / max(t2 - t1, 1e-9),
        }
        return state, out

    def evaluate(state: TrainState) -> dict:
        if splits.eval is None:
            return {}
        return evaluate_policy(
            state.trainable,
            frozen,
            splits.eval,
            sampler=sampler,
            scorer=scorer,
            mesh=mesh,
            pad_id=pad_id,
            buckets=splits.buckets,
            batch_size=cfg.eval_prompts_batch,
            model_cfg=model_cfg,
            temperature=cfg.generation.temperature,
            eval_hook=eval_hook,
            seed=cfg.run.seed,
            lora_cfg=cfg.lora,
        )

    logger = MetricsLogger(cfg.run.run_dir, tensorboard=cfg.run.tensorboard)
    initial = evaluate(state) if start == 0 else {}
    if initial:
        logger.log(0, initial, split="eval")
    state = run_loop(
        state=state,
        start_step=start,
        total_steps=cfg.max_steps,
        train_step=iteration,
        eval_fn=evaluate if splits.eval is not None else None,
        meta=lambda s: {"data_position": host["position"]},
        run=cfg.run,
        checkpointer=checkpointer,
        logger=logger,
        desc="grpo",
        bar_keys=("reward", "kl"),
    )
    final = evaluate(state) if splits.eval is not None else {}
    logger.close()
    checkpointer.close()
    out_dir = export_policy(
        cfg.run.run_dir,
        state.trainable,
        cfg.lora,
        base_host,
        model_cfg,
        tokenizer,
        base_name=cfg.model.path,
    )
    return {
        "eval_before": initial,
        "eval": final,
        "export": str(out_dir),
        "state": state,
        "model_cfg": model_cfg,
        "frozen": frozen,
    }
