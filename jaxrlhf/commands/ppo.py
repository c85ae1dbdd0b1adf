"""`jaxrlhf ppo`: PPO with a LoRA policy and critic over one frozen base."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import data as D
from jaxrlhf.advantages import KLControlState, init_kl_control, update_kl_control
from jaxrlhf.algorithms import ppo as P
from jaxrlhf.algorithms.common import TrainState, init_train_state
from jaxrlhf.commands.common import (
    announce,
    gather_to_host,
    load_base,
    log,
    maybe_init_distributed,
    prepare_run_dir,
    split_trainable,
)
from jaxrlhf.commands.rollout import Sampler, Scorer, host_view, load_prompts, prompt_batch
from jaxrlhf.config import PPOConfig
from jaxrlhf.lora import LoraConfig
from jaxrlhf.sharding import ShardedStep, make_mesh, put_tree, replicated, tree_shardings
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.metrics import MetricsLogger


@flax.struct.dataclass
class PPOState:
    train: TrainState
    kl: KLControlState


def hyper_from(cfg: PPOConfig) -> P.PPOHyper:
    return P.PPOHyper(
        cliprange=cfg.cliprange,
        cliprange_value=cfg.cliprange_value,
        vf_coef=cfg.vf_coef,
        entropy_coef=cfg.entropy_coef,
        gamma=cfg.gamma,
        lam=cfg.lam,
        kl_estimator=cfg.kl_estimator,
        whiten_advantages=cfg.whiten_advantages,
        whiten_rewards=cfg.whiten_rewards,
        temperature=cfg.generation.temperature,
        value_model=cfg.value_model,
    )


def build_trainable(
    key, base: dict, model_cfg, cfg: PPOConfig, scorer: Scorer | None
) -> tuple[dict, Any, P.Adapters]:
    """{"policy": adapter or params, "value": critic adapter or params (separate critic)},
    the frozen tree (the base; in full fine-tuning the reference copy) and the adapters."""
    k_pol, k_val = jax.random.split(key)
    policy_heads = ("value",) if cfg.value_model == "shared" else ()
    policy, frozen = split_trainable(k_pol, base, model_cfg, cfg.lora, heads=policy_heads)
    if cfg.lora is None:
        frozen = base  # full fine-tuning: the reference is a real, separate copy
    trainable = {"policy": policy}
    value_cfg = cfg.value_lora
    if cfg.value_model == "separate":
        if cfg.value_init_from_reward_model:
            value, value_cfg = critic_from_reward_model(scorer, cfg)
        else:
            value, _ = split_trainable(k_val, base, model_cfg, cfg.value_lora, heads=("value",))
        trainable["value"] = value
    return (
        trainable,
        frozen,
        P.Adapters(policy=cfg.lora, value=value_cfg if cfg.value_model == "separate" else None),
    )


def critic_from_reward_model(
    scorer: Scorer | None, cfg: PPOConfig
) -> tuple[Any, LoraConfig | None]:
    """The critic starts as the reward model: its adapter, and its score head as the value
    head (bias 0), as InstructGPT and PE-RLHF do."""
    if scorer is None or scorer.rm is None or scorer.rm["lora"] is None:
        raise ValueError(
            "value_init_from_reward_model needs a LoRA reward model "
            "(reward_model.path pointing at a PEFT adapter from `jaxrlhf rm`)"
        )
    if cfg.value_lora is None:
        raise ValueError("value_init_from_reward_model needs value_lora (a LoRA critic)")
    rm_lora = jax.device_get(scorer.rm["lora"])
    score = rm_lora["score"]["kernel"]
    if score.shape[-1] != 1:
        raise ValueError("value_init_from_reward_model needs a reward model with num_labels=1")
    value = {k: v for k, v in rm_lora.items() if k != "score"}
    value["value"] = {"kernel": np.asarray(score, np.float32), "bias": np.zeros((1,), np.float32)}
    rm_cfg: LoraConfig = scorer.rm["lora_cfg"]
    import dataclasses

    value_cfg = dataclasses.replace(rm_cfg, task_type="CAUSAL_LM", modules_to_save=("value",))
    return value, value_cfg


def run_ppo(
    cfg: PPOConfig,
    *,
    resume: bool = False,
    source: Any = None,
    eval_hook: Callable[[list, list[str]], dict] | None = None,
) -> dict:
    """Train a policy with PPO. `eval_hook(prompts, completions) -> metrics` adds metrics to
    each evaluation (the demo's outside judge). Returns a summary dict."""
    maybe_init_distributed()
    prepare_run_dir(cfg.run, cfg, resume=resume)
    mesh = make_mesh(cfg.mesh)
    model_cfg, base_host, tokenizer = load_base(cfg.model, seed=cfg.run.seed)
    base = put_tree(base_host, mesh)
    splits = load_prompts(cfg.data, tokenizer, seed=cfg.run.seed, source=source)
    scorer = Scorer(
        model_cfg=model_cfg,
        frozen=base,
        mesh=mesh,
        section=cfg.reward_model,
        funcs=cfg.reward_funcs,
        tokenizer=tokenizer,
        missing_eos_penalty=cfg.missing_eos_penalty,
        score_clip=cfg.score_clip,
        score_scaling=cfg.score_scaling,
    )
    key = jax.random.PRNGKey(cfg.run.seed)
    trainable, frozen, adapters = build_trainable(
        key, base_host if cfg.lora is None else base, model_cfg, cfg, scorer
    )
    if cfg.lora is None:
        frozen = base
    hyper = hyper_from(cfg)
    updates_per_iter = cfg.num_ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
    from jaxrlhf.train.optim import make_optimizer

    optimizer = make_optimizer(cfg.optim, cfg.num_iterations * updates_per_iter)
    state = PPOState(
        train=init_train_state(trainable, optimizer, jax.random.fold_in(key, 7)),
        kl=init_kl_control(cfg.kl_coef),
    )
    state_sh = tree_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    frozen_sh = tree_shardings(frozen, mesh)
    announce(mesh, frozen=frozen, trainable=state.train.trainable, opt_state=state.train.opt_state)

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
        """The compiled experience and update steps for one prompt bucket."""
        if prompt_len not in steps:
            exp = P.make_experience_fn(
                model_cfg=model_cfg, adapters=adapters, hyper=hyper, prompt_len=prompt_len
            )
            upd = P.make_update_fn(
                model_cfg=model_cfg,
                adapters=adapters,
                hyper=hyper,
                optimizer=optimizer,
                prompt_len=prompt_len,
                micro_batches=cfg.optim.grad_accum_steps,
            )
            steps[prompt_len] = (
                ShardedStep(
                    exp,
                    mesh=mesh,
                    arg_shardings=(
                        state_sh.train.trainable,
                        frozen_sh,
                        "batch",
                        "batch",
                        replicated(mesh),
                    ),
                    out_shardings=(None, replicated(mesh)),
                ),
                # The minibatch indices are split like the batch: with replicated indices
                # the gathered minibatch came out replicated and every device ran all of it.
                ShardedStep(
                    upd,
                    mesh=mesh,
                    arg_shardings=(state_sh.train, frozen_sh, "batch", "batch"),
                    out_shardings=(state_sh.train, replicated(mesh)),
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

    def iteration(state: PPOState):
        idx, host["position"] = D.batch_indices(
            n_train, batch_size=cfg.rollout_batch_size, seed=cfg.run.seed, position=host["position"]
        )
        prompts, values, columns = prompt_batch(
            splits.train, idx, pad_id=pad_id, buckets=splits.buckets, mesh=mesh
        )
        rng, k_sample, k_perm = jax.random.split(state.train.rng, 3)
        state = state.replace(train=state.train.replace(rng=rng))
        t0 = time.perf_counter()
        rollout = sampler(state.train.trainable["policy"], frozen, prompts, k_sample)
        scores, score_metrics, _ = scorer(rollout, values, columns)
        jax.block_until_ready(rollout["input_ids"])
        t1 = time.perf_counter()
        prompt_len = prompts["input_ids"].shape[1]
        experience_step, update_step = steps_for(prompt_len)
        rollout_in = {
            k: rollout[k]
            for k in (
                "input_ids",
                "attention_mask",
                "response_mask",
                "sampler_logprobs",
                "finished",
            )
        }
        exp, metrics = experience_step(
            state.train.trainable, frozen, rollout_in, jnp.asarray(scores), state.kl.value
        )
        train_state = state.train
        n_mb = cfg.rollout_batch_size // cfg.mini_batch_size
        update_metrics = []
        for epoch in range(cfg.num_ppo_epochs):
            perm = np.asarray(
                jax.random.permutation(jax.random.fold_in(k_perm, epoch), cfg.rollout_batch_size)
            )
            epoch_metrics = []
            for j in range(n_mb):
                mb_idx = jnp.asarray(perm[j * cfg.mini_batch_size : (j + 1) * cfg.mini_batch_size])
                train_state, m = update_step(train_state, frozen, exp, mb_idx)
                epoch_metrics.append(m)
            update_metrics.extend(epoch_metrics)
            if cfg.target_kl is not None:
                approx = float(np.mean([float(m["policy/approxkl"]) for m in epoch_metrics]))
                if approx > cfg.target_kl:
                    break
        jax.block_until_ready(train_state.step)
        t2 = time.perf_counter()
        mean_kl = metrics["objective/kl"]
        kl_state = state.kl
        if cfg.adaptive_kl:
            kl_state = update_kl_control(
                kl_state,
                mean_kl,
                cfg.rollout_batch_size,
                target=cfg.kl_target,
                horizon=cfg.kl_horizon,
            )
        n_tokens = float(np.sum(host_view(rollout["response_mask"])))
        upd = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *update_metrics)
        out = {
            **metrics,
            **upd,
            **score_metrics,
            "ppo_epochs_run": float(len(update_metrics) // n_mb),
            "time/rollout_tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
            "time/update_tokens_per_s": n_tokens * len(update_metrics) / n_mb / max(t2 - t1, 1e-9),
        }
        return PPOState(train=train_state, kl=kl_state), out

    def evaluate(state: PPOState) -> dict:
        if splits.eval is None:
            return {}
        return evaluate_policy(
            state.train.trainable["policy"],
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
    last_eval: dict = {}
    state = run_loop(
        state=state,
        start_step=start,
        total_steps=cfg.num_iterations,
        train_step=iteration,
        eval_fn=evaluate if splits.eval is not None else None,
        meta=lambda s: {"data_position": host["position"]},
        run=cfg.run,
        checkpointer=checkpointer,
        logger=logger,
        desc="ppo",
        bar_keys=("objective/scores", "objective/kl"),
        on_eval=lambda step, metrics: last_eval.update(metrics),
    )
    # The loop's last evaluation is of the final state; a run resumed at its end has none.
    final = last_eval or (evaluate(state) if splits.eval is not None else {})
    logger.close()
    checkpointer.close()
    out_dir = export_policy(
        cfg.run.run_dir,
        state.train.trainable["policy"],
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


@functools.cache
def _eval_kl_fn(model_cfg, lora_cfg: LoraConfig | None, temperature: float):
    """The jitted per-response KL of `evaluate_policy`, built once per configuration (so each
    evaluation of a run reuses the compiled program)."""
    from jaxrlhf.models.transformer import sequence_logprobs

    @jax.jit
    def kl_fn(policy, frozen, ids, mask, resp, prompt_len_arr):
        prompt_len = ids.shape[1] - resp.shape[1]
        params, lora, scale = (
            (frozen, policy, lora_cfg.scale) if lora_cfg is not None else (policy, None, 1.0)
        )
        lp, _ = sequence_logprobs(
            params, ids, mask, cfg=model_cfg, lora=lora, lora_scale=scale, temperature=temperature
        )
        ref, _ = sequence_logprobs(frozen, ids, mask, cfg=model_cfg, temperature=temperature)
        diff = (lp - ref)[:, prompt_len - 1 :]
        return jnp.sum(diff * resp, axis=-1)

    return kl_fn


def evaluate_policy(
    policy,
    frozen,
    prompts: D.PromptData,
    *,
    sampler: Sampler,
    scorer: Scorer,
    mesh,
    pad_id: int,
    buckets,
    batch_size: int,
    model_cfg,
    temperature: float,
    eval_hook,
    seed: int,
    lora_cfg: LoraConfig | None,
) -> dict:
    """Sample once for every held-out prompt; mean score, KL to the reference (k1, summed
    over the response) and the hook's metrics."""
    kl_fn = _eval_kl_fn(model_cfg, lora_cfg, temperature)
    all_scores, kls, texts, all_prompts = [], [], [], []
    key = jax.random.PRNGKey(seed + 10_000)
    n = len(prompts)
    for start in range(0, n - n % batch_size if n >= batch_size else n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        batch, values, columns = prompt_batch(
            prompts, idx, pad_id=pad_id, buckets=buckets, mesh=mesh
        )
        rollout = sampler(policy, frozen, batch, jax.random.fold_in(key, start))
        scores, _, completions = scorer(rollout, values, columns)
        kl = kl_fn(
            policy,
            frozen,
            rollout["input_ids"],
            rollout["attention_mask"],
            rollout["response_mask"],
            jnp.zeros(()),
        )
        all_scores.append(scores)
        kls.append(host_view(kl))
        texts.extend(completions)
        all_prompts.extend(values)
    scores = np.concatenate(all_scores)
    out = {
        "score": float(scores.mean()),
        "score_std": float(scores.std()),
        "kl": float(np.concatenate(kls).mean()),
    }
    if eval_hook is not None:
        out.update(eval_hook(all_prompts, texts))
    return out


def export_policy(
    run_dir: str,
    policy,
    lora_cfg: LoraConfig | None,
    base_host,
    model_cfg,
    tokenizer,
    *,
    base_name: str,
) -> Path:
    from jaxrlhf.models.loading import save_hf_folder
    from jaxrlhf.peft_format import export_peft

    out = Path(run_dir) / ("adapter" if lora_cfg is not None else "model")
    policy = gather_to_host(policy)  # collective: before process 0 alone goes on
    if jax.process_index() != 0:
        return out
    if lora_cfg is not None:
        policy = {k: v for k, v in policy.items() if k != "value"}
        export_cfg = lora_cfg
        if "value" in lora_cfg.modules_to_save:
            import dataclasses

            export_cfg = dataclasses.replace(
                lora_cfg, modules_to_save=tuple(m for m in lora_cfg.modules_to_save if m != "value")
            )
        export_peft(policy, export_cfg, model_cfg, out, base_model_name_or_path=base_name)
    else:
        save_hf_folder({k: v for k, v in policy.items() if k != "value"}, model_cfg, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    log(f"exported policy to {out}")
    return out
