"""PPO with LoRA as jit-compiled pure steps over one frozen base.

    frozen base ─┬─ + policy adapter (merged for sampling, unmerged for training) → π_θ
                 ├─ (no adapter)                                                  → π_ref
                 ├─ + value adapter + value head (or the value head on π's trunk)  → V_φ
                 └─ + reward adapter + score head (or Python reward functions)     → score

One iteration: sample responses (`jaxrlhf.rollout`) → `experience` recomputes log π, log
π_ref and V with the training forward, adds the per-token reward `−β·KL_t` and the score at
the last response token, and runs GAE → `update` runs epochs × minibatches of the clipped
policy loss + `vf_coef`·clipped value loss (− `entropy_coef`·entropy).

Sequences are `[prompt (left-padded, P) | response (N)]`; response token j sits at P + j
and is predicted from the hidden state at P + j − 1, where its value is read too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.advantages import gae, whiten
from jaxrlhf.algorithms.common import add_router_aux_loss, hidden_and_aux, make_minibatch_update
from jaxrlhf.algorithms.spec import IterationPlan, KLControlSettings, OnlineAlgorithm
from jaxrlhf.config import OnlineTraining, check_literal
from jaxrlhf.lora import LoraConfig, adapter_member, split_trainable
from jaxrlhf.losses import kl_estimate, masked_mean, ppo_policy_loss, ppo_value_loss
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import backbone, token_logprobs, value_head


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(OnlineTraining):
    """`jaxrlhf ppo`. Names and defaults follow TRL's PPOConfig where it has the option."""

    command: ClassVar[str] = "ppo"

    value_lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(modules_to_save=("value",))
    )
    """The critic's adapter (value_model: separate); `null` for a fully trained critic."""
    value_model: Literal["separate", "shared"] = "separate"
    value_init_from_reward_model: bool = False
    """Start the critic from the reward model's adapter and score head (InstructGPT)."""
    score_clip: float | None = None
    score_scaling: Literal["none", "batch"] = "none"
    """`batch`: standardise the scores of each rollout batch."""
    num_iterations: int = 100
    rollout_batch_size: int = 64
    mini_batch_size: int = 16
    num_ppo_epochs: int = 4
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    target_kl: float | None = None
    """Stop the iteration's remaining PPO epochs once the mean approximate KL exceeds this."""
    logprob_chunk: int = 128
    """Tokens per chunk of the vocabulary projection in the log-prob passes (memory bound)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_literal(self, "value_model", ("separate", "shared"))
        check_literal(self, "kl_estimator", ("k1", "k2", "k3"))
        check_literal(self, "score_scaling", ("none", "batch"))
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple "
                f"of mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.optim.grad_accum_steps:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                f"optim.grad_accum_steps ({self.optim.grad_accum_steps})"
            )
        if (
            self.value_model == "shared"
            and self.lora is not None
            and "value" not in self.lora.modules_to_save
        ):
            raise ValueError(
                "value_model: shared puts the value head on the policy adapter; "
                "add 'value' to lora.modules_to_save"
            )
        if (
            self.value_model == "separate"
            and self.value_lora is not None
            and "value" not in self.value_lora.modules_to_save
        ):
            raise ValueError("value_lora.modules_to_save must include 'value'")
        if self.num_iterations < 1 or self.num_ppo_epochs < 1:
            raise ValueError("num_iterations and num_ppo_epochs must be >= 1")
        for name in ("lora", "value_lora"):
            adapter = getattr(self, name)
            if adapter is not None and adapter.dropout > 0:
                raise ValueError(
                    f"{name}.dropout must be 0 for PPO: dropout would make the "
                    f"trainer's log-probs differ from the rollout's"
                )


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
    cfg: PPOConfig,
    with_entropy: bool = True,
    entropy_grad: bool = True,
) -> dict:
    """log π and entropy of the response tokens [B, N], V [B, N] (shared critic, or
    the separate critic's own pass), and `aux_loss`: the policy forward's MoE router aux
    loss or None (`common.hidden_and_aux`)."""
    n = input_ids.shape[1] - prompt_len
    targets = input_ids[:, prompt_len:]
    if adapters.policy is not None:
        params, lora, scale = frozen, trainable["policy"], adapters.policy.scale
    else:
        params, lora, scale = trainable["policy"], None, 1.0
    hidden, aux = hidden_and_aux(
        params, input_ids, attention_mask, model_cfg=model_cfg, lora=lora, lora_scale=scale
    )
    h = _response_hidden(hidden, prompt_len, n)
    logprobs, entropy = token_logprobs(
        params,
        h,
        targets,
        temperature=cfg.generation.temperature,
        chunk_size=cfg.logprob_chunk,
        with_entropy=with_entropy,
        logit_softcap=model_cfg.final_logit_softcap,
        entropy_grad=entropy_grad,
    )
    out = {"logprobs": logprobs, "entropy": entropy, "aux_loss": aux}
    if cfg.value_model == "shared":
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
    cfg: PPOConfig,
) -> jax.Array:
    """log π_ref [B, N]: the frozen base with no adapter (in full fine-tuning, the frozen
    reference copy)."""
    n = input_ids.shape[1] - prompt_len
    hidden, _ = backbone(frozen, input_ids, attention_mask, cfg=model_cfg)
    lp, _ = token_logprobs(
        frozen,
        _response_hidden(hidden, prompt_len, n),
        input_ids[:, prompt_len:],
        temperature=cfg.generation.temperature,
        chunk_size=cfg.logprob_chunk,
        logit_softcap=model_cfg.final_logit_softcap,
    )
    return lp


def explained_variance(values, returns, mask) -> jax.Array:
    """1 − Var(R − V) / Var(R) over response tokens (1: perfect critic, ≤ 0: useless)."""
    var_r = masked_mean(jnp.square(returns - masked_mean(returns, mask)), mask)
    resid = returns - values
    var_res = masked_mean(jnp.square(resid - masked_mean(resid, mask)), mask)
    return 1.0 - var_res / jnp.maximum(var_r, 1e-8)


def make_experience_fn(
    cfg: PPOConfig, *, model_cfg: ModelConfig, adapters: Adapters, prompt_len: int
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
            cfg=cfg,
        )
        ref_lp = reference_logprobs(frozen, ids, mask, prompt_len, model_cfg=model_cfg, cfg=cfg)
        logprobs, values = pol["logprobs"], pol["values"] * resp_f
        kl_t = kl_estimate(logprobs, ref_lp, kind=cfg.kl_estimator) * resp_f
        rewards = -kl_coef * kl_t
        length = jnp.sum(resp, axis=-1)
        last = jnp.maximum(length - 1, 0)
        rewards = rewards.at[jnp.arange(ids.shape[0]), last].add(scores * (length > 0))
        if cfg.whiten_rewards:
            rewards = whiten(rewards, resp, shift_mean=False)
        advantages, returns = gae(rewards, values, resp, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
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
    cfg: PPOConfig,
    prompt_len: int,
) -> tuple[jax.Array, dict]:
    """Clipped policy loss + vf_coef · clipped value loss − entropy_coef · entropy
    (+ router_aux_loss_coef · the MoE policy's aux loss, `add_router_aux_loss`)."""
    resp = minibatch["response_mask"]
    out = policy_outputs(
        trainable,
        frozen,
        minibatch["input_ids"],
        minibatch["attention_mask"],
        prompt_len,
        model_cfg=model_cfg,
        adapters=adapters,
        cfg=cfg,
        with_entropy=True,
        entropy_grad=cfg.entropy_coef != 0,  # else only logged: the cheaper metric path
    )
    pg_loss, pg_metrics = ppo_policy_loss(
        out["logprobs"],
        minibatch["old_logprobs"],
        minibatch["advantages"],
        resp,
        clip_eps=cfg.cliprange,
    )
    vf_loss, vf_metrics = ppo_value_loss(
        out["values"],
        minibatch["old_values"],
        minibatch["returns"],
        resp,
        clip_range=cfg.cliprange_value,
    )
    entropy = masked_mean(out["entropy"], resp)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy
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
    return add_router_aux_loss(
        loss,
        jax.lax.stop_gradient(metrics),
        out["aux_loss"],
        model_cfg=model_cfg,
        loss_key="loss/total",
    )


def make_update_fn(
    cfg: PPOConfig,
    *,
    model_cfg: ModelConfig,
    adapters: Adapters,
    optimizer: optax.GradientTransformation,
    prompt_len: int,
):
    """`update(state, frozen, experience, indices) -> (state, metrics)`: one optimizer step
    on the minibatch `indices` [m] of the experience (split into optim.grad_accum_steps
    micro-batches)."""

    def loss_fn(trainable, mb, frozen):
        return ppo_loss(
            trainable,
            mb,
            frozen,
            model_cfg=model_cfg,
            adapters=adapters,
            cfg=cfg,
            prompt_len=prompt_len,
        )

    return make_minibatch_update(loss_fn, optimizer, micro_batches=cfg.optim.grad_accum_steps)


# ----------------------------------------------------------------------------- the algorithm


def init_trainable(
    cfg: PPOConfig, *, key: jax.Array, base: Any, model_cfg: ModelConfig, reward_model: Any
) -> tuple[dict, Adapters]:
    """{"policy": adapter or params, "value": critic adapter or params (separate critic)} and
    the adapters they are. `base` is the frozen base (host arrays in full fine-tuning, where
    the trainable copies are made from it)."""
    k_pol, k_val = jax.random.split(key)
    policy_heads = ("value",) if cfg.value_model == "shared" else ()
    policy, _ = split_trainable(k_pol, base, model_cfg, cfg.lora, heads=policy_heads)
    trainable = {"policy": policy}
    value_cfg = None
    if cfg.value_model == "separate":
        if cfg.value_init_from_reward_model:
            trainable["value"], value_cfg = critic_from_reward_model(reward_model, cfg)
        else:
            value_cfg = cfg.value_lora
            trainable["value"], _ = split_trainable(
                k_val, base, model_cfg, cfg.value_lora, heads=("value",)
            )
    return trainable, Adapters(policy=cfg.lora, value=value_cfg)


def critic_from_reward_model(reward_model: Any, cfg: PPOConfig) -> tuple[Any, LoraConfig | None]:
    """The critic starts as the reward model, its score head as the value head (bias 0), as
    InstructGPT and PE-RLHF do: a LoRA reward model's adapter (an ensemble's first member)
    for a LoRA critic, a full reward model's weights for a fully trained critic."""
    if reward_model is None:
        raise ValueError("value_init_from_reward_model needs reward_model.path")
    if cfg.value_lora is None:
        if reward_model.lora is not None:
            raise ValueError(
                "value_init_from_reward_model with value_lora: null (a fully trained critic) "
                "needs a fully trained reward model (`jaxrlhf rm lora=null`), not an adapter"
            )
        weights = jax.device_get(reward_model.params)
        weights = jax.tree.map(lambda x: np.asarray(x, np.float32), weights)
        return _score_as_value(weights), None
    if reward_model.lora is None:
        raise ValueError(
            "value_init_from_reward_model with a LoRA critic needs a LoRA reward model "
            "(reward_model.path pointing at a PEFT adapter from `jaxrlhf rm`)"
        )
    rm_lora = jax.device_get(reward_model.lora)
    if reward_model.members > 1:
        rm_lora = adapter_member(rm_lora, 0)
    value_cfg = dataclasses.replace(
        reward_model.lora_cfg, task_type="CAUSAL_LM", modules_to_save=("value",)
    )
    return _score_as_value(rm_lora), value_cfg


def _score_as_value(tree: dict) -> dict:
    """`tree` (a reward model's adapter or weights) with its score head renamed the value head."""
    score = tree["score"]["kernel"]
    if score.shape[-1] != 1:
        raise ValueError("value_init_from_reward_model needs a reward model with num_labels=1")
    value = {k: v for k, v in tree.items() if k != "score"}
    value["value"] = {"kernel": np.asarray(score, np.float32), "bias": np.zeros((1,), np.float32)}
    return value


def plan(cfg: PPOConfig) -> IterationPlan:
    return IterationPlan(
        prompts=cfg.rollout_batch_size,
        group=1,
        epochs=cfg.num_ppo_epochs,
        mini_batch=cfg.mini_batch_size,
        iterations=cfg.num_iterations,
    )


def stop_epochs(cfg: PPOConfig, epoch_metrics: list[dict]) -> bool:
    """TRL's target_kl: skip the remaining epochs once the epoch's mean approximate KL
    exceeds it."""
    if cfg.target_kl is None:
        return False
    approx = float(np.mean([float(m["policy/approxkl"]) for m in epoch_metrics]))
    return approx > cfg.target_kl


def kl_control(cfg: PPOConfig) -> KLControlSettings:
    """TRL's adaptive controller (`adaptive_kl`, `kl_target`, `kl_horizon`), or with
    `kl_budget` the budget controller (`advantages.update_kl_budget`)."""
    if cfg.kl_budget is not None:
        return KLControlSettings(initial=cfg.kl_coef, budget=cfg.kl_budget)
    return KLControlSettings(
        initial=cfg.kl_coef, adaptive=cfg.adaptive_kl, target=cfg.kl_target, horizon=cfg.kl_horizon
    )


ALGORITHM = OnlineAlgorithm(
    name="ppo",
    help="PPO with a LoRA policy and critic on one frozen base",
    config=PPOConfig,
    plan=plan,
    init_trainable=init_trainable,
    policy=lambda trainable: trainable["policy"],
    make_prepare=make_experience_fn,
    make_update=make_update_fn,
    stop_epochs=stop_epochs,
    kl_control=kl_control,
    epochs_metric="ppo_epochs_run",
    score_options=lambda cfg: {"score_clip": cfg.score_clip, "score_scaling": cfg.score_scaling},
    bar_keys=("objective/scores", "objective/kl"),
)
