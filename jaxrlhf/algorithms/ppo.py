"""PPO with LoRA as jit-compiled pure steps over one frozen base.

    frozen base ─┬─ + policy adapter (merged for sampling, unmerged for training) → π_θ
                 ├─ (no adapter)                                                  → π_ref
                 ├─ + value adapter + value head (or the value head on π's trunk)  → V_φ
                 └─ + reward adapter + score head (or Python reward functions)     → score

One iteration: sample responses (`jaxrlhf.sampling`) → `experience` recomputes log π, log
π_ref and V with the training forward, adds the per-token reward `−β·KL_t` and the score at
the last response token, and runs GAE → `update` runs epochs × minibatches of the clipped
policy loss + `vf_coef`·clipped value loss (− `entropy_coef`·entropy).

Sequences are `[prompt (left-padded, P) | response (N)]`; response token j sits at P + j
and is predicted from the hidden state at P + j − 1, where its value is read too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.advantages import gae, whiten
from jaxrlhf.algorithms.common import TrainState, apply_update
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import kl_estimate, masked_mean, ppo_policy_loss, ppo_value_loss
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import backbone, score_head, token_logprobs, value_head
from jaxrlhf.train.optim import accumulate_gradients


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOHyper:
    """The static hyperparameters of the compiled steps (TRL's names and defaults)."""

    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    temperature: float = 1.0
    value_model: Literal["separate", "shared"] = "separate"
    logprob_chunk: int = 128


@dataclasses.dataclass(frozen=True)
class Adapters:
    """Which adapters the trainable tree holds (None: full fine-tuning of that model)."""

    policy: LoraConfig | None
    value: LoraConfig | None


def _response_hidden(hidden: jax.Array, prompt_len: int, n: int) -> jax.Array:
    return hidden[:, prompt_len - 1 : prompt_len - 1 + n]


def policy_outputs(
    trainable: dict,
    frozen: Any,
    input_ids,
    attention_mask,
    prompt_len: int,
    *,
    model_cfg: ModelConfig,
    adapters: Adapters,
    hyper: PPOHyper,
    with_entropy: bool = True,
) -> dict:
    """log π and entropy of the response tokens [B, N], and V [B, N] (shared critic, or
    the separate critic's own pass)."""
    n = input_ids.shape[1] - prompt_len
    targets = input_ids[:, prompt_len:]
    if adapters.policy is not None:
        params, lora, scale = frozen, trainable["policy"], adapters.policy.scale
    else:
        params, lora, scale = trainable["policy"], None, 1.0
    hidden, _ = backbone(
        params, input_ids, attention_mask, cfg=model_cfg, lora=lora, lora_scale=scale
    )
    h = _response_hidden(hidden, prompt_len, n)
    logprobs, entropy = token_logprobs(
        params,
        h,
        targets,
        temperature=hyper.temperature,
        chunk_size=hyper.logprob_chunk,
        with_entropy=with_entropy,
    )
    out = {"logprobs": logprobs, "entropy": entropy}
    if hyper.value_model == "shared":
        out["values"] = value_head(params, h, lora)
    else:
        out["values"] = critic_values(
            trainable,
            frozen,
            input_ids,
            attention_mask,
            prompt_len,
            model_cfg=model_cfg,
            adapters=adapters,
        )
    return out


def critic_values(
    trainable: dict,
    frozen: Any,
    input_ids,
    attention_mask,
    prompt_len: int,
    *,
    model_cfg: ModelConfig,
    adapters: Adapters,
) -> jax.Array:
    """V [B, N] from the separate critic: its own adapter + value head on the frozen base."""
    n = input_ids.shape[1] - prompt_len
    if adapters.value is not None:
        params, lora, scale = frozen, trainable["value"], adapters.value.scale
    else:
        params, lora, scale = trainable["value"], None, 1.0
    hidden, _ = backbone(
        params, input_ids, attention_mask, cfg=model_cfg, lora=lora, lora_scale=scale
    )
    return value_head(params, _response_hidden(hidden, prompt_len, n), lora)


def reference_logprobs(
    frozen: Any,
    input_ids,
    attention_mask,
    prompt_len: int,
    *,
    model_cfg: ModelConfig,
    hyper: PPOHyper,
) -> jax.Array:
    """log π_ref [B, N]: the frozen base with no adapter (in full fine-tuning, the frozen
    reference copy)."""
    n = input_ids.shape[1] - prompt_len
    hidden, _ = backbone(frozen, input_ids, attention_mask, cfg=model_cfg)
    lp, _ = token_logprobs(
        frozen,
        _response_hidden(hidden, prompt_len, n),
        input_ids[:, prompt_len:],
        temperature=hyper.temperature,
        chunk_size=hyper.logprob_chunk,
    )
    return lp


def reward_model_scores(
    rm_params: Any,
    rm_lora: Any,
    rm_scale: float,
    input_ids,
    attention_mask,
    *,
    model_cfg: ModelConfig,
) -> jax.Array:
    """The reward model's score [B] of each prompt+response (read at its last real token);
    no vocabulary logits are computed."""
    hidden, _ = backbone(
        rm_params, input_ids, attention_mask, cfg=model_cfg, lora=rm_lora, lora_scale=rm_scale
    )
    return score_head(rm_params, hidden, attention_mask, rm_lora)


def explained_variance(values, returns, mask) -> jax.Array:
    """1 − Var(R − V) / Var(R) over response tokens (1: perfect critic, ≤ 0: useless)."""
    var_r = masked_mean(jnp.square(returns - masked_mean(returns, mask)), mask)
    resid = returns - values
    var_res = masked_mean(jnp.square(resid - masked_mean(resid, mask)), mask)
    return 1.0 - var_res / jnp.maximum(var_r, 1e-8)


def make_experience_fn(
    *, model_cfg: ModelConfig, adapters: Adapters, hyper: PPOHyper, prompt_len: int
):
    """`experience(trainable, frozen, rollout, scores, kl_coef) -> (experience, metrics)`.

    rollout: input_ids/attention_mask [B, P+N], response_mask [B, N]; scores [B] (reward
    model + functions, penalties applied). Every output is a constant for the update."""

    def experience(trainable, frozen, rollout: dict, scores, kl_coef):
        ids, mask, resp = rollout["input_ids"], rollout["attention_mask"], rollout["response_mask"]
        resp_f = resp.astype(jnp.float32)
        pol = policy_outputs(
            trainable,
            frozen,
            ids,
            mask,
            prompt_len,
            model_cfg=model_cfg,
            adapters=adapters,
            hyper=hyper,
        )
        ref_lp = reference_logprobs(frozen, ids, mask, prompt_len, model_cfg=model_cfg, hyper=hyper)
        logprobs, values = pol["logprobs"], pol["values"] * resp_f
        kl_t = kl_estimate(logprobs, ref_lp, kind=hyper.kl_estimator) * resp_f
        rewards = -kl_coef * kl_t
        length = jnp.sum(resp, axis=-1)
        last = jnp.maximum(length - 1, 0)
        rewards = rewards.at[jnp.arange(ids.shape[0]), last].add(scores * (length > 0))
        if hyper.whiten_rewards:
            rewards = whiten(rewards, resp, shift_mean=False)
        advantages, returns = gae(rewards, values, resp, gamma=hyper.gamma, lam=hyper.lam)
        if hyper.whiten_advantages:
            advantages = whiten(advantages, resp)
        kl_seq = jnp.sum(kl_estimate(logprobs, ref_lp, kind="k1") * resp_f, axis=-1)
        exp = {
            "input_ids": ids,
            "attention_mask": mask,
            "response_mask": resp,
            "old_logprobs": logprobs,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
            "ref_logprobs": ref_lp,
        }
        metrics = {
            "objective/kl": jnp.mean(kl_seq),
            "objective/kl_estimator_mean": masked_mean(kl_t, resp),
            "objective/entropy": masked_mean(pol["entropy"], resp),
            "objective/non_score_reward": jnp.mean(jnp.sum(-kl_coef * kl_t, axis=-1)),
            "objective/rlhf_reward": jnp.mean(scores - kl_coef * kl_seq),
            "objective/scores": jnp.mean(scores),
            "objective/scores_std": jnp.std(scores),
            "val/explained_variance": explained_variance(values, returns, resp),
            "val/mean": masked_mean(values, resp),
            "val/ratio_sampler_trainer": masked_mean(
                jnp.exp(logprobs - rollout["sampler_logprobs"]), resp
            )
            if "sampler_logprobs" in rollout
            else jnp.float32(1.0),
            "val/num_eos_tokens": jnp.sum(rollout.get("finished", length > 0)),
            "response_length": jnp.mean(length.astype(jnp.float32)),
            "kl_coef": jnp.asarray(kl_coef, jnp.float32),
        }
        return jax.lax.stop_gradient(exp), jax.lax.stop_gradient(metrics)

    return experience


def ppo_loss(
    trainable: dict,
    minibatch: dict,
    frozen: Any,
    *,
    model_cfg: ModelConfig,
    adapters: Adapters,
    hyper: PPOHyper,
    prompt_len: int,
) -> tuple[jax.Array, dict]:
    """Clipped policy loss + vf_coef · clipped value loss − entropy_coef · entropy."""
    resp = minibatch["response_mask"]
    out = policy_outputs(
        trainable,
        frozen,
        minibatch["input_ids"],
        minibatch["attention_mask"],
        prompt_len,
        model_cfg=model_cfg,
        adapters=adapters,
        hyper=hyper,
        with_entropy=True,
    )
    pg_loss, pg_metrics = ppo_policy_loss(
        out["logprobs"],
        minibatch["old_logprobs"],
        minibatch["advantages"],
        resp,
        clip_eps=hyper.cliprange,
    )
    vf_loss, vf_metrics = ppo_value_loss(
        out["values"],
        minibatch["old_values"],
        minibatch["returns"],
        resp,
        clip_range=hyper.cliprange_value,
    )
    entropy = masked_mean(out["entropy"], resp)
    loss = pg_loss + hyper.vf_coef * vf_loss - hyper.entropy_coef * entropy
    metrics = {
        "loss/policy": pg_metrics["policy_loss"],
        "loss/value": vf_metrics["value_loss"],
        "loss/total": loss,
        "policy/clipfrac": pg_metrics["clipfrac"],
        "policy/approxkl": pg_metrics["approx_kl"],
        "policy/entropy": entropy,
        "val/clipfrac": vf_metrics["value_clipfrac"],
        "val/ratio": pg_metrics["ratio_mean"],
    }
    return loss, jax.lax.stop_gradient(metrics)


def make_update_fn(
    *,
    model_cfg: ModelConfig,
    adapters: Adapters,
    hyper: PPOHyper,
    optimizer: optax.GradientTransformation,
    prompt_len: int,
    micro_batches: int,
):
    """`update(state, frozen, experience, indices) -> (state, metrics)`: one optimizer step
    on the minibatch `indices` [m] of the experience (split into `micro_batches`)."""

    def loss_fn(trainable, mb, frozen):
        return ppo_loss(
            trainable,
            mb,
            frozen,
            model_cfg=model_cfg,
            adapters=adapters,
            hyper=hyper,
            prompt_len=prompt_len,
        )

    def update(state: TrainState, frozen: Any, experience: dict, indices: jax.Array):
        mb = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), experience)
        mb = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), mb)
        grads, metrics = accumulate_gradients(loss_fn, state.trainable, mb, frozen)
        state, grad_norm = apply_update(state, grads, optimizer)
        return state, {**metrics, "grad_norm": grad_norm}

    return update
