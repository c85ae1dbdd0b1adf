"""The rollout programs PPO, GRPO and the decode benchmark share: fold the policy adapter into
the base (LoRA) and sample with the KV-cache sampler, as `jaxrlhf.rollout.Sampler`
does, but with each program compiled up front so its memory can be read and no compilation
lands in a timed region."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C


def decode_flops(
    cfg, *, batch: int, prompt: int, new_tokens: int, prompt_repeats: int = 1
) -> float:
    """Analytic FLOPs of `generate`: the prefill over the prompts (each distinct prompt once;
    logits of the last token only) and `new_tokens − 1` single-token steps attending over the
    whole cache."""
    cache = prompt + new_tokens
    prompts = batch // prompt_repeats
    prefill = C.forward_flops(cfg, tokens=prompts * prompt, context=prompt, lm_tokens=prompts)
    step = C.forward_flops(cfg, tokens=batch, context=cache, lm_tokens=batch)
    return prefill + (new_tokens - 1) * step


class Rollout:
    """`rollout(policy, key) -> {input_ids, attention_mask, response_mask, sampler_logprobs,
    finished, tokens}` for fixed prompts; `policy` is the adapter (LoRA, merged first) or the
    full params. Rows never stop early (no EOS ids), so every call samples `new_tokens`.
    `prompt_repeats=k`: the rows are groups of k copies of a prompt, prefilled once (as
    `jaxrlhf grpo` samples a group)."""

    def __init__(
        self,
        cfg,
        frozen,
        policy_example,
        prompt_ids: np.ndarray,
        *,
        lora_cfg,
        new_tokens: int,
        temperature: float = 1.0,
        merge: bool = True,
        prompt_repeats: int = 1,
    ):
        from jaxrlhf.rollout.engine import merged_rollout_weights
        from jaxrlhf.rollout.sampling import SamplingConfig, make_generate_fn

        self.lora_cfg, self.frozen, self.merge = lora_cfg, frozen, merge
        self.ids = jnp.asarray(prompt_ids, jnp.int32)
        self.mask = jnp.ones_like(self.ids)
        sampling = SamplingConfig(
            max_new_tokens=new_tokens,
            temperature=temperature,
            eos_token_ids=(),
            pad_token_id=cfg.pad_token_id or 0,
        )
        gen = make_generate_fn(cfg, sampling).jitted_for(prompt_repeats=prompt_repeats)
        key = jax.random.PRNGKey(0)
        self.scale = jnp.asarray(lora_cfg.scale if lora_cfg else 1.0, jnp.float32)
        self.programs: dict[str, dict] = {}
        if lora_cfg is not None and merge:
            # `rollout.Sampler`'s own merge: block by block, into separate per-block arrays
            # that the decode loop reads in place.
            def merge_fn(base, lora):
                return merged_rollout_weights(base, lora, lora_cfg)

            self._merge, self.programs["merge"] = C.compile_program(
                merge_fn, frozen, policy_example
            )
            merged_shapes = jax.eval_shape(merge_fn, frozen, policy_example)
            self._gen, self.programs["generate"] = C.compile_program(
                gen, merged_shapes, self.ids, self.mask, key, None, self.scale
            )
        elif lora_cfg is not None:
            layers = {"layers": policy_example["layers"]}
            self._gen, self.programs["generate"] = C.compile_program(
                gen, frozen, self.ids, self.mask, key, layers, self.scale
            )
        else:
            self._gen, self.programs["generate"] = C.compile_program(
                gen, policy_example, self.ids, self.mask, key, None, self.scale
            )
        self.flops = decode_flops(
            cfg,
            batch=self.ids.shape[0],
            prompt=self.ids.shape[1],
            new_tokens=new_tokens,
            prompt_repeats=prompt_repeats,
        )

    def __call__(self, policy, key) -> dict:
        if self.lora_cfg is None:
            out = self._gen(policy, self.ids, self.mask, key, None, self.scale)
        elif self.merge:
            merged = self._merge(self.frozen, policy)
            out = self._gen(merged, self.ids, self.mask, key, None, self.scale)
            del merged
        else:
            out = self._gen(
                self.frozen, self.ids, self.mask, key, {"layers": policy["layers"]}, self.scale
            )
        rollout = {
            "input_ids": jnp.concatenate([self.ids, out.tokens], axis=1),
            "attention_mask": jnp.concatenate([self.mask, out.response_mask], axis=1),
            "response_mask": out.response_mask,
            "sampler_logprobs": out.logprobs,
            "finished": out.finished,
            "tokens": out.tokens,
        }
        C.block(rollout)
        return rollout
