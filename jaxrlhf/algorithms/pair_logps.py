"""Token log-probs of a preference pair batch for the reference-free losses (ORPO, CPO/SimPO),
which add an SFT term on the chosen rows and so need the tokens, not only their sums.

Packed batch (prompt once, see `jaxrlhf.data.packing`): the response tokens are predicted
from their `response_prev` slots; the prompt tokens (segment 0) from the slot before them.
Unshared batch: chosen and rejected rows in one forward, token t + 1 predicted from hidden t.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.algorithms.common import dropout_args, hidden_and_aux, model_views
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import masked_mean, masked_sum
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import token_logprobs


def pair_token_logps(
    trainable: Any,
    frozen: Any,
    batch: dict,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    with_prompt: bool = False,
    rng: jax.Array | None = None,
    chunk_size: int = 128,
) -> dict[str, jax.Array]:
    """Policy log-probs per token: `chosen`/`rejected` [B, R] with their masks
    `chosen_mask`/`rejected_mask`, and with `with_prompt` also `prompt` [B, L] and
    `prompt_mask` (the prompt tokens after the first, which nothing predicts). Every mask is
    multiplied by the batch's `pair_mask`, so padding pairs count nowhere. `aux_loss`: the
    MoE router's aux loss of the forward, or None (`common.hidden_and_aux`)."""
    params, lora, scale = model_views(trainable, frozen, lora_cfg)
    extra = dropout_args(lora_cfg, rng) if rng is not None else {}
    pair = batch["pair_mask"][:, None]
    out: dict[str, Any] = {}
    if "packed_input_ids" in batch:
        ids = batch["packed_input_ids"]
        hidden, out["aux_loss"] = hidden_and_aux(
            params,
            ids,
            batch["packed_attention_mask"],
            model_cfg=model_cfg,
            lora=lora,
            lora_scale=scale,
            positions=batch["packed_positions"],
            segment_ids=batch["packed_segment_ids"],
            **extra,
        )
        prev = jnp.take_along_axis(hidden, batch["packed_response_prev"][..., None], axis=1)
        lp, _ = token_logprobs(
            params,
            prev,
            batch["packed_response_ids"],
            chunk_size=chunk_size,
            logit_softcap=model_cfg.final_logit_softcap,
        )
        out["chosen"] = out["rejected"] = lp
        out["chosen_mask"] = batch["packed_response_chosen"] * pair
        out["rejected_mask"] = batch["packed_response_rejected"] * pair
        if with_prompt:
            out["prompt"], _ = token_logprobs(
                params,
                hidden[:, :-1],
                ids[:, 1:],
                chunk_size=chunk_size,
                logit_softcap=model_cfg.final_logit_softcap,
            )
            in_prompt = (batch["packed_segment_ids"][:, 1:] == 0) & (
                batch["packed_attention_mask"][:, 1:] != 0
            )
            out["prompt_mask"] = in_prompt.astype(jnp.int32) * pair
        return out
    n = batch["chosen_input_ids"].shape[0]
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    hidden, out["aux_loss"] = hidden_and_aux(
        params, ids, mask, model_cfg=model_cfg, lora=lora, lora_scale=scale, **extra
    )
    lp, _ = token_logprobs(
        params,
        hidden[:, :-1],
        ids[:, 1:],
        chunk_size=chunk_size,
        logit_softcap=model_cfg.final_logit_softcap,
    )
    out["chosen"], out["rejected"] = lp[:n], lp[n:]
    out["chosen_mask"] = batch["chosen_response_mask"][:, 1:] * pair
    out["rejected_mask"] = batch["rejected_response_mask"][:, 1:] * pair
    if with_prompt:
        out["prompt"] = lp[:n]
        out["prompt_mask"] = (
            batch["chosen_attention_mask"][:, 1:] - batch["chosen_response_mask"][:, 1:]
        ) * pair
    return out


def sequence_pair_logps(tokens: dict, *, average: bool) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) [B]: summed (or, with `average`, length-averaged) log-probs."""
    reduce = masked_mean if average else masked_sum
    return (
        reduce(tokens["chosen"], tokens["chosen_mask"], axis=-1),
        reduce(tokens["rejected"], tokens["rejected_mask"], axis=-1),
    )


def chosen_nll_terms(tokens: dict, *, with_prompt: bool) -> tuple[jax.Array, jax.Array]:
    """(−Σ log p, token count) [B] of each chosen row (its completion, and with
    `with_prompt` its prompt too): TRL's token-mean NLL is Σ of the first / Σ of the second."""
    total = -masked_sum(tokens["chosen"], tokens["chosen_mask"], axis=-1)
    count = jnp.sum(tokens["chosen_mask"], axis=-1).astype(jnp.float32)
    if with_prompt:
        total = total - masked_sum(tokens["prompt"], tokens["prompt_mask"], axis=-1)
        count = count + jnp.sum(tokens["prompt_mask"], axis=-1).astype(jnp.float32)
    return total, count
