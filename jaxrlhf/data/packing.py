"""Prefix sharing for preference pairs: run the prompt once for chosen and rejected.

A pair (prompt, chosen, rejected) becomes one packed row

    tokens     p0 p1 p2 | c0 c1 c2 | r0 r1 | pad …
    positions  0  1  2  | 3  4  5  | 3  4  |
    segment    0  0  0  | 1  1  1  | 2  2  |

and attention is causal by slot with one extra rule: a token of segment 1 or 2 sees the
shared prompt (segment 0) and its own segment only (see `build_attention_mask`). Keys and
values of the prompt are computed once, so a pair costs `p + c + r` tokens instead of
`2p + c + r`. The score of each response is read at its last token; the log-probability
of a response token comes from the hidden state of its predecessor (`prev_index`), which for
the first token of either response is the last prompt token.

Only response tokens need a log-probability, so the packed row also lists them in a
narrower window (`response_prev`, `response_ids`, `response_chosen`, `response_rejected`,
[B, R] with R the longest chosen + rejected length, bucketed): DPO runs the vocabulary
projection on those R positions only, never on the prompt.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxrlhf.data.buckets import bucket_length


def _fit(n: int, buckets: tuple[int, ...]) -> int:
    """The bucket of length n, or n itself when no buckets are given."""
    return bucket_length(n, buckets) if buckets else n


def pack_pairs(batch: dict, *, pad_id: int, buckets: tuple[int, ...] = ()) -> dict:
    """Packed arrays from a right-padded pair batch (`chosen_input_ids`, `rejected_input_ids`,
    their attention masks and `prompt_lengths`). Returns numpy arrays [B, Lp]:
    `input_ids`, `attention_mask`, `positions`, `segment_ids`, `prev_index`,
    `chosen_mask`/`rejected_mask` (response tokens), `chosen_last`/`rejected_last` [B], and
    the response window [B, R]: `response_prev` (the slot whose hidden state predicts the
    token), `response_ids` (the token) and `response_chosen`/`response_rejected` masks."""
    c_ids, r_ids = np.asarray(batch["chosen_input_ids"]), np.asarray(batch["rejected_input_ids"])
    c_len = np.asarray(batch["chosen_attention_mask"]).sum(-1)
    r_len = np.asarray(batch["rejected_attention_mask"]).sum(-1)
    p_len = np.asarray(batch["prompt_lengths"])
    n = c_ids.shape[0]
    totals = c_len + (r_len - p_len)
    length = _fit(int(max(totals.max(), 2)), tuple(sorted(buckets)))
    response_totals = np.where((c_len > 0) & (r_len > 0), c_len + r_len - 2 * p_len, 0)
    width = _fit(int(max(response_totals.max(), 1)), tuple(sorted(buckets)))
    out = {
        "input_ids": np.full((n, length), pad_id, np.int32),
        "attention_mask": np.zeros((n, length), np.int32),
        "positions": np.zeros((n, length), np.int32),
        "segment_ids": np.zeros((n, length), np.int32),
        "prev_index": np.zeros((n, length), np.int32),
        "chosen_mask": np.zeros((n, length), np.int32),
        "rejected_mask": np.zeros((n, length), np.int32),
        "chosen_last": np.zeros((n,), np.int32),
        "rejected_last": np.zeros((n,), np.int32),
        "response_prev": np.zeros((n, width), np.int32),
        "response_ids": np.full((n, width), pad_id, np.int32),
        "response_chosen": np.zeros((n, width), np.int32),
        "response_rejected": np.zeros((n, width), np.int32),
    }
    for i in range(n):
        p, c, r = int(p_len[i]), int(c_len[i]), int(r_len[i])
        if c == 0 or r == 0:  # a padding pair: leave it empty (masked by pair_mask)
            continue
        if not np.array_equal(c_ids[i, :p], r_ids[i, :p]):
            raise ValueError(
                f"pair {i}: chosen and rejected do not share their first {p} "
                f"(prompt) tokens; prefix sharing needs a common prompt"
            )
        rej = r_ids[i, p:r]
        row = np.concatenate([c_ids[i, :c], rej])
        t = len(row)
        out["input_ids"][i, :t] = row
        out["attention_mask"][i, :t] = 1
        out["positions"][i, :c] = np.arange(c)
        out["positions"][i, c:t] = np.arange(p, r)
        out["segment_ids"][i, p:c] = 1
        out["segment_ids"][i, c:t] = 2
        prev = np.arange(t) - 1
        if r > p:
            prev[c] = p - 1  # the first rejected token follows the prompt, not the chosen
        out["prev_index"][i, :t] = np.maximum(prev, 0)
        out["chosen_mask"][i, p:c] = 1
        out["rejected_mask"][i, c:t] = 1
        out["chosen_last"][i] = c - 1
        out["rejected_last"][i] = t - 1
        slots = np.arange(p, t)  # the chosen response, then the rejected one
        out["response_prev"][i, : len(slots)] = out["prev_index"][i, slots]
        out["response_ids"][i, : len(slots)] = row[slots]
        out["response_chosen"][i, : c - p] = 1
        out["response_rejected"][i, c - p : len(slots)] = 1
    return out


def padding_fraction_packed(packed: dict) -> float:
    mask = np.asarray(packed["attention_mask"])
    return float(1.0 - mask.sum() / mask.size)


def pack_groups(input_ids, attention_mask, prompt_len: int, group: int) -> dict:
    """GRPO's groups with the prompt once (traceable, static shapes).

    input_ids, attention_mask: [B, P + N] rows `[left-padded prompt | completion]`, the
    `group` completions of a prompt consecutive. Returns [B / group, P + group·N] arrays
    `input_ids`, `attention_mask`, `positions`, `segment_ids` (completion j is segment
    j + 1: it sees the prompt and itself, as in `pack_pairs`) and `prev_index` [B / group,
    group·N]: the slot whose hidden state predicts each completion token (the last prompt
    slot for token 0). Completion token k keeps its unpacked position n_prompt + k, so the
    log-probs equal the unpacked ones."""
    b, total = input_ids.shape
    n, g = total - prompt_len, group
    ids = input_ids.reshape(b // g, g, total)
    mask = attention_mask.reshape(b // g, g, total)
    prompt_mask = mask[:, 0, :prompt_len]
    k = jnp.tile(jnp.arange(n), g)  # token index within its completion
    j = jnp.repeat(jnp.arange(g), n)  # its completion
    prompt_pos = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    response_pos = jnp.sum(prompt_mask, axis=-1, keepdims=True) + k[None]
    prev = jnp.where(k == 0, prompt_len - 1, prompt_len + j * n + k - 1)
    rows = b // g
    return {
        "input_ids": jnp.concatenate(
            [ids[:, 0, :prompt_len], ids[:, :, prompt_len:].reshape(rows, g * n)], axis=1
        ),
        "attention_mask": jnp.concatenate(
            [prompt_mask, mask[:, :, prompt_len:].reshape(rows, g * n)], axis=1
        ),
        "positions": jnp.concatenate([prompt_pos, response_pos], axis=1).astype(jnp.int32),
        "segment_ids": jnp.broadcast_to(
            jnp.concatenate([jnp.zeros((prompt_len,), jnp.int32), j + 1])[None],
            (rows, prompt_len + g * n),
        ),
        "prev_index": jnp.broadcast_to(prev[None], (rows, g * n)).astype(jnp.int32),
    }
