"""DPO step, LoRA vs full fine-tuning.

One step = `jaxrlhf.algorithms.dpo.make_train_step` with the reference computed inside the
step (TRL's default `precompute_ref_log_probs=False`): a no-grad forward of the reference
(LoRA: the base with the adapter off; full: a separate frozen copy), the policy forward and
backward, the sigmoid loss (β = 0.1), clipping and AdamW. Pairs are packed as `jaxrlhf dpo`
packs them by default (`share_prompt`: the prompt runs once, log-probs of response tokens
only); tokens/s counts the chosen and rejected rows' tokens, as TRL processes them.
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
    share_prompt: bool = True,
) -> dict:
    """A one-micro-batch step input from random (or the given (prompt_ids, chosen_ids,
    rejected_ids)) unpadded pairs: packed like `jaxrlhf dpo` by default, else chosen and
    rejected rows of prompt + response."""
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
    if share_prompt:
        from jaxrlhf.data.batches import PACKED_KEYS
        from jaxrlhf.data.packing import pack_pairs

        packed = pack_pairs({**batch, "prompt_lengths": np.full((n,), lp)}, pad_id=0)
        batch = {f"packed_{k}": v for k, v in packed.items() if f"packed_{k}" in PACKED_KEYS}
        batch["pair_mask"] = np.ones((n,), np.float32)
    return {k: jnp.asarray(v[None]) for k, v in batch.items()}


def token_counts(batch: dict) -> tuple[int, int, int, int]:
    """(tokens of the chosen and rejected rows, tokens the model runs on, positions that
    get a log-prob, row length) of a `dpo_batch`."""
    if "packed_input_ids" in batch:
        run = int(np.asarray(batch["packed_attention_mask"]).sum())
        seg = np.asarray(batch["packed_segment_ids"])
        prompt = int(((seg == 0) & (np.asarray(batch["packed_attention_mask"]) == 1)).sum())
        lm = int(np.asarray(batch["packed_response_chosen"]).sum())
        lm += int(np.asarray(batch["packed_response_rejected"]).sum())
        return run + prompt, run, lm, batch["packed_input_ids"].shape[-1]
    rows = np.asarray(batch["chosen_input_ids"])
    tokens = 2 * rows.size
    return tokens, tokens, tokens - tokens // rows.shape[-1], rows.shape[-1]


def build_case(
    mode: str,
    cfg,
    params_host: dict,
    batch: dict,
    *,
    flops: bool = True,
    seed: int = 0,
    algorithm: str = "dpo",
    options: dict | None = None,
) -> Case:
    """One step of the preference algorithm `jaxrlhf.algorithms.<algorithm>` (its config
    with `lora` and `options`; DPO: β = 0.1), as its driver runs it. Full fine-tuning keeps
    a frozen reference copy only where the algorithm has a reference (DPO, KTO)."""
    import importlib

    from jaxrlhf.algorithms.common import init_train_state
    from jaxrlhf.lora import split_trainable

    algo = importlib.import_module(f"jaxrlhf.algorithms.{algorithm}").ALGORITHM
    lora_cfg = C.lora_config() if mode == "lora" else None
    hyper = algo.config(lora=lora_cfg, **({"beta": 0.1} if options is None else options))
    has_reference = algo.needs_reference(hyper)
    key = jax.random.PRNGKey(seed)
    # LoRA: the base; full: the reference copy (none for a reference-free algorithm)
    frozen = C.copy_tree(params_host) if lora_cfg or has_reference else None
    trainable, _ = split_trainable(key, frozen if lora_cfg else params_host, cfg, lora_cfg)
    trainable = C.copy_tree(trainable)
    opt = C.optimizer()
    state = init_train_state(trainable, opt, jax.random.fold_in(key, 1))
    step = algo.make_train_step(hyper, model_cfg=cfg, optimizer=opt)
    compiled, stats = C.compile_program(step, state, frozen, batch, donate_argnums=(0,))
    holder = {"state": state}

    def run():
        new, metrics = compiled(holder["state"], frozen, batch)
        C.block((new, metrics))
        holder["state"] = new

    tokens, run_tokens, lm, seq = token_counts(batch)
    analytic = C.train_flops(
        cfg, lora=lora_cfg is not None, tokens=run_tokens, context=seq, lm_tokens=lm
    )
    if has_reference:  # the reference's no-grad forward
        analytic += C.forward_flops(cfg, tokens=run_tokens, context=seq, lm_tokens=lm)
    return Case(
        mode=mode,
        run=run,
        programs={"step": stats},
        hlo=compiled.as_text,
        trainable_bytes=C.tree_bytes(state.trainable),
        optimizer_bytes=C.tree_bytes(state.opt_state),
        frozen_bytes=C.tree_bytes(frozen) if frozen is not None else 0,
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
            f"(chosen and rejected rows: {b['tokens_per_step']} tokens per step), packed with the "
            "prompt once and log-probs of response tokens only (the `dpo` default), fp32, "
            "β = 0.1, reference log-probs computed in the step. LoRA r=16, α=32, 7 projections; full "
            "fine-tuning keeps a separate frozen reference copy (counted in “resident”).",
            "",
            render_sizes(result, what="step"),
        ]
    )
