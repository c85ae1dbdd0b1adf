"""GRPO with LoRA as jit-compiled pure steps over one frozen base.

    frozen base ─┬─ + policy adapter (merged for sampling, unmerged for training) → π_θ
                 └─ (no adapter)                                                  → π_ref  (β > 0 only)

Group Relative Policy Optimization (Shao et al., 2024) drops PPO's critic: each prompt is
sampled G times, and completion i of a group gets the advantage

    A_i = (r_i − mean(r_group)) / (std(r_group) + eps)      (or without the division)

for all its tokens. One iteration: sample `prompts × G` completions (`jaxrlhf.sampling`) →
score them → `prepare` computes the group advantages and, only when needed, two constant
passes: log π_old (when the batch is reused: μ > 1 passes, or several mini-batches) and
log π_ref (when β > 0) → `update` runs the clipped objective of `jaxrlhf.losses.grpo_loss`
on a mini-batch, μ × mini-batches times.

With β = 0 (TRL's default) the reference is never evaluated, so an iteration costs one
training forward+backward per pass and no extra forward. With μ = 1 and one mini-batch,
π_old = π (ratio 1, gradient ∇ log π), so the old log-probs are not computed either.

Sequences are `[prompt (left-padded, P) | response (N)]`; response token j sits at P + j
and is predicted from the hidden state at P + j − 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.advantages import group_advantages
from jaxrlhf.algorithms.common import TrainState, apply_update, model_views
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import GRPO_LOSS_ALIASES, grpo_loss, masked_mean
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import backbone, token_logprobs
from jaxrlhf.packing import pack_groups
from jaxrlhf.train.optim import accumulate_gradients


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOHyper:
    """The static hyperparameters of the compiled steps (TRL's names)."""

    num_generations: int
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: bool = True
    temperature: float = 1.0
    max_completion_length: int | None = None
    """For loss_type dr_grpo: the normaliser (generation.max_new_tokens)."""
    use_old_logprobs: bool = False
    """Compute log π_old in `prepare` (needed when one generation batch feeds more than one
    optimizer step: μ > 1 or several mini-batches)."""
    log_entropy: bool = True
    logprob_chunk: int = 128
    share_prompt: bool = False
    """Run each prompt once for its group (`packing.pack_groups`); every batch the steps see
    must then hold whole groups, consecutive."""


def response_logprobs(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    prompt_len: int,
    *,
    model_cfg: ModelConfig,
    lora: Any = None,
    lora_scale: Any = 1.0,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
    group: int = 1,
) -> tuple[jax.Array, jax.Array | None]:
    """log p (and the entropy) of the response tokens, [B, N], from `[prompt | response]`
    sequences [B, P + N]: token P + j is predicted from the hidden state at P + j − 1.
    With `group` > 1 the rows are consecutive groups of one prompt's completions and run
    packed, the prompt once per group (same numbers, fewer tokens).

    `lora=None` is the base model: the reference policy when `params` is the frozen base."""
    n = input_ids.shape[1] - prompt_len
    if group > 1:
        packed = pack_groups(input_ids, attention_mask, prompt_len, group)
        hidden, _ = backbone(
            params,
            packed["input_ids"],
            packed["attention_mask"],
            cfg=model_cfg,
            lora=lora,
            lora_scale=lora_scale,
            positions=packed["positions"],
            segment_ids=packed["segment_ids"],
        )
        h = jnp.take_along_axis(hidden, packed["prev_index"][..., None], axis=1)
        h = h.reshape(input_ids.shape[0], n, h.shape[-1])
    else:
        hidden, _ = backbone(
            params, input_ids, attention_mask, cfg=model_cfg, lora=lora, lora_scale=lora_scale
        )
        h = hidden[:, prompt_len - 1 : prompt_len - 1 + n]
    return token_logprobs(
        params,
        h,
        input_ids[:, prompt_len:],
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )


def policy_logprobs(
    trainable: Any,
    frozen: Any,
    input_ids,
    attention_mask,
    prompt_len: int,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    hyper: GRPOHyper,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """log π_θ of the response tokens: the frozen base + the unmerged adapter (LoRA) or the
    trained params (full fine-tuning)."""
    params, lora, scale = model_views(trainable, frozen, lora_cfg)
    return response_logprobs(
        params,
        input_ids,
        attention_mask,
        prompt_len,
        model_cfg=model_cfg,
        lora=lora,
        lora_scale=scale,
        temperature=hyper.temperature,
        chunk_size=hyper.logprob_chunk,
        with_entropy=with_entropy,
        group=hyper.num_generations if hyper.share_prompt else 1,
    )


def reference_logprobs(
    frozen: Any,
    input_ids,
    attention_mask,
    prompt_len: int,
    *,
    model_cfg: ModelConfig,
    hyper: GRPOHyper,
) -> jax.Array:
    """log π_ref: the frozen base with no adapter (in full fine-tuning, the frozen copy)."""
    lp, _ = response_logprobs(
        frozen,
        input_ids,
        attention_mask,
        prompt_len,
        model_cfg=model_cfg,
        temperature=hyper.temperature,
        chunk_size=hyper.logprob_chunk,
        group=hyper.num_generations if hyper.share_prompt else 1,
    )
    return lp


def make_prepare_fn(
    *, model_cfg: ModelConfig, lora_cfg: LoraConfig | None, hyper: GRPOHyper, prompt_len: int
):
    """`prepare(trainable, frozen, rollout, scores) -> (batch, metrics)`.

    rollout: input_ids/attention_mask [B, P+N], response_mask [B, N], finished [B], with
    the G completions of a prompt consecutive; scores [B] (weighted rewards, penalties
    applied). The batch holds the sequences, `advantages` [B] and, only when needed,
    `old_logprobs` (hyper.use_old_logprobs) and `ref_logprobs` (β > 0) [B, N]; every entry
    is a constant for the update."""

    def prepare(trainable, frozen, rollout: dict, scores):
        ids, mask, resp = rollout["input_ids"], rollout["attention_mask"], rollout["response_mask"]
        scores = jnp.asarray(scores, jnp.float32)
        advantages, group_std = group_advantages(
            scores, hyper.num_generations, scale_by_std=hyper.scale_rewards
        )
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "response_mask": resp,
            "advantages": advantages,
        }
        if hyper.use_old_logprobs:
            batch["old_logprobs"], _ = policy_logprobs(
                trainable,
                frozen,
                ids,
                mask,
                prompt_len,
                model_cfg=model_cfg,
                lora_cfg=lora_cfg,
                hyper=hyper,
            )
        if hyper.beta > 0:
            batch["ref_logprobs"] = reference_logprobs(
                frozen, ids, mask, prompt_len, model_cfg=model_cfg, hyper=hyper
            )
        length = jnp.sum(resp, axis=-1).astype(jnp.float32)
        finished = rollout.get("finished", jnp.ones(ids.shape[:1], bool))
        metrics = {
            "reward": jnp.mean(scores),
            # TRL's reward_std: the mean over groups of the within-group std.
            "reward_std": jnp.mean(group_std),
            "frac_reward_zero_std": jnp.mean((group_std <= 1e-8).astype(jnp.float32)),
            "completion_length": jnp.mean(length),
            "completions/clipped_ratio": 1.0 - jnp.mean(finished.astype(jnp.float32)),
        }
        return jax.lax.stop_gradient(batch), jax.lax.stop_gradient(metrics)

    return prepare


def grpo_objective(
    trainable: Any,
    micro: dict,
    frozen: Any,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    hyper: GRPOHyper,
    prompt_len: int,
) -> tuple[jax.Array, dict]:
    """`grpo_loss` of one micro-batch, times `micro["loss_scale"]` (see `make_update_fn`)."""
    resp = micro["response_mask"]
    lp, entropy = policy_logprobs(
        trainable,
        frozen,
        micro["input_ids"],
        micro["attention_mask"],
        prompt_len,
        model_cfg=model_cfg,
        lora_cfg=lora_cfg,
        hyper=hyper,
        with_entropy=hyper.log_entropy,
    )
    loss, m = grpo_loss(
        lp,
        micro.get("old_logprobs"),
        micro.get("ref_logprobs"),
        micro["advantages"],
        resp,
        clip_eps=hyper.epsilon,
        clip_eps_high=hyper.epsilon_high,
        beta=hyper.beta,
        loss_type=hyper.loss_type,
        max_completion_length=hyper.max_completion_length,
    )
    loss = loss * micro["loss_scale"]
    metrics = {"loss": loss, "kl": m["kl"], "clip_ratio": m["clip_ratio"], "ratio": m["ratio_mean"]}
    if hyper.log_entropy:
        metrics["entropy"] = masked_mean(entropy, resp)
    return loss, jax.lax.stop_gradient(metrics)


def make_update_fn(
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    hyper: GRPOHyper,
    optimizer: optax.GradientTransformation,
    prompt_len: int,
    micro_batches: int,
):
    """`update(state, frozen, batch, indices) -> (state, metrics)`: one optimizer step on the
    rows `indices` [m] of the prepared batch, split into `micro_batches` for gradient
    accumulation (mean of the micro-batch gradients).

    "dapo" normalises by the tokens of the whole optimizer batch, so each micro-batch's
    token-mean loss is scaled by (its tokens × micro_batches / the batch's tokens); the
    other loss types are already means over equal-sized micro-batches."""
    loss_type = GRPO_LOSS_ALIASES.get(hyper.loss_type, hyper.loss_type)

    def loss_fn(trainable, micro, frozen):
        return grpo_objective(
            trainable,
            micro,
            frozen,
            model_cfg=model_cfg,
            lora_cfg=lora_cfg,
            hyper=hyper,
            prompt_len=prompt_len,
        )

    def update(state: TrainState, frozen: Any, batch: dict, indices: jax.Array):
        mb = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), batch)
        mb = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), mb)
        tokens = jnp.sum(mb["response_mask"], axis=(1, 2)).astype(jnp.float32)
        if loss_type == "dapo":
            mb["loss_scale"] = tokens * micro_batches / jnp.maximum(jnp.sum(tokens), 1.0)
        else:
            mb["loss_scale"] = jnp.ones((micro_batches,), jnp.float32)
        grads, metrics = accumulate_gradients(loss_fn, state.trainable, mb, frozen)
        state, grad_norm = apply_update(state, grads, optimizer)
        return state, {**metrics, "grad_norm": grad_norm}

    return update
