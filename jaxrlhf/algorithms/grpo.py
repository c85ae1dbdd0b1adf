"""GRPO with LoRA as jit-compiled pure steps over one frozen base.

    frozen base ─┬─ + policy adapter (merged for sampling, unmerged for training) → π_θ
                 └─ (no adapter)                                                  → π_ref  (β > 0 only)

Group Relative Policy Optimization (Shao et al., 2024) drops PPO's critic: each prompt is
sampled G times, and completion i of a group gets the advantage

    A_i = (r_i − mean(r_group)) / (std(r_group) + eps)      (or without the division)

for all its tokens. One iteration: sample `prompts × G` completions (`jaxrlhf.rollout`) →
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
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.advantages import (
    SCALE_REWARDS,
    dynamic_sampling_keep_mask,
    group_advantages,
    soft_overlong_punishment,
)
from jaxrlhf.algorithms.common import (
    add_router_aux_loss,
    hidden_and_aux,
    make_minibatch_update,
    model_views,
)
from jaxrlhf.algorithms.spec import IterationPlan, KLControlSettings, OnlineAlgorithm
from jaxrlhf.config import GenerationConfig, OnlineTraining, check_literal
from jaxrlhf.data.packing import pack_groups
from jaxrlhf.lora import LoraConfig, split_trainable
from jaxrlhf.losses import (
    GRPO_LOSS_ALIASES,
    GRPO_TOKEN_SUM_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    grpo_loss,
    masked_mean,
)
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import token_logprobs
from jaxrlhf.sharding import host_view

GRPO_LOSS_TYPES = (
    "grpo",
    "bnpo",
    "dr_grpo",
    "dapo",
    "cispo",
    "sapo",
    "sequence-mean",
    "token-mean",
)
# Normalised by the tokens of the whole optimizer batch (see `make_update_fn`).
GLOBAL_TOKEN_LOSS_TYPES = ("dapo", "cispo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupRolloutTraining(OnlineTraining):
    """What the critic-free online algorithms share (`grpo`, `rloo`, `reinforce_pp`): each
    prompt is sampled `num_generations` times (consecutive rows), and an iteration is
    `prompts_per_iteration` prompts × `num_generations` completions → rewards → advantages →
    `num_iterations` (μ) passes of `mini_batch_size` optimizer steps. The option names are
    TRL's (GRPOConfig / RLOOConfig)."""

    min_generations: ClassVar[int] = 2

    lora: LoraConfig | None = dataclasses.field(default_factory=lambda: LoraConfig(r=32, alpha=64))
    """The policy adapter (RL favours higher ranks than SFT); `null` for full fine-tuning
    (with a real frozen reference copy)."""
    generation: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(max_new_tokens=256, temperature=1.0)
    )
    """Rollout sampling; `max_new_tokens` is TRL's max_completion_length."""
    num_generations: int = 8
    """G: completions per prompt (the group)."""
    prompts_per_iteration: int = 8
    """Distinct prompts per generation batch (batch = prompts_per_iteration × G)."""
    max_steps: int = 100
    """Iterations (generation batches) to run."""
    num_iterations: int = 1
    """μ: passes over each generation batch; the ratio is taken against the log-probs at
    rollout time (1: strictly on-policy, as TRL's default)."""
    mini_batch_size: int | None = None
    """Completions per optimizer step (null: the whole generation batch, one step per pass)."""
    epsilon: float = 0.2
    epsilon_high: float | None = None
    """Upper clip bound (DAPO's clip-higher, e.g. 0.28); null: `epsilon`."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_new_tokens without an EOS out of the loss (DAPO)."""
    log_entropy: bool = True
    """Compute the policy's mean token entropy in the update (one softmax over the vocabulary)."""
    share_prompt: bool = True
    """Run each prompt once for its group of completions in the log-prob passes (packed:
    the G completions attend to one copy of the prompt). Same numbers, fewer tokens;
    mini-batches and micro-batches then hold whole groups."""
    logprob_chunk: int = 128
    """Tokens per chunk of the vocabulary projection in the log-prob passes (memory bound)."""

    @property
    def generation_batch_size(self) -> int:
        return self.prompts_per_iteration * self.num_generations

    @property
    def effective_mini_batch_size(self) -> int:
        return self.mini_batch_size or self.generation_batch_size

    @property
    def use_old_logprobs(self) -> bool:
        """Whether `prepare` computes log π_old: one generation batch feeds more than one
        optimizer step (μ > 1 or several mini-batches); otherwise π_old = π."""
        return (
            self.num_iterations > 1 or self.generation_batch_size > self.effective_mini_batch_size
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < self.min_generations:
            raise ValueError(
                f"num_generations must be >= {self.min_generations} (advantages are relative "
                f"to the group of a prompt's completions), got {self.num_generations}"
            )
        for name in ("prompts_per_iteration", "max_steps", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        batch = self.generation_batch_size
        if self.mini_batch_size is not None:
            if self.mini_batch_size < 1 or batch % self.mini_batch_size:
                raise ValueError(
                    f"mini_batch_size ({self.mini_batch_size}) must divide the generation batch "
                    f"prompts_per_iteration × num_generations = {batch}"
                )
        if self.effective_mini_batch_size % self.optim.grad_accum_steps:
            raise ValueError(
                f"mini_batch_size ({self.effective_mini_batch_size}) must be a multiple of "
                f"optim.grad_accum_steps ({self.optim.grad_accum_steps})"
            )
        micro = self.effective_mini_batch_size // self.optim.grad_accum_steps
        if self.share_prompt and micro % self.num_generations:
            raise ValueError(
                f"share_prompt packs whole groups, so each micro-batch (mini_batch_size / "
                f"optim.grad_accum_steps = {micro}) must be a multiple of num_generations "
                f"({self.num_generations}); change them or set share_prompt: false"
            )
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ValueError(f"epsilon_high must be > 0 or null, got {self.epsilon_high}")
        if self.lora is not None:
            if self.lora.modules_to_save:
                raise ValueError(
                    f"lora.modules_to_save={list(self.lora.modules_to_save)}: "
                    f"{self.command.upper()} has no critic or score head; set it to []"
                )
            if self.lora.dropout:
                raise ValueError(
                    f"lora.dropout must be 0 for {self.command.upper()}: the importance ratio "
                    "compares deterministic passes of the policy"
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(GroupRolloutTraining):
    """`jaxrlhf grpo`: Group Relative Policy Optimization (Shao et al., 2024), as TRL's
    GRPOTrainer: no critic; each prompt is sampled `num_generations` times and a completion's
    advantage is its reward relative to its group's. Names and defaults follow TRL's
    GRPOConfig where it has the option.

    One iteration: `prompts_per_iteration` prompts × `num_generations` completions → rewards
    → group advantages → `num_iterations` (μ) passes of `mini_batch_size` optimizer steps."""

    command: ClassVar[str] = "grpo"

    beta: float = 0.0
    """KL coefficient (k3 estimator) against the reference; 0 skips the reference pass."""

    loss_type: Literal[
        "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "sequence-mean", "token-mean"
    ] = "dapo"
    """The objective and its aggregation (`jaxrlhf.losses.grpo_loss`): clipped surrogate
    ("grpo", "bnpo", "dr_grpo", "dapo"), CISPO (clipped, detached weight × log π) or SAPO
    (soft sigmoid gate)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """`sequence`: one weight per completion, exp of the mean token log-ratio (GSPO); only
    with the per-sequence aggregations "grpo" and "sapo"."""
    delta: float | None = None
    """Upper cap on the unclipped ratio (INTELLECT-2's two-sided clipping, > 1 + epsilon);
    null disables it. Not for "cispo"/"sapo"."""
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperatures for positive / negative advantages."""
    scale_rewards: bool | Literal["group", "batch", "none"] = True
    """Divide advantages by a reward std: "group" (true) the group's, "batch" the whole
    batch's, "none" (false) not at all (Dr. GRPO)."""
    overlong_buffer: int | None = None
    """DAPO's soft overlong punishment (TRL's `get_soft_overlong_punishment` reward with
    `soft_punish_cache` = this and `max_completion_len` = generation.max_new_tokens): the
    reward falls linearly from 0 to −1 over the last `overlong_buffer` tokens. null: off."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards all tie are dropped and the batch is
    refilled with the next prompts of the data order, round after round, until it holds
    `prompts_per_iteration` groups with some spread or `max_num_gen_batches` rounds ran
    (`train.dynamic_sampling`). Short of that, the batch is topped up with tied groups that
    stay out of the loss (response masks zeroed) and `dynamic_sampling/cap_reached` is 1."""
    max_num_gen_batches: int = 4
    """With `dynamic_sampling`: the most generation rounds (of `prompts_per_iteration`
    prompts each, the first included) one iteration samples; verl's
    `algorithm.filter_groups.max_num_gen_batches`, except that verl's 0 (no limit, and an
    error once the data runs dry) is refused here: 1 filters without refilling."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.kl_budget is not None and self.beta == 0:
            raise ValueError(
                "kl_budget steers beta, the KL term's weight: set beta > 0 as its starting "
                "value (e.g. beta=0.04)"
            )
        check_literal(self, "loss_type", GRPO_LOSS_TYPES)
        check_literal(self, "importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)
        if not isinstance(self.scale_rewards, bool):
            check_literal(self, "scale_rewards", SCALE_REWARDS)
        loss_type = GRPO_LOSS_ALIASES.get(self.loss_type, self.loss_type)
        if self.importance_sampling_level == "sequence" and loss_type in GRPO_TOKEN_SUM_LOSS_TYPES:
            raise ValueError(
                f"importance_sampling_level: sequence (GSPO) has no form for loss_type: "
                f"{self.loss_type} (a token-sum aggregation weights sequences by length); use "
                f"loss_type: grpo or sapo, or importance_sampling_level: token"
            )
        if self.delta is not None:
            if loss_type in ("cispo", "sapo"):
                raise ValueError(
                    f"delta caps the unclipped ratio of the clipped losses; loss_type: "
                    f"{self.loss_type} has none: set delta: null"
                )
            if self.delta <= 1.0:
                raise ValueError(f"delta must be > 1 (a cap above ratio 1), got {self.delta}")
        if self.overlong_buffer is not None and not (
            0 < self.overlong_buffer <= self.generation.max_new_tokens
        ):
            raise ValueError(
                f"overlong_buffer must be in [1, generation.max_new_tokens="
                f"{self.generation.max_new_tokens}] or null, got {self.overlong_buffer}"
            )
        if self.max_num_gen_batches < 1:
            raise ValueError(
                f"max_num_gen_batches must be >= 1 (generation rounds per iteration, the first "
                f"included; 1 filters tied groups without refilling), got "
                f"{self.max_num_gen_batches}"
            )
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


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
    with_aux_loss: bool = False,
    entropy_grad: bool = True,
) -> tuple[jax.Array, ...]:
    """log p (and the entropy) of the response tokens, [B, N], from `[prompt | response]`
    sequences [B, P + N]: token P + j is predicted from the hidden state at P + j − 1.
    With `group` > 1 the rows are consecutive groups of one prompt's completions and run
    packed, the prompt once per group (same numbers, fewer tokens). With `with_aux_loss` a
    third entry: the MoE router's aux loss over the forward's real tokens, or None
    (`common.hidden_and_aux`).

    `lora=None` is the base model: the reference policy when `params` is the frozen base."""
    n = input_ids.shape[1] - prompt_len
    if group > 1:
        packed = pack_groups(input_ids, attention_mask, prompt_len, group)
        hidden, aux = hidden_and_aux(
            params,
            packed["input_ids"],
            packed["attention_mask"],
            model_cfg=model_cfg,
            lora=lora,
            lora_scale=lora_scale,
            positions=packed["positions"],
            segment_ids=packed["segment_ids"],
        )
        h = jnp.take_along_axis(hidden, packed["prev_index"][..., None], axis=1)
        h = h.reshape(input_ids.shape[0], n, h.shape[-1])
    else:
        hidden, aux = hidden_and_aux(
            params,
            input_ids,
            attention_mask,
            model_cfg=model_cfg,
            lora=lora,
            lora_scale=lora_scale,
        )
        h = hidden[:, prompt_len - 1 : prompt_len - 1 + n]
    lp, entropy = token_logprobs(
        params,
        h,
        input_ids[:, prompt_len:],
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        logit_softcap=model_cfg.final_logit_softcap,
        entropy_grad=entropy_grad,
    )
    return (lp, entropy, aux) if with_aux_loss else (lp, entropy)


def policy_logprobs(
    trainable: Any,
    frozen: Any,
    input_ids,
    attention_mask,
    prompt_len: int,
    *,
    model_cfg: ModelConfig,
    cfg: GroupRolloutTraining,
    with_entropy: bool = False,
    with_aux_loss: bool = False,
) -> tuple[jax.Array, ...]:
    """log π_θ of the response tokens: the frozen base + the unmerged adapter `cfg.lora`
    (LoRA) or the trained params (full fine-tuning); see `response_logprobs`. The entropy
    is only logged by the group-rollout losses, so it carries no gradient."""
    params, lora, scale = model_views(trainable, frozen, cfg.lora)
    return response_logprobs(
        params,
        input_ids,
        attention_mask,
        prompt_len,
        model_cfg=model_cfg,
        lora=lora,
        lora_scale=scale,
        temperature=cfg.generation.temperature,
        chunk_size=cfg.logprob_chunk,
        with_entropy=with_entropy,
        group=cfg.num_generations if cfg.share_prompt else 1,
        with_aux_loss=with_aux_loss,
        entropy_grad=False,
    )


def reference_logprobs(
    frozen: Any,
    input_ids,
    attention_mask,
    prompt_len: int,
    *,
    model_cfg: ModelConfig,
    cfg: GroupRolloutTraining,
) -> jax.Array:
    """log π_ref: the frozen base with no adapter (in full fine-tuning, the frozen copy)."""
    lp, _ = response_logprobs(
        frozen,
        input_ids,
        attention_mask,
        prompt_len,
        model_cfg=model_cfg,
        temperature=cfg.generation.temperature,
        chunk_size=cfg.logprob_chunk,
        group=cfg.num_generations if cfg.share_prompt else 1,
    )
    return lp


def make_prepare_fn(
    cfg: GRPOConfig, *, model_cfg: ModelConfig, prompt_len: int, adapters: Any = None
):
    """`prepare(trainable, frozen, rollout, scores, kl_coef) -> (batch, metrics)`.

    rollout: input_ids/attention_mask [B, P+N], response_mask [B, N], finished [B], with
    the G completions of a prompt consecutive; scores [B] (weighted rewards, penalties
    applied). The batch holds the sequences, `advantages` [B] and, only when needed,
    `old_logprobs` (cfg.use_old_logprobs) and `ref_logprobs` (β > 0) [B, N]; every entry
    is a constant for the update. β is fixed here (`kl_coef` is the driver's coefficient,
    equal to it): it weighs the KL term of the loss, not the rewards."""

    def prepare(trainable, frozen, rollout: dict, scores, kl_coef=None):
        ids, mask, resp, scores, finished, length = rollout_inputs(rollout, scores, cfg)
        extra = {}
        if cfg.overlong_buffer is not None:
            penalty = overlong_penalty(cfg, length)
            scores = scores + penalty
            extra["rewards/soft_overlong_punishment"] = jnp.mean(penalty)
        advantages, group_std = group_advantages(
            scores, cfg.num_generations, scale_rewards=cfg.scale_rewards
        )
        if cfg.dynamic_sampling:
            # Tied groups left in the batch (the refill ran out of rounds) train on nothing.
            keep, masked = dynamic_sampling_keep_mask(scores, cfg.num_generations)
            resp = resp * keep[:, None].astype(resp.dtype)
            extra["dynamic_sampling/masked_groups"] = masked.astype(jnp.float32)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "response_mask": resp,
            "advantages": advantages,
        }
        if cfg.use_old_logprobs:
            batch["old_logprobs"], _ = policy_logprobs(
                trainable, frozen, ids, mask, prompt_len, model_cfg=model_cfg, cfg=cfg
            )
        if cfg.kl_budget is not None:  # the controller's β rides along, one per row
            batch["beta"] = jnp.full(ids.shape[:1], kl_coef, jnp.float32)
        if cfg.beta > 0:
            batch["ref_logprobs"] = reference_logprobs(
                frozen, ids, mask, prompt_len, model_cfg=model_cfg, cfg=cfg
            )
        metrics = {
            "reward": jnp.mean(scores),
            # TRL's reward_std: the mean over groups of the within-group std.
            "reward_std": jnp.mean(group_std),
            "frac_reward_zero_std": jnp.mean((group_std <= 1e-8).astype(jnp.float32)),
            "completion_length": jnp.mean(length),
            "completions/clipped_ratio": 1.0 - jnp.mean(finished.astype(jnp.float32)),
            **extra,
        }
        return jax.lax.stop_gradient(batch), jax.lax.stop_gradient(metrics)

    return prepare


def overlong_penalty(cfg: GRPOConfig, length: jax.Array) -> jax.Array:
    """DAPO's soft overlong punishment [B] of completions of `length` tokens."""
    return soft_overlong_punishment(
        length,
        max_completion_len=cfg.generation.max_new_tokens,
        soft_punish_cache=cfg.overlong_buffer,
    )


def keep_groups(cfg: GRPOConfig, scores: np.ndarray, rollout: Any) -> np.ndarray | None:
    """Dynamic sampling's filter on the host (`OnlineAlgorithm.keep_groups`): keep [groups]
    is False where the group's rewards all tie, on the same shaped scores (overlong
    punishment added) that `prepare` computes its advantages and its mask from."""
    if not cfg.dynamic_sampling:
        return None
    shaped = jnp.asarray(scores, jnp.float32)
    if cfg.overlong_buffer is not None:
        length = jnp.sum(jnp.asarray(host_view(rollout.response_mask)), axis=-1)
        shaped = shaped + overlong_penalty(cfg, length.astype(jnp.float32))
    keep, _ = dynamic_sampling_keep_mask(shaped, cfg.num_generations)
    return np.asarray(keep).reshape(-1, cfg.num_generations)[:, 0]


def micro_logprobs(
    trainable: Any, micro: dict, frozen: Any, *, cfg: Any, model_cfg: ModelConfig, prompt_len: int
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(log π_θ, the entropy with `cfg.log_entropy` or None, the MoE router's aux loss or None)
    of a micro-batch's responses: what every group-rollout loss (GRPO, RLOO, REINFORCE++)
    starts from; the loss adds the aux term with `common.add_router_aux_loss`."""
    return policy_logprobs(
        trainable,
        frozen,
        micro["input_ids"],
        micro["attention_mask"],
        prompt_len,
        model_cfg=model_cfg,
        cfg=cfg,
        with_entropy=cfg.log_entropy,
        with_aux_loss=True,
    )


def rollout_inputs(rollout: dict, scores, cfg: Any) -> tuple:
    """(input_ids, attention_mask, response_mask, scores float32, finished, lengths) of a
    rollout; with `cfg.mask_truncated_completions` the response mask of a completion that
    did not finish is zeroed (it trains on nothing, as TRL)."""
    ids, mask, resp = rollout["input_ids"], rollout["attention_mask"], rollout["response_mask"]
    finished = rollout.get("finished", jnp.ones(ids.shape[:1], bool))
    length = jnp.sum(resp, axis=-1).astype(jnp.float32)
    if cfg.mask_truncated_completions:
        resp = resp * finished[:, None].astype(resp.dtype)
    return ids, mask, resp, jnp.asarray(scores, jnp.float32), finished, length


def grpo_objective(
    trainable: Any,
    micro: dict,
    frozen: Any,
    *,
    model_cfg: ModelConfig,
    cfg: GRPOConfig,
    prompt_len: int,
) -> tuple[jax.Array, dict]:
    """`grpo_loss` of one micro-batch, times `micro["loss_scale"]` (see `make_update_fn`), plus
    a MoE policy's router aux term (`add_router_aux_loss`)."""
    resp = micro["response_mask"]
    lp, entropy, aux = micro_logprobs(
        trainable, micro, frozen, cfg=cfg, model_cfg=model_cfg, prompt_len=prompt_len
    )
    loss, m = grpo_loss(
        lp,
        micro.get("old_logprobs"),
        micro.get("ref_logprobs"),
        micro["advantages"],
        resp,
        clip_eps=cfg.epsilon,
        clip_eps_high=cfg.epsilon_high,
        beta=jnp.mean(micro["beta"]) if "beta" in micro else cfg.beta,
        loss_type=cfg.loss_type,
        max_completion_length=cfg.generation.max_new_tokens,
        importance_sampling_level=cfg.importance_sampling_level,
        delta=cfg.delta,
        sapo_temperature_pos=cfg.sapo_temperature_pos,
        sapo_temperature_neg=cfg.sapo_temperature_neg,
    )
    loss = loss * micro["loss_scale"]
    metrics = {
        "loss": loss,
        "kl": m["kl"],
        "clip_ratio": m["clip_ratio"],
        "clip_ratio/low_mean": m["clip_ratio/low_mean"],
        "clip_ratio/high_mean": m["clip_ratio/high_mean"],
        "clip_ratio/region_mean": m["clip_ratio/region_mean"],
        "ratio": m["ratio_mean"],
    }
    if "cispo_clip_ratio" in m:
        metrics["cispo_clip_ratio"] = m["cispo_clip_ratio"]
    # Σ_t KL_t / B: the mean KL of a sequence (the token mean times tokens per row).
    metrics["kl_per_sequence"] = m["kl"] * jnp.sum(resp) / resp.shape[0]
    if cfg.log_entropy:
        metrics["entropy"] = masked_mean(entropy, resp)
    # Unscaled by `loss_scale`: each micro-batch's aux loss counts alike, as in TRL.
    return add_router_aux_loss(loss, jax.lax.stop_gradient(metrics), aux, model_cfg=model_cfg)


def make_update_fn(
    cfg: GRPOConfig,
    *,
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    prompt_len: int,
    adapters: Any = None,
):
    """`update(state, frozen, batch, indices) -> (state, metrics)`: one optimizer step on the
    rows `indices` [m] of the prepared batch, split into optim.grad_accum_steps micro-batches
    for gradient accumulation (mean of the micro-batch gradients).

    "dapo" and "cispo" normalise by the tokens of the whole optimizer batch, so each
    micro-batch's token-mean loss is scaled by (its tokens × micro_batches / the batch's
    tokens); the other loss types are already means over equal-sized micro-batches."""
    loss_type = GRPO_LOSS_ALIASES.get(cfg.loss_type, cfg.loss_type)
    micro_batches = cfg.optim.grad_accum_steps

    def loss_fn(trainable, micro, frozen):
        return grpo_objective(
            trainable,
            micro,
            frozen,
            model_cfg=model_cfg,
            cfg=cfg,
            prompt_len=prompt_len,
        )

    def loss_scales(mb: dict) -> dict:
        tokens = jnp.sum(mb["response_mask"], axis=(1, 2)).astype(jnp.float32)
        if loss_type in GLOBAL_TOKEN_LOSS_TYPES:
            scale = tokens * micro_batches / jnp.maximum(jnp.sum(tokens), 1.0)
        else:
            scale = jnp.ones((micro_batches,), jnp.float32)
        return {**mb, "loss_scale": scale}

    return make_minibatch_update(
        loss_fn, optimizer, micro_batches=micro_batches, scale_micro_batches=loss_scales
    )


# ----------------------------------------------------------------------------- the algorithm


def init_trainable(
    cfg: GroupRolloutTraining,
    *,
    key: jax.Array,
    base: Any,
    model_cfg: ModelConfig,
    reward_model: Any,
) -> tuple[Any, None]:
    """The policy: a fresh adapter over the shared base (LoRA) or a float32 copy of the base
    (full fine-tuning; the frozen base stays as the reference). No critic."""
    policy, _ = split_trainable(key, base, model_cfg, cfg.lora)
    return policy, None


def plan(cfg: GroupRolloutTraining) -> IterationPlan:
    return IterationPlan(
        prompts=cfg.prompts_per_iteration,
        group=cfg.num_generations,
        epochs=cfg.num_iterations,
        mini_batch=cfg.effective_mini_batch_size,
        iterations=cfg.max_steps,
        whole_groups=cfg.share_prompt,  # each micro-batch packs its prompts
    )


def grpo_plan(cfg: GRPOConfig) -> IterationPlan:
    """`plan`, with up to `max_num_gen_batches` generation rounds under dynamic sampling."""
    rounds = cfg.max_num_gen_batches if cfg.dynamic_sampling else 1
    return dataclasses.replace(plan(cfg), generation_rounds=rounds)


def kl_control(cfg: GRPOConfig) -> KLControlSettings:
    """β fixed, or with `kl_budget` steered by the budget controller on the update's
    per-sequence KL (`advantages.update_kl_budget`)."""
    if cfg.kl_budget is None:
        return KLControlSettings(initial=cfg.beta)
    return KLControlSettings(initial=cfg.beta, budget=cfg.kl_budget, metric="kl_per_sequence")


ALGORITHM = OnlineAlgorithm(
    name="grpo",
    help="GRPO: group-relative advantages, no critic",
    config=GRPOConfig,
    plan=grpo_plan,
    init_trainable=init_trainable,
    policy=lambda trainable: trainable,
    make_prepare=make_prepare_fn,
    make_update=make_update_fn,
    kl_control=kl_control,
    bar_keys=("reward", "kl"),
    drop_metrics=("rewards/total",),
    keep_groups=keep_groups,
)
