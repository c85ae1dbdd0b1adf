"""DPO step, LoRA vs full fine-tuning.

One step = `jaxrlhf.algorithms.dpo.make_train_step` with the reference computed inside the
step (TRL's default `precompute_ref_log_probs=False`): a no-grad forward of the reference
(LoRA: the base with the adapter off; full: a separate frozen copy), the policy forward and
backward over chosen and rejected rows (unpacked, as TRL), the sigmoid loss (β = 0.1),
clipping and AdamW.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C
from benchmarks.harness import Case, render_sizes, run_cases

PAIRS, PROMPT, RESPONSE = 8, 32, 32


def dpo_batch(
    cfg,
    *,
    pairs: int = PAIRS,
    prompt: int = PROMPT,
    response: int = RESPONSE,
    seed: int = 0,
    ids: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict:
    """A [1, pairs, prompt + response] batch of unpadded rows, or from given
    (prompt_ids, chosen_ids, rejected_ids)."""
    rng = np.random.default_rng(seed)
    if ids is None:
        p = C.random_ids(rng, (pairs, prompt), cfg.vocab_size)
        c = C.random_ids(rng, (pairs, response), cfg.vocab_size)
        r = C.random_ids(rng, (pairs, response), cfg.vocab_size)
    else:
        p, c, r = ids
    n, lp = p.shape
    resp_mask = np.concatenate(
        [np.zeros((n, lp), np.int32), np.ones((n, c.shape[1]), np.int32)], axis=1
    )
    batch = {
        "chosen_input_ids": np.concatenate([p, c], axis=1),
        "rejected_input_ids": np.concatenate([p, r], axis=1),
        "chosen_response_mask": resp_mask,
        "rejected_response_mask": resp_mask,
        "pair_mask": np.ones((n,), np.float32),
    }
    batch["chosen_attention_mask"] = np.ones_like(batch["chosen_input_ids"])
    batch["rejected_attention_mask"] = np.ones_like(batch["rejected_input_ids"])
    return {k: jnp.asarray(v[None]) for k, v in batch.items()}


def build_case(
    mode: str, cfg, params_host: dict, batch: dict, *, flops: bool = True, seed: int = 0
) -> Case:
    from jaxrlhf.algorithms import dpo as A
    from jaxrlhf.algorithms.common import init_train_state
    from jaxrlhf.commands.common import split_trainable

    lora_cfg = C.lora_config() if mode == "lora" else None
    key = jax.random.PRNGKey(seed)
    frozen = C.copy_tree(params_host)  # LoRA: the base; full: the reference copy
    trainable, _ = split_trainable(key, frozen if lora_cfg else params_host, cfg, lora_cfg)
    trainable = C.copy_tree(trainable)
    opt = C.optimizer()
    state = init_train_state(trainable, opt, jax.random.fold_in(key, 1))
    step = A.make_train_step(model_cfg=cfg, lora_cfg=lora_cfg, optimizer=opt, beta=0.1)
    compiled, stats = C.compile_program(step, state, frozen, batch, donate_argnums=(0,))
    holder = {"state": state}

    def run():
        new, metrics = compiled(holder["state"], frozen, batch)
        C.block((new, metrics))
        holder["state"] = new

    tokens = 2 * int(np.prod(batch["chosen_input_ids"].shape))
    seq = batch["chosen_input_ids"].shape[-1]
    lm = tokens - tokens // seq  # log-probs of tokens 1..T-1 of every row
    analytic = C.forward_flops(cfg, tokens=tokens, context=seq, lm_tokens=lm) + C.train_flops(
        cfg, lora=lora_cfg is not None, tokens=tokens, context=seq, lm_tokens=lm
    )
    return Case(
        mode=mode,
        run=run,
        programs={"step": stats},
        hlo=compiled.as_text,
        trainable_bytes=C.tree_bytes(state.trainable),
        optimizer_bytes=C.tree_bytes(state.opt_state),
        frozen_bytes=C.tree_bytes(frozen),
        tokens=tokens,
        flops_xla=C.xla_flops(step, state, frozen, batch) if flops else None,
        flops_analytic=analytic,
    )


def run(*, sizes: list[str], repeats: int, roofline: dict | None) -> dict:
    result = {
        "benchmark": "dpo",
        "batch": {
            "pairs": PAIRS,
            "prompt": PROMPT,
            "response": RESPONSE,
            "tokens_per_step": 2 * PAIRS * (PROMPT + RESPONSE),
        },
        "sizes": [],
    }
    for size in sizes:
        print(f"[dpo] {size}", flush=True)
        cfg = C.model_config(size)
        params = C.random_params(cfg)
        batch = dpo_batch(cfg)
        cases = [build_case(mode, cfg, params, batch) for mode in ("lora", "full")]
        entry = {"size": size, "model": C.size_info(cfg)}
        entry.update(run_cases(cases, repeats=repeats, roofline=roofline))
        result["sizes"].append(entry)
        del cases, params
    return result


def render(result: dict) -> str:
    b = result["batch"]
    return "\n".join(
        [
            f"Batch: {b['pairs']} pairs, prompt {b['prompt']} + response {b['response']} tokens "
            f"(chosen and rejected rows: {b['tokens_per_step']} tokens per step), fp32, β = 0.1, "
            "reference log-probs computed in the step. LoRA r=16, α=32, 7 projections; full "
            "fine-tuning keeps a separate frozen reference copy (counted in “resident”).",
            "",
            render_sizes(result, what="step"),
        ]
    )
