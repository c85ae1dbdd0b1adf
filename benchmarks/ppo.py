"""PPO iteration, LoRA vs full fine-tuning.

One iteration, as `jaxrlhf ppo` runs it: sample responses (LoRA: the policy adapter merged into
the base first) → the reward model scores them (LoRA: the shared base + a reward adapter and
score head; full: a separate full SEQ_CLS copy) → `experience` (policy, value and reference
forwards, KL penalty, GAE, whitening) → `update` (policy + separate critic forward and
backward, clipping, AdamW), one epoch of one mini-batch. Full fine-tuning holds four full
models: policy and critic (trained, with Adam state), reference and reward model (frozen).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C
from benchmarks.harness import Case, render_phases, render_sizes, run_cases
from benchmarks.rollout import Rollout

PROMPTS, PROMPT_LEN, NEW_TOKENS = 16, 32, 32


def build_case(
    mode: str,
    cfg,
    params_host: dict,
    prompt_ids: np.ndarray,
    *,
    new_tokens: int = NEW_TOKENS,
    flops: bool = True,
    seed: int = 0,
) -> Case:
    from jaxrlhf.algorithms import ppo as P
    from jaxrlhf.algorithms.common import init_train_state
    from jaxrlhf.algorithms.reward_model import reward_model_scores
    from jaxrlhf.config import GenerationConfig
    from jaxrlhf.lora import init_lora, split_trainable
    from jaxrlhf.rewards import RewardFuncConfig

    lora = mode == "lora"
    k_pol, k_val, k_rm, k_state = jax.random.split(jax.random.PRNGKey(seed), 4)
    frozen = C.copy_tree(params_host)  # the base = the reference
    if lora:
        pol_cfg = C.lora_config()
        val_cfg = C.lora_config(heads=("value",))
        rm_cfg = C.lora_config("SEQ_CLS", ("score",))
        trainable = {
            "policy": init_lora(k_pol, frozen, pol_cfg, cfg),
            "value": init_lora(k_val, frozen, val_cfg, cfg),
        }
        rm_params, rm_lora, rm_scale = frozen, init_lora(k_rm, frozen, rm_cfg, cfg), rm_cfg.scale
        adapters = P.Adapters(policy=pol_cfg, value=val_cfg)
    else:
        policy, _ = split_trainable(k_pol, params_host, cfg, None)
        value, _ = split_trainable(k_val, params_host, cfg, None, heads=("value",))
        trainable = {"policy": policy, "value": value}
        rm_full, _ = split_trainable(k_rm, params_host, cfg, None, heads=("score",))
        rm_params, rm_lora, rm_scale = C.copy_tree(rm_full), None, 1.0
        adapters = P.Adapters(policy=None, value=None)
        pol_cfg = None
    trainable = C.copy_tree(trainable)
    opt = C.optimizer()
    state = init_train_state(trainable, opt, k_state)
    b, p = prompt_ids.shape
    rollout = Rollout(
        cfg, frozen, trainable["policy"], prompt_ids, lora_cfg=pol_cfg, new_tokens=new_tokens
    )
    hyper = P.PPOConfig(
        lora=pol_cfg,
        reward_funcs=(RewardFuncConfig(fn="char_share", kwargs={"chars": "a"}),),
        generation=GenerationConfig(temperature=1.0),
        rollout_batch_size=b,
        mini_batch_size=b,
    )
    experience = P.make_experience_fn(hyper, model_cfg=cfg, adapters=adapters, prompt_len=p)
    update = P.make_update_fn(hyper, model_cfg=cfg, adapters=adapters, optimizer=opt, prompt_len=p)

    def score(rm_p, rm_l, ids, mask):
        return reward_model_scores(rm_p, rm_l, rm_scale, ids, mask, model_cfg=cfg)

    example = rollout(state.trainable["policy"], jax.random.PRNGKey(1))
    keys = ("input_ids", "attention_mask", "response_mask", "sampler_logprobs", "finished")
    r_in = {k: example[k] for k in keys}
    rm_c, rm_stats = C.compile_program(
        score, rm_params, rm_lora, r_in["input_ids"], r_in["attention_mask"]
    )
    scores = rm_c(rm_params, rm_lora, r_in["input_ids"], r_in["attention_mask"])
    kl = jnp.float32(0.05)
    exp_c, exp_stats = C.compile_program(experience, state.trainable, frozen, r_in, scores, kl)
    exp, _ = exp_c(state.trainable, frozen, r_in, scores, kl)
    indices = jnp.arange(b)
    upd_c, upd_stats = C.compile_program(update, state, frozen, exp, indices, donate_argnums=(0,))
    holder = {"state": state, "step": 0}

    def run() -> dict:
        t0 = time.perf_counter()
        holder["step"] += 1
        st = holder["state"]
        ro = rollout(st.trainable["policy"], jax.random.PRNGKey(holder["step"]))
        t1 = time.perf_counter()
        sc = rm_c(rm_params, rm_lora, ro["input_ids"], ro["attention_mask"])
        C.block(sc)
        t2 = time.perf_counter()
        ex, m = exp_c(st.trainable, frozen, {k: ro[k] for k in keys}, sc, kl)
        C.block((ex, m))
        t3 = time.perf_counter()
        new, m = upd_c(st, frozen, ex, indices)
        C.block((new, m))
        holder["state"] = new
        t4 = time.perf_counter()
        return {
            "rollout": t1 - t0,
            "reward model": t2 - t1,
            "experience": t3 - t2,
            "update": t4 - t3,
        }

    seq = p + new_tokens
    n_tok = b * seq
    fl = None
    if flops:
        parts = [
            C.xla_flops(score, rm_params, rm_lora, r_in["input_ids"], r_in["attention_mask"]),
            C.xla_flops(experience, state.trainable, frozen, r_in, scores, kl),
            C.xla_flops(update, state, frozen, exp, indices),
        ]
        fl = rollout.flops + sum(parts) if all(parts) else None
    fwd = C.forward_flops(cfg, tokens=n_tok, context=seq)
    fwd_lm = C.forward_flops(cfg, tokens=n_tok, context=seq, lm_tokens=b * new_tokens)
    analytic = (
        rollout.flops
        + fwd
        + 2 * fwd_lm
        + fwd
        + C.train_flops(cfg, lora=lora, tokens=n_tok, context=seq, lm_tokens=b * new_tokens)
        + C.train_flops(cfg, lora=lora, tokens=n_tok, context=seq)
    )
    frozen_bytes = C.tree_bytes(frozen) + (0 if lora else C.tree_bytes(rm_params))
    if lora:
        frozen_bytes += C.tree_bytes(rm_lora)
    return Case(
        mode=mode,
        run=run,
        programs={
            **rollout.programs,
            "reward_model": rm_stats,
            "experience": exp_stats,
            "update": upd_stats,
        },
        trainable_bytes=C.tree_bytes(state.trainable),
        optimizer_bytes=C.tree_bytes(state.opt_state),
        frozen_bytes=frozen_bytes,
        tokens=n_tok,
        flops_xla=fl,
        flops_analytic=analytic,
        notes="generation FLOPs are analytic (a while loop)",
    )


def run(*, sizes: list[str], repeats: int, roofline: dict | None) -> dict:
    result = {
        "benchmark": "ppo",
        "batch": {
            "prompts": PROMPTS,
            "prompt": PROMPT_LEN,
            "new_tokens": NEW_TOKENS,
            "tokens_per_iteration": PROMPTS * (PROMPT_LEN + NEW_TOKENS),
        },
        "sizes": [],
    }
    for size in sizes:
        print(f"[ppo] {size}", flush=True)
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
            f"Iteration: {b['prompts']} prompts, prompt {b['prompt']} + {b['new_tokens']} sampled "
            f"tokens ({b['tokens_per_iteration']} tokens per iteration), separate critic, reward "
            "model on the shared base (LoRA) or a full copy (full), one epoch × one mini-batch, "
            "fp32. “Resident” counts the frozen base/reference and reward model too. Generation "
            "FLOPs are analytic; the other programs' are XLA's.",
            "",
            render_sizes(result, what="iteration"),
            "",
            "Phases of an iteration (median s, share):",
            "",
            render_phases(result),
        ]
    )
