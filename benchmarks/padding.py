"""Padding: how much of a reward-model epoch is spent on token slots that are not real tokens.

A seeded synthetic preference set with long-tailed lengths (prompt and response lengths
log-normal, as in chat preference data: most short, a few near `max_length`) is batched for
one epoch in five ways, each with the functions `jaxrlhf rm` itself calls
(`data.batch_indices`, `data.pair_batch`):

- pad to `max_length`: one static shape, random order (a fixed-shape pipeline);
- pad to the longest in the batch, random order (TRL's collator, `group_by_length` off);
- length buckets (`data.default_buckets`), random order;
- buckets + length grouping (batches of similar lengths; the `rm` order);
- buckets + grouping + the prompt once per pair (the `rm` default, `share_prompt`).

Reported for each: the token slots the model computes, the real tokens in them, the padding
fraction (1 − real / slots), the slots relative to the real tokens of unshared chosen and
rejected rows (below 1 once the prompt runs once), the number of distinct batch shapes (one
compiled program each), and the LoRA reward-model step's time over the epoch with real
tokens/s (every shape compiled before timing; epochs interleaved).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C

PAIRS, BATCH, MAX_LENGTH = 192, 8, 256
PROMPT_MEDIAN, RESPONSE_MEDIAN, SIGMA = 40, 48, 0.8
STRATEGIES = (
    ("pad to max_length", "max", False, False),
    ("longest in batch (TRL collator)", "longest", False, False),
    ("length buckets", "buckets", False, False),
    ("buckets + length grouping", "buckets", True, False),
    ("buckets + grouping + prompt once (`rm` default)", "buckets", True, True),
)


def synthetic_pairs(vocab: int, *, n: int = PAIRS, seed: int = 0):
    """PreferenceData with log-normal prompt/response lengths, each pair within MAX_LENGTH."""
    from jaxrlhf import data as D

    rng = np.random.default_rng(seed)

    def lengths(median, size):
        return np.clip(np.round(rng.lognormal(np.log(median), SIGMA, size)), 4, MAX_LENGTH)

    p_len = np.minimum(lengths(PROMPT_MEDIAN, n), MAX_LENGTH // 2).astype(int)
    c_len = np.minimum(lengths(RESPONSE_MEDIAN, n), MAX_LENGTH - p_len).astype(int)
    r_len = np.minimum(lengths(RESPONSE_MEDIAN, n), MAX_LENGTH - p_len).astype(int)
    ids = lambda k: C.random_ids(rng, (k,), vocab).astype(np.int32)  # noqa: E731
    return D.PreferenceData(
        prompt_ids=tuple(ids(k) for k in p_len),
        chosen_ids=tuple(ids(k) for k in c_len),
        rejected_ids=tuple(ids(k) for k in r_len),
        margin=None,
        row_index=np.arange(n, dtype=np.int64),
    )


def epoch_batches(prefs, *, pad: str, grouped: bool, share_prompt: bool) -> list[dict]:
    """One epoch of host batches, as `jaxrlhf rm` builds them with these settings."""
    from jaxrlhf import data as D
    from jaxrlhf.data import pair_batch

    buckets = {
        "max": (MAX_LENGTH,),
        "longest": tuple(range(1, MAX_LENGTH + 1)),
        "buckets": D.default_buckets(MAX_LENGTH),
    }[pad]
    out, position = [], 0
    for _ in range(D.steps_per_epoch(len(prefs), BATCH)):
        idx, position = D.batch_indices(
            len(prefs),
            batch_size=BATCH,
            seed=0,
            position=position,
            lengths=prefs.batching_lengths(share_prompt) if grouped else None,
        )
        out.append(
            pair_batch(
                prefs,
                idx,
                pad_id=0,
                buckets=buckets,
                batch_size=BATCH,
                share_prompt=share_prompt,
            )
        )
    return out


def count(batches: list[dict], prefs) -> dict:
    slots = real = 0
    shapes = set()
    for b in batches:
        if "packed_attention_mask" in b:
            masks = [b["packed_attention_mask"]]
        else:
            masks = [b["chosen_attention_mask"], b["rejected_attention_mask"]]
        slots += sum(m.size for m in masks)
        real += sum(int(m.sum()) for m in masks)
        shapes.add(tuple(m.shape for m in masks))
    unshared = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(prefs.prompt_ids, prefs.chosen_ids, prefs.rejected_ids, strict=True)
    )
    return {
        "slots": slots,
        "real_in_slots": real,
        "padding_fraction": 1.0 - real / slots,
        "unshared_tokens": unshared,
        "slots_over_unshared": slots / unshared,
        "shapes": len(shapes),
    }


def run(*, size: str, repeats: int, pairs: int = PAIRS) -> dict:
    from jaxrlhf.algorithms import reward_model as R
    from jaxrlhf.algorithms.common import init_train_state
    from jaxrlhf.lora import split_trainable

    cfg = C.model_config(size)
    prefs = synthetic_pairs(cfg.vocab_size, n=pairs)
    params = C.random_params(cfg)
    lora_cfg = C.lora_config("SEQ_CLS", ("score",))
    key = jax.random.PRNGKey(0)
    trainable, frozen = split_trainable(key, C.copy_tree(params), cfg, lora_cfg, heads=("score",))
    opt = C.optimizer()
    step = jax.jit(R.make_train_step(R.RMConfig(lora=lora_cfg), model_cfg=cfg, optimizer=opt))
    state = init_train_state(C.copy_tree(trainable), opt, jax.random.fold_in(key, 1))

    rows, epochs = [], {}
    for name, pad, grouped, share in STRATEGIES:
        print(f"[padding] {size} {name}", flush=True)
        batches = epoch_batches(prefs, pad=pad, grouped=grouped, share_prompt=share)
        device = [{k: jnp.asarray(v[None]) for k, v in b.items()} for b in batches]
        for b in device:  # compile every shape outside the timed epochs
            C.block(step(state, frozen, b))
        rows.append({"strategy": name, **count(batches, prefs)})
        epochs[name] = device

    def epoch(device):
        s = state
        for b in device:
            s, metrics = step(s, frozen, b)
        C.block(metrics)

    # The compile pass above ran every batch once: no further warm-up.
    timed = C.interleaved(
        {name: lambda d=device: epoch(d) for name, device in epochs.items()},
        repeats=repeats,
        warmup=0,
    )
    for row in rows:
        t = timed[row["strategy"]]["median_s"]
        row["epoch_s"] = round(t, 3)
        row["real_tokens_per_s"] = row["unshared_tokens"] / t
    base = rows[0]["epoch_s"]
    for row in rows:
        row["speedup_over_max"] = base / row["epoch_s"]
    return {
        "benchmark": "padding",
        "size": size,
        "model": C.size_info(cfg),
        "data": {
            "pairs": len(prefs),
            "batch": BATCH,
            "max_length": MAX_LENGTH,
            "prompt_median": PROMPT_MEDIAN,
            "response_median": RESPONSE_MEDIAN,
            "sigma": SIGMA,
            "mean_pair_length": float(np.mean(prefs.lengths)),
        },
        "rows": rows,
    }


def render(result: dict) -> str:
    d = result["data"]
    head = (
        f"One epoch of {d['pairs']} synthetic pairs, {d['batch']} per batch, max_length "
        f"{d['max_length']}; prompt and response lengths log-normal (medians {d['prompt_median']} "
        f"and {d['response_median']} tokens, σ = {d['sigma']}; the longer of prompt+chosen and "
        f"prompt+rejected averages {d['mean_pair_length']:.0f}). LoRA reward-model step at "
        f"{result['size']} ({result['model']['params'] / 1e6:.0f}M parameters); every shape compiled before "
        "timing, epochs interleaved. *Real tokens* counts chosen and rejected rows with their "
        "prompt each, as an unshared model computes them."
    )
    rows = [
        [
            r["strategy"],
            f"{r['slots']:,}",
            f"{100 * r['padding_fraction']:.0f}%",
            f"{r['slots_over_unshared']:.2f}",
            str(r["shapes"]),
            f"{r['epoch_s']:.2f}",
            f"{r['real_tokens_per_s']:.0f}",
            f"**{r['speedup_over_max']:.2f}×**",
        ]
        for r in result["rows"]
    ]
    return "\n".join(
        [
            head,
            "",
            C.table(
                [
                    "batching",
                    "token slots computed",
                    "padding fraction",
                    "slots / real tokens",
                    "batch shapes",
                    "epoch s (median)",
                    "real tokens/s",
                    "speed vs pad to max",
                ],
                rows,
            ),
        ]
    )
