"""Scoring rollouts for online RL: a reward model and/or Python reward functions, weighted and
summed, with the missing-EOS penalty, clipping and batch scaling."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.algorithms.reward_model import (
    RewardModel,
    append_eos,
    combine_ensemble,
    load_reward_model,
    reward_model_scores,
)
from jaxrlhf.config import RewardModelSection
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.rewards import RewardFuncConfig, compute_rewards
from jaxrlhf.rollout import Rollout, decode_responses
from jaxrlhf.sharding import host_view


class Scorer:
    """Scores responses: a reward model (LoRA or full, on the policy's base or its own) and
    Python reward functions, weighted and summed, with the EOS penalty and clipping."""

    def __init__(
        self,
        *,
        model_cfg: ModelConfig,
        frozen: Any,
        mesh,
        section: RewardModelSection | None,
        funcs: tuple[RewardFuncConfig, ...],
        tokenizer: Any,
        missing_eos_penalty: float | None,
        score_clip: float | None = None,
        score_scaling: str = "none",
    ):
        self.funcs, self.tokenizer = funcs, tokenizer
        self.missing_eos_penalty, self.score_clip, self.score_scaling = (
            missing_eos_penalty,
            score_clip,
            score_scaling,
        )
        self.rm: RewardModel | None = None
        if section is not None:
            self.rm = load_reward_model(
                section, model_cfg=model_cfg, frozen=frozen, mesh=mesh, tokenizer=tokenizer
            )
            rm_cfg, rm_scale = self.rm.model_cfg, self.rm.scale

            def scores(p, lora, ids, mask):
                return reward_model_scores(p, lora, rm_scale, ids, mask, model_cfg=rm_cfg)

            if self.rm.members > 1:  # K stacked adapters in one pass; the base is shared
                scores = jax.vmap(scores, in_axes=(None, 0, None, None))
            self._rm_fn = jax.jit(scores)
            self.ensemble, self.ensemble_coef = section.ensemble, section.ensemble_coef
            self.rm_weight = section.weight
            eos = tokenizer.eos_token_id if tokenizer is not None else None
            self.rm_eos = eos if section.append_eos else None

    def reward_model(self, input_ids, attention_mask, finished=None) -> jax.Array:
        """Scores [B]; with `finished` [B] (and `append_eos`), an unfinished row gets one EOS
        appended (a finished one already ends in its EOS) before the score is read."""
        if finished is not None and self.rm_eos is not None:
            input_ids, attention_mask = append_eos(
                input_ids, attention_mask, finished, jnp.asarray(self.rm_eos, input_ids.dtype)
            )
        return self._rm_fn(self.rm.params, self.rm.lora, input_ids, attention_mask)

    def __call__(
        self, rollout: Rollout, prompts: list, columns: dict[str, list]
    ) -> tuple[np.ndarray, dict[str, float], list[str]]:
        """(scores [B], metrics, completion texts)."""
        completions = decode_responses(
            self.tokenizer, host_view(rollout.tokens), host_view(rollout.response_mask)
        )
        total = np.zeros(len(completions), np.float32)
        metrics: dict[str, float] = {}
        if self.rm is not None:
            rm_scores = host_view(
                self.reward_model(rollout.input_ids, rollout.attention_mask, rollout.finished)
            )
            if self.rm.members > 1:
                metrics["rewards/ensemble_std"] = float(rm_scores.std(axis=0).mean())
                rm_scores = np.asarray(
                    combine_ensemble(
                        jnp.asarray(rm_scores), rule=self.ensemble, coef=self.ensemble_coef
                    )
                )
            total += self.rm_weight * rm_scores
            metrics["rewards/reward_model"] = float(rm_scores.mean())
        if self.funcs:
            fn_total, parts = compute_rewards(self.funcs, prompts, completions, columns)
            total += fn_total
            metrics.update({f"rewards/{k}": float(v.mean()) for k, v in parts.items()})
        finished = host_view(rollout.finished).astype(bool)
        if self.missing_eos_penalty is not None:
            total = total - self.missing_eos_penalty * (~finished)
        if self.score_clip is not None:
            total = np.clip(total, -self.score_clip, self.score_clip)
        if self.score_scaling == "batch":
            total = (total - total.mean()) / (total.std() + 1e-8)
        metrics["rewards/total"] = float(total.mean())
        return total.astype(np.float32), metrics, completions
