"""The driver for online RL (`jaxrlhf ppo`, `grpo`, ...): one loop for every algorithm.

    prompts ──RolloutEngine.generate (policy adapter on the frozen base)──> Rollout
            ──Scorer (reward model and/or reward functions)──> scores
            ──algorithm.prepare (old/ref log-probs, values, advantages; jit)──> batch
            ──epochs × minibatches of algorithm.update (jit, donated)──> new state
            ──KL control ──> evaluation on held-out prompts ──> checkpoint ──> export

The algorithm (`algorithms.spec.OnlineAlgorithm`) supplies its config, its trainable layout,
its `prepare`/`update` steps and how an iteration is cut into optimizer steps; everything
else is here. An algorithm that filters groups (`keep_groups`: GRPO's dynamic sampling) has
the rollout and scoring repeated on the next prompts until the batch is full of kept groups
or `plan.generation_rounds` ran (`train.dynamic_sampling`). The engine is `rollout.Sampler` unless another `RolloutEngine` is passed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import data as D
from jaxrlhf.advantages import (
    KLControlState,
    init_kl_control,
    update_kl_budget,
    update_kl_control,
)
from jaxrlhf.algorithms.common import TrainState, init_train_state
from jaxrlhf.algorithms.spec import IterationPlan, OnlineAlgorithm
from jaxrlhf.lora import LoraConfig
from jaxrlhf.models.transformer import sequence_logprobs
from jaxrlhf.rollout import ContinuousEngine, RolloutEngine, Sampler, eos_ids, prompt_batch
from jaxrlhf.sharding import (
    ShardedStep,
    host_view,
    put_tree,
    replicated,
    shard_batch,
    tree_shardings,
)
from jaxrlhf.text_metrics import degeneration_metrics
from jaxrlhf.train.dynamic_sampling import is_first_round, join_groups, pick_groups
from jaxrlhf.train.loop import train_with_evals
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.scoring import Scorer
from jaxrlhf.train.setup import (
    announce,
    export_trained,
    log,
    mean_metrics,
    restore_or_start,
    start_run,
)

EvalHook = Callable[[list, list[str]], dict]


@flax.struct.dataclass
class OnlineState:
    """What an iteration replaces: the train state and the KL controller."""

    train: TrainState
    kl: KLControlState


def iteration_order(plan: IterationPlan, key: jax.Array, epoch: int) -> np.ndarray:
    """The rows of one epoch in minibatch order; whole groups stay together when the plan
    packs them (each minibatch then holds complete groups, consecutive)."""
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), plan.batch))
    if plan.whole_groups:
        g = plan.group
        perm = (perm[perm % g == 0][:, None] + np.arange(g)).reshape(-1)
    return perm


def train_online(
    algo: OnlineAlgorithm,
    cfg: Any,
    *,
    resume: bool = False,
    source: Any = None,
    eval_hook: EvalHook | None = None,
    engine: RolloutEngine | None = None,
) -> dict:
    """Train a policy with `algo` and config `cfg`. `source` replaces `data.train` (rows, a
    `datasets.Dataset`, or `{"train": rows, "eval": rows}`); `eval_hook(prompts,
    completions) -> metrics` adds metrics to each evaluation (the demo's outside judge).
    Returns a summary dict (evaluations, export folder, final state)."""
    start = start_run(cfg, resume=resume)
    mesh, model_cfg, tokenizer = start.mesh, start.model_cfg, start.tokenizer
    base = put_tree(start.base, mesh)
    splits = D.load_prompts(cfg.data, tokenizer, seed=cfg.run.seed, source=source, log=log)
    plan = algo.plan(cfg)
    if len(splits.train) < plan.prompts:
        raise ValueError(
            f"{len(splits.train)} training prompts, fewer than the {plan.prompts} prompts "
            f"one iteration samples"
        )
    scorer = Scorer(
        model_cfg=model_cfg,
        frozen=base,
        mesh=mesh,
        section=cfg.reward_model,
        funcs=cfg.reward_funcs,
        tokenizer=tokenizer,
        missing_eos_penalty=cfg.missing_eos_penalty,
        **algo.score_options(cfg),
    )
    key = jax.random.PRNGKey(cfg.run.seed)
    # LoRA: adapters over the shared base. Full fine-tuning: float32 copies are trained
    # and `base` stays as the frozen reference.
    trainable, adapters = algo.init_trainable(
        cfg,
        key=key,
        base=start.base if cfg.lora is None else base,
        model_cfg=model_cfg,
        reward_model=scorer.rm,
    )
    frozen = base
    optimizer = make_optimizer(
        cfg.optim, plan.optimizer_steps, skip_nonfinite=cfg.run.on_nonfinite == "skip_step"
    )
    kl_settings = algo.kl_control(cfg)
    state = OnlineState(
        train=init_train_state(trainable, optimizer, jax.random.fold_in(key, 7)),
        kl=init_kl_control(kl_settings.initial),
    )
    state_sh = tree_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    frozen_sh = tree_shardings(frozen, mesh)
    announce(
        mesh,
        frozen=frozen if cfg.lora is not None else None,
        trainable=state.train.trainable,
        opt_state=state.train.opt_state,
        extra={"reference copy": frozen} if cfg.lora is None else None,
    )
    engine = engine or make_engine(cfg, rollout_generation(cfg), model_cfg, tokenizer, mesh)

    @functools.cache
    def steps_for(prompt_len: int) -> tuple[ShardedStep, ShardedStep]:
        """The compiled prepare and update steps for one prompt bucket."""
        prepare = algo.make_prepare(
            cfg, model_cfg=model_cfg, adapters=adapters, prompt_len=prompt_len
        )
        update = algo.make_update(
            cfg, model_cfg=model_cfg, adapters=adapters, optimizer=optimizer, prompt_len=prompt_len
        )
        return (
            ShardedStep(
                prepare,
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
            # The minibatch indices are split like the batch: with replicated indices the
            # gathered minibatch came out replicated and every device ran all of it.
            ShardedStep(
                update,
                mesh=mesh,
                arg_shardings=(state_sh.train, frozen_sh, "batch", "batch"),
                out_shardings=(state_sh.train, replicated(mesh)),
                donate_argnums=(0,),
            ),
        )

    checkpointer, state, position, start_iter = restore_or_start(
        cfg, state, resume=resume, unit="iteration"
    )
    host = {"position": position}
    n_train, pad_id = len(splits.train), tokenizer.pad_token_id

    def generate_round(train_state: TrainState, key: jax.Array) -> dict:
        """Sample and score the next `plan.prompts` prompts of the data order."""
        idx, host["position"] = D.batch_indices(
            n_train, batch_size=plan.prompts, seed=cfg.run.seed, position=host["position"]
        )
        prompts, values, columns = prompt_batch(
            splits.train, idx, pad_id=pad_id, buckets=splits.buckets, mesh=mesh, repeat=plan.group
        )
        t0 = time.perf_counter()
        rollout = engine.generate(
            algo.policy(train_state.trainable), frozen, prompts, key, prompt_repeats=plan.group
        )
        scores, score_metrics, _ = scorer(rollout, values, columns)
        jax.block_until_ready(rollout.input_ids)
        return {
            "rollout": rollout,
            "scores": scores,
            "metrics": score_metrics,
            "engine": engine_report(engine),
            "seconds": time.perf_counter() - t0,
        }

    def sample_batch(train_state: TrainState, key: jax.Array) -> tuple[dict, Any, dict, list]:
        """(prepare's rollout inputs, scores, dynamic-sampling metrics, the rounds): one
        round, or with `algo.keep_groups` as many as fill the batch with kept groups (at
        most `plan.generation_rounds`; round r > 0 samples with `fold_in(key, r)`)."""
        rounds, keeps = [], []
        for r in range(plan.generation_rounds):
            rounds.append(
                generate_round(train_state, key if r == 0 else jax.random.fold_in(key, r))
            )
            keep = algo.keep_groups(cfg, rounds[-1]["scores"], rounds[-1]["rollout"])
            if keep is None:
                break
            keeps.append(np.asarray(keep, bool))
            if sum(int(k.sum()) for k in keeps) >= plan.prompts:
                break
        first = rounds[0]
        if not keeps:
            return first["rollout"].step_inputs(), first["scores"], {}, rounds
        picks, fillers = pick_groups(keeps, plan.prompts)
        report = {
            "dynamic_sampling/dropped_groups": float(sum(int((~k).sum()) for k in keeps)),
            "dynamic_sampling/generation_rounds": float(len(rounds)),
            "dynamic_sampling/cap_reached": float(fillers > 0),
        }
        if is_first_round(picks):
            return first["rollout"].step_inputs(), first["scores"], report, rounds
        joined, scores = join_groups(
            [jax.tree.map(host_view, x["rollout"].step_inputs()) for x in rounds],
            [x["scores"] for x in rounds],
            picks,
            group=plan.group,
            pad_id=pad_id,
        )
        local = D.process_slice(
            np.arange(plan.batch),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return shard_batch({k: v[local] for k, v in joined.items()}, mesh), scores, report, rounds

    def iteration(state: OnlineState):
        rng, k_sample, k_perm = jax.random.split(state.train.rng, 3)
        train_state = state.train.replace(rng=rng)
        rollout_in, scores, sampling_metrics, rounds = sample_batch(train_state, k_sample)
        t1 = time.perf_counter()
        gen_seconds = sum(x["seconds"] for x in rounds)
        gen_tokens = sum(float(np.sum(host_view(x["rollout"].response_mask))) for x in rounds)
        engine_metrics = mean_over_rounds([x["engine"] for x in rounds])
        score_metrics = mean_over_rounds([x["metrics"] for x in rounds])
        n = rollout_in["response_mask"].shape[1]
        prepare_step, update_step = steps_for(rollout_in["input_ids"].shape[1] - n)
        batch, metrics = prepare_step(
            train_state.trainable, frozen, rollout_in, jnp.asarray(scores), state.kl.value
        )
        update_metrics, epochs_run = [], 0
        for epoch in range(plan.epochs):
            order, epoch_metrics = iteration_order(plan, k_perm, epoch), []
            for j in range(plan.mini_batches):
                rows = jnp.asarray(order[j * plan.mini_batch : (j + 1) * plan.mini_batch])
                train_state, m = update_step(train_state, frozen, batch, rows)
                epoch_metrics.append(m)
            update_metrics.extend(epoch_metrics)
            epochs_run += 1
            if algo.stop_epochs(cfg, epoch_metrics):
                break
        jax.block_until_ready(train_state.step)
        t2 = time.perf_counter()
        n_tokens = float(np.sum(host_view(rollout_in["response_mask"])))
        score_metrics = {k: v for k, v in score_metrics.items() if k not in algo.drop_metrics}
        out = {
            **metrics,
            **mean_metrics(update_metrics),
            **score_metrics,
            **engine_metrics,
            **sampling_metrics,
            "time/rollout_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
            "time/update_tokens_per_s": n_tokens * epochs_run / max(t2 - t1, 1e-9),
        }
        kl_state = state.kl
        if kl_settings.budget is not None:
            kl_state = update_kl_budget(
                kl_state,
                out[kl_settings.metric],
                budget=kl_settings.budget,
                floor=kl_settings.initial,
            )
        elif kl_settings.adaptive:
            kl_state = update_kl_control(
                kl_state,
                out[kl_settings.metric],
                plan.batch,
                target=kl_settings.target,
                horizon=kl_settings.horizon,
            )
        if kl_settings.budget is not None:
            out["kl_budget_exceeded"] = jnp.float32(out[kl_settings.metric] > kl_settings.budget)
        if algo.epochs_metric is not None:
            out[algo.epochs_metric] = float(epochs_run)
        return OnlineState(train=train_state, kl=kl_state), out

    def evaluate(state: OnlineState) -> dict:
        return evaluate_policy(
            algo.policy(state.train.trainable),
            frozen,
            splits.eval,
            engine=engine,
            scorer=scorer,
            mesh=mesh,
            pad_id=pad_id,
            buckets=splits.buckets,
            batch_size=cfg.eval_prompts_batch,
            model_cfg=model_cfg,
            lora_cfg=cfg.lora,
            temperature=cfg.generation.temperature,
            eval_hook=eval_hook,
            seed=cfg.run.seed,
            kl_budget=cfg.kl_budget,
        )

    state, eval_before, eval_after = train_with_evals(
        cfg,
        state=state,
        start_step=start_iter,
        total_steps=plan.iterations,
        train_step=iteration,
        evaluate=evaluate if splits.eval is not None else None,
        position=lambda: host["position"],
        checkpointer=checkpointer,
        desc=algo.name,
        bar_keys=algo.bar_keys,
    )
    out_dir = export_trained(
        cfg, algo.policy(state.train.trainable), model_cfg, tokenizer, task="CAUSAL_LM"
    )
    return {
        "eval_before": eval_before,
        "eval": eval_after,
        "export": str(out_dir),
        "state": state,
        "model_cfg": model_cfg,
        "frozen": frozen,
    }


def mean_over_rounds(records: list[dict[str, float]]) -> dict[str, float]:
    """Each host metric's mean over an iteration's generation rounds (equal-sized batches,
    so the mean of the rounds' means is the mean over all their rows); one round as is."""
    if len(records) == 1:
        return records[0]
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def rollout_generation(cfg: Any) -> Any:
    """The run's generation settings as the engine applies them. On a quantized base a merge
    makes a dense copy of the base, so the adapter is merged only with
    `generation.dequantize_base` (decode from a dense copy per rollout call) and applied
    unmerged on the quantized kernels otherwise."""
    generation = cfg.generation
    if cfg.model.quant.kind == "none":
        return generation
    return dataclasses.replace(generation, merge_adapter=generation.dequantize_base)


def make_engine(cfg: Any, generation: Any, model_cfg, tokenizer, mesh) -> RolloutEngine:
    """The run's rollout engine: the static KV-cache sampler or continuous batching."""
    common = dict(
        lora_cfg=cfg.lora,
        eos_token_ids=eos_ids(model_cfg, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        mesh=mesh,
    )
    if generation.engine == "continuous":
        return ContinuousEngine(
            model_cfg,
            generation,
            slots=generation.slots,
            prompt_length=cfg.data.max_prompt_length,  # one set of programs for every bucket
            **common,
        )
    return Sampler(model_cfg, generation, **common)


def engine_report(engine: RolloutEngine) -> dict[str, float]:
    """The engine's own metrics of its last call (`rollout/...`), when it keeps them."""
    last = getattr(engine, "last_metrics", None)  # optional in the RolloutEngine protocol
    return last.as_dict(prefix="rollout/") if last is not None else {}


@functools.cache
def _eval_kl_fn(model_cfg, lora_cfg: LoraConfig | None, temperature: float):
    """The jitted per-response KL of `evaluate_policy`, built once per configuration (so each
    evaluation of a run reuses the compiled program)."""

    @jax.jit
    def kl_fn(policy, frozen, ids, mask, resp):
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
    engine: RolloutEngine,
    scorer: Scorer,
    mesh,
    pad_id: int,
    buckets,
    batch_size: int,
    model_cfg,
    lora_cfg: LoraConfig | None,
    temperature: float,
    eval_hook: EvalHook | None,
    seed: int,
    kl_budget: float | None = None,
) -> dict:
    """Sample once for every held-out prompt: mean score, KL to the reference (k1, summed
    over the response: the same estimator at every evaluation), the degeneration metrics of
    the completions (`text_metrics`) and the hook's metrics."""
    kl_fn = _eval_kl_fn(model_cfg, lora_cfg, temperature)
    all_scores, kls, texts, all_prompts = [], [], [], []
    key = jax.random.PRNGKey(seed + 10_000)
    n = len(prompts)
    for start in range(0, n - n % batch_size if n >= batch_size else n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        batch, values, columns = prompt_batch(
            prompts, idx, pad_id=pad_id, buckets=buckets, mesh=mesh
        )
        rollout = engine.generate(policy, frozen, batch, jax.random.fold_in(key, start))
        scores, _, completions = scorer(rollout, values, columns)
        kl = kl_fn(policy, frozen, rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        all_scores.append(scores)
        kls.append(host_view(kl))
        texts.extend(completions)
        all_prompts.extend(values)
    scores = np.concatenate(all_scores)
    out = {
        "score": float(scores.mean()),
        "score_std": float(scores.std()),
        "kl": float(np.concatenate(kls).mean()),
        **degeneration_metrics(texts),
    }
    if kl_budget is not None:
        out["kl_budget_exceeded"] = float(out["kl"] > kl_budget)
    if eval_hook is not None:
        out.update(eval_hook(all_prompts, texts))
    return out
