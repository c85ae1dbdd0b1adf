"""GRPO iteration, LoRA vs full fine-tuning.

One iteration, as `jaxrlhf grpo` runs it with TRL's defaults (β = 0, μ = 1, one mini-batch,
loss "dapo") and its own (`share_prompt`): sample G completions for each prompt, the prompt
prefilled once per group (LoRA: the adapter merged into the base first) → score them on the host → `prepare` (group advantages; with β = 0 and μ = 1 no extra
forward) → `update` (policy forward + backward, clipping, AdamW).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C
from benchmarks.harness import Case, render_phases, render_sizes, run_cases
from benchmarks.rollout import Rollout

PROMPTS, GENERATIONS, PROMPT_LEN, NEW_TOKENS = 4, 4, 32, 32


def default_reward(tokens: np.ndarray) -> np.ndarray:
    """A stand-in for a Python reward function: cheap, deterministic, varied within a group."""
    return (tokens % 7 == 0).mean(axis=1).astype(np.float32)


def build_case(
    mode: str,
    cfg,
    params_host: dict,
    prompt_ids: np.ndarray,
    *,
    generations: int = GENERATIONS,
    new_tokens: int = NEW_TOKENS,
    reward: Callable[[np.ndarray], np.ndarray] = default_reward,
    flops: bool = True,
    seed: int = 0,
    algorithm: str = "grpo",
    options: dict | None = None,
) -> Case:
    """`prompt_ids`: [prompts, P]; each prompt is repeated `generations` times. One
    iteration of the group-rollout algorithm `jaxrlhf.algorithms.<algorithm>` (GRPO, RLOO,
    REINFORCE++) with `options` over its defaults (GRPO: β = 0, loss "dapo")."""
    import importlib

    from jaxrlhf.algorithms.common import init_train_state
    from jaxrlhf.config import GenerationConfig
    from jaxrlhf.lora import split_trainable
    from jaxrlhf.rewards import RewardFuncConfig

    lora_cfg = C.lora_config() if mode == "lora" else None
    key = jax.random.PRNGKey(seed)
    frozen = C.copy_tree(params_host)  # the base; in full FT the (unused at β = 0) reference
    trainable, _ = split_trainable(key, frozen if lora_cfg else params_host, cfg, lora_cfg)
    trainable = C.copy_tree(trainable)
    opt = C.optimizer()
    state = init_train_state(trainable, opt, jax.random.fold_in(key, 1))
    ids = np.repeat(prompt_ids, generations, axis=0)
    b, p = ids.shape
    rollout = Rollout(
        cfg,
        frozen,
        trainable,
        ids,
        lora_cfg=lora_cfg,
        new_tokens=new_tokens,
        prompt_repeats=generations,
    )
    algo = importlib.import_module(f"jaxrlhf.algorithms.{algorithm}").ALGORITHM
    if options is None:
        options = {"beta": 0.0, "loss_type": "dapo"} if algorithm == "grpo" else {}
    hyper = algo.config(
        lora=lora_cfg,
        reward_funcs=(RewardFuncConfig(fn="char_share", kwargs={"chars": "a"}),),
        num_generations=generations,
        prompts_per_iteration=b // generations,
        generation=GenerationConfig(max_new_tokens=new_tokens, temperature=1.0),
        share_prompt=True,
        **options,
    )
    prepare = algo.make_prepare(hyper, model_cfg=cfg, adapters=None, prompt_len=p)
    update = algo.make_update(hyper, model_cfg=cfg, adapters=None, optimizer=opt, prompt_len=p)
    kl_coef = jnp.float32(algo.kl_control(hyper).initial)
    example = rollout(state.trainable, jax.random.PRNGKey(1))
    keys = ("input_ids", "attention_mask", "response_mask", "finished")
    r_in = {k: example[k] for k in keys}
    scores = jnp.asarray(reward(np.asarray(example["tokens"])))
    args = (state.trainable, frozen, r_in, scores, kl_coef)
    prep_c, prep_stats = C.compile_program(prepare, *args)
    batch, _ = prep_c(*args)
    indices = jnp.arange(b)
    upd_c, upd_stats = C.compile_program(update, state, frozen, batch, indices, donate_argnums=(0,))
    holder = {"state": state, "step": 0}

    def run() -> dict:
        t0 = time.perf_counter()
        holder["step"] += 1
        ro = rollout(holder["state"].trainable, jax.random.PRNGKey(holder["step"]))
        t1 = time.perf_counter()
        sc = jnp.asarray(reward(np.asarray(ro["tokens"])))
        t2 = time.perf_counter()
        bt, m = prep_c(holder["state"].trainable, frozen, {k: ro[k] for k in keys}, sc, kl_coef)
        C.block((bt, m))
        t3 = time.perf_counter()
        new, m = upd_c(holder["state"], frozen, bt, indices)
        C.block((new, m))
        holder["state"] = new
        t4 = time.perf_counter()
        return {"rollout": t1 - t0, "reward": t2 - t1, "prepare": t3 - t2, "update": t4 - t3}

    n_tok = b * (p + new_tokens)  # the tokens of the iteration's rows (throughput counts these)
    flops_upd = C.xla_flops(update, state, frozen, batch, indices) if flops else None
    shape = dict(
        tokens=(b // generations) * p + b * new_tokens,  # packed: each prompt once
        context=p + new_tokens,
        lm_tokens=b * new_tokens,
    )
    analytic_upd = C.train_flops(cfg, lora=lora_cfg is not None, **shape)
    # prepare's no-grad passes (reference, old policy) where the algorithm runs them
    passes = sum(k in batch for k in ("ref_logprobs", "old_logprobs"))
    if passes:
        analytic_upd += passes * C.forward_flops(cfg, **shape)
        if flops_upd:
            flops_upd += C.xla_flops(prepare, *args) or 0.0
    return Case(
        mode=mode,
        run=run,
        programs={**rollout.programs, "prepare": prep_stats, "update": upd_stats},
        trainable_bytes=C.tree_bytes(state.trainable),
        optimizer_bytes=C.tree_bytes(state.opt_state),
        frozen_bytes=C.tree_bytes(frozen),
        tokens=n_tok,
        flops_xla=(rollout.flops + flops_upd) if flops_upd else None,
        flops_analytic=rollout.flops + analytic_upd,
        notes="generation FLOPs are analytic (a while loop)",
        hlo=upd_c.as_text,
    )


def run(*, sizes: list[str], repeats: int, roofline: dict | None) -> dict:
    result = {
        "benchmark": "grpo",
        "batch": {
            "prompts": PROMPTS,
            "generations": GENERATIONS,
            "prompt": PROMPT_LEN,
            "new_tokens": NEW_TOKENS,
            "tokens_per_iteration": PROMPTS * GENERATIONS * (PROMPT_LEN + NEW_TOKENS),
        },
        "sizes": [],
    }
    for size in sizes:
        print(f"[grpo] {size}", flush=True)
        cfg = C.model_config(size)
        params = C.random_params(cfg)
        prompts = C.random_ids(np.random.default_rng(0), (PROMPTS, PROMPT_LEN), cfg.vocab_size)
        cases = [build_case(mode, cfg, params, prompts) for mode in ("lora", "full")]
        entry = {"size": size, "model": C.size_info(cfg)}
        entry.update(run_cases(cases, repeats=repeats, roofline=roofline))
        result["sizes"].append(entry)
        del cases, params
    return result


def render(result: dict) -> str:
    b = result["batch"]
    return "\n".join(
        [
            f"Iteration: {b['prompts']} prompts × G={b['generations']} completions, prompt "
            f"{b['prompt']} + {b['new_tokens']} sampled tokens ({b['tokens_per_iteration']} tokens "
            "per iteration), β = 0, μ = 1, one optimizer step, fp32. Generation FLOPs are "
            "analytic; the update's are XLA's. Full fine-tuning keeps the frozen base resident "
            "too (as `jaxrlhf grpo` does).",
            "",
            render_sizes(result, what="iteration"),
            "",
            "Phases of an iteration (median s, share):",
            "",
            render_phases(result),
        ]
    )
