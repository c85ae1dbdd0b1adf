"""Reward-model step (Bradley–Terry), LoRA vs full fine-tuning.

One step = `jaxrlhf.algorithms.reward_model.make_train_step`: forward of each pair (a
32-token prompt and two 32-token responses, packed as `jaxrlhf rm` packs them by default so
the prompt runs once; TRL's RewardTrainer runs chosen and rejected rows of 64 tokens), the
pairwise loss, gradients w.r.t. the trainable tree, global-norm clipping and AdamW. LoRA: r=16, alpha=32 on all seven
projections + the `score` head (modules_to_save); full: every parameter + the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C
from benchmarks.harness import Case, render_breakdown, render_sizes, run_cases

PAIRS, SEQ, PROMPT = 8, 64, 32


def pair_batch(
    cfg,
    *,
    pairs: int = PAIRS,
    seq: int = SEQ,
    seed: int = 0,
    prompt: int = PROMPT,
    chosen: np.ndarray | None = None,
    rejected: np.ndarray | None = None,
    share_prompt: bool = True,
) -> dict:
    """One micro-batch of unpadded random pairs whose rows share their first `prompt` tokens
    (or the given rows): packed like `jaxrlhf rm` by default, else chosen/rejected rows."""
    rng = np.random.default_rng(seed)
    if chosen is None:
        p = C.random_ids(rng, (pairs, prompt), cfg.vocab_size)
        c, r = (
            np.concatenate([p, C.random_ids(rng, (pairs, seq - prompt), cfg.vocab_size)], 1)
            for _ in range(2)
        )
    else:
        c, r = chosen, rejected
    ones = np.ones_like(c, dtype=np.int32)
    batch = {
        "chosen_input_ids": c,
        "chosen_attention_mask": ones,
        "rejected_input_ids": r,
        "rejected_attention_mask": ones,
        "pair_mask": np.ones((c.shape[0],), np.float32),
    }
    if share_prompt:
        from jaxrlhf.data.packing import pack_pairs

        packed = pack_pairs({**batch, "prompt_lengths": np.full((c.shape[0],), prompt)}, pad_id=0)
        batch = {
            **{f"packed_{k}": packed[k] for k in PACKED},
            "chosen_last": packed["chosen_last"],
            "rejected_last": packed["rejected_last"],
            "pair_mask": batch["pair_mask"],
        }
    return {k: jnp.asarray(v[None]) for k, v in batch.items()}


PACKED = ("input_ids", "attention_mask", "positions", "segment_ids")


def token_counts(batch: dict) -> tuple[int, int, int]:
    """(tokens of the chosen and rejected rows, tokens the model runs on, row length)."""
    if "packed_input_ids" in batch:
        mask = np.asarray(batch["packed_attention_mask"])
        prompt = int(((np.asarray(batch["packed_segment_ids"]) == 0) & (mask == 1)).sum())
        return int(mask.sum()) + prompt, int(mask.sum()), mask.shape[-1]
    rows = np.asarray(batch["chosen_input_ids"])
    return 2 * rows.size, 2 * rows.size, rows.shape[-1]


def build_case(
    mode: str, cfg, params_host: dict, batch: dict, *, flops: bool = True, seed: int = 0
) -> tuple[Case, dict]:
    """The compiled RM step of `mode` and the pieces (for the forward/backward breakdown)."""
    from jaxrlhf.algorithms import reward_model as R
    from jaxrlhf.algorithms.common import init_train_state
    from jaxrlhf.lora import split_trainable

    lora_cfg = C.lora_config("SEQ_CLS", ("score",)) if mode == "lora" else None
    key = jax.random.PRNGKey(seed)
    base = C.copy_tree(params_host)
    trainable, frozen = split_trainable(key, base, cfg, lora_cfg, heads=("score",))
    trainable = C.copy_tree(trainable)
    if frozen is None:
        del base
    opt = C.optimizer()
    state = init_train_state(trainable, opt, jax.random.fold_in(key, 1))
    step = R.make_train_step(R.RMConfig(lora=lora_cfg), model_cfg=cfg, optimizer=opt)
    compiled, stats = C.compile_program(step, state, frozen, batch, donate_argnums=(0,))
    holder = {"state": state}

    def run():
        new, metrics = compiled(holder["state"], frozen, batch)
        C.block((new, metrics))
        holder["state"] = new

    tokens, run_tokens, seq = token_counts(batch)
    case = Case(
        mode=mode,
        run=run,
        programs={"step": stats},
        hlo=compiled.as_text,
        trainable_bytes=C.tree_bytes(state.trainable),
        optimizer_bytes=C.tree_bytes(state.opt_state),
        frozen_bytes=C.tree_bytes(frozen) if frozen is not None else 0,
        tokens=tokens,
        flops_xla=C.xla_flops(step, state, frozen, batch) if flops else None,
        flops_analytic=C.train_flops(
            cfg, lora=lora_cfg is not None, tokens=run_tokens, context=seq
        ),
    )
    return case, {"holder": holder, "frozen": frozen, "lora_cfg": lora_cfg, "step": step}


def breakdown(cfg, cases: dict[str, tuple[Case, dict]], batch: dict, *, repeats: int) -> dict:
    """Forward only and forward+backward (no optimizer) of each mode, interleaved with the
    whole step, so the lead can see where the time goes."""
    from jaxrlhf.algorithms import reward_model as R

    micro = jax.tree.map(lambda x: x[0], batch)
    thunks = {}
    for mode, (case, parts) in cases.items():
        lora_cfg, frozen = parts["lora_cfg"], parts["frozen"]
        trainable = C.copy_tree(parts["holder"]["state"].trainable)  # the step donates its state

        def fwd(tr, fr, b, lora_cfg=lora_cfg):
            return R.pair_rewards(tr, fr, b, model_cfg=cfg, lora_cfg=lora_cfg)

        def loss(tr, fr, b, lora_cfg=lora_cfg):
            return R.reward_loss(
                tr, b, fr, None, model_cfg=cfg, lora_cfg=lora_cfg, center_rewards_coefficient=None
            )[0]

        f_c, _ = C.compile_program(fwd, trainable, frozen, micro)
        g_c, _ = C.compile_program(jax.value_and_grad(loss), trainable, frozen, micro)
        thunks[f"{mode}/forward_s"] = lambda f=f_c, t=trainable, fr=frozen: C.block(f(t, fr, micro))
        thunks[f"{mode}/grad_s"] = lambda g=g_c, t=trainable, fr=frozen: C.block(g(t, fr, micro))
        thunks[f"{mode}/step_s"] = case.run
    timed = C.interleaved(thunks, repeats=repeats, warmup=1)
    out: dict[str, dict] = {}
    for name, t in timed.items():
        mode, part = name.split("/")
        out.setdefault(mode, {})[part] = round(t["median_s"], 4)
    return out


def remat_tradeoff(cfg, params, batch: dict, *, repeats: int, pairs: int = 32) -> dict:
    """The LoRA step with `model.remat` none vs block (activations of each decoder block
    recomputed in the backward), on a 4× larger batch where activations dominate: the
    compiled program's peak and the step time, interleaved."""
    import dataclasses

    big = pair_batch(cfg, pairs=pairs)
    out, thunks = {}, {}
    for remat in ("none", "block"):
        case, _ = build_case(
            "lora", dataclasses.replace(cfg, remat=remat), params, big, flops=False
        )
        thunks[remat] = case.run
        out[remat] = {
            "compiled_peak_bytes": case.programs["step"].get("footprint_bytes"),
            "temp_bytes": case.programs["step"].get("temp_bytes"),
        }
    for remat, t in C.interleaved(thunks, repeats=repeats, warmup=1).items():
        out[remat]["step_s"] = round(t["median_s"], 4)
    out["pairs"] = pairs
    return out


def run(
    *, sizes: list[str], repeats: int, roofline: dict | None, breakdown_sizes: tuple[str, ...] = ()
) -> dict:
    result = {
        "benchmark": "rm",
        "batch": {
            "pairs": PAIRS,
            "seq_len": SEQ,
            "prompt": PROMPT,
            "tokens_per_step": 2 * PAIRS * SEQ,
        },
        "sizes": [],
    }
    for size in sizes:
        print(f"[rm] {size}", flush=True)
        cfg = C.model_config(size)
        params = C.random_params(cfg)
        batch = pair_batch(cfg)
        built = {mode: build_case(mode, cfg, params, batch) for mode in ("lora", "full")}
        entry = {"size": size, "model": C.size_info(cfg)}
        entry.update(run_cases([b[0] for b in built.values()], repeats=repeats, roofline=roofline))
        if size in breakdown_sizes:
            entry["breakdown"] = breakdown(cfg, built, batch, repeats=max(2, repeats - 1))
        built = None  # free the cases' device buffers before the next ones
        if size in breakdown_sizes:
            entry["remat"] = remat_tradeoff(cfg, params, batch, repeats=max(2, repeats - 1))
        result["sizes"].append(entry)
        del params
    return result


def render(result: dict) -> str:
    b = result["batch"]
    parts = [
        f"Batch: {b['pairs']} pairs × {b['seq_len']} tokens (chosen and rejected rows, "
        f"{b['tokens_per_step']} tokens per step) sharing a {b.get('prompt', 0)}-token prompt, "
        "packed with the prompt once (the `rm` default), fp32. LoRA r=16, α=32, "
        "7 projections + score head.",
        "",
        render_sizes(result, what="step"),
    ]
    bd = render_breakdown(result)
    if bd:
        parts += ["", "Where the time goes (medians, interleaved; % of the whole step):", "", bd]
    rows = []
    for entry in result["sizes"]:
        r = entry.get("remat")
        if not r:
            continue
        none, block = r["none"], r["block"]
        rows.append(
            [
                entry["size"],
                str(r["pairs"]),
                C.fmt_bytes(none["compiled_peak_bytes"]),
                C.fmt_bytes(block["compiled_peak_bytes"]),
                f"{none['compiled_peak_bytes'] / block['compiled_peak_bytes']:.2f}×",
                f"{none['step_s']:.3f}",
                f"{block['step_s']:.3f}",
                f"{block['step_s'] / none['step_s']:.2f}×",
            ]
        )
    if rows:
        parts += [
            "",
            "`model.remat: block` (recompute each decoder block's activations in the backward), "
            "LoRA step, pairs as above but more of them:",
            "",
            C.table(
                [
                    "model",
                    "pairs",
                    "compiled peak, remat none",
                    "remat block",
                    "memory saved (none/block)",
                    "step s, none",
                    "step s, block",
                    "time cost (block/none)",
                ],
                rows,
            ),
        ]
    return "\n".join(parts)
