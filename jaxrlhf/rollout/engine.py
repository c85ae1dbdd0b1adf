"""The rollout engine contract and the built-in KV-cache engine.

A trainer hands an engine the frozen base, the policy (an adapter tree, or full params in
full fine-tuning) and a batch of left-padded prompts, and gets a typed `Rollout` back:

    engine.generate(policy, frozen, prompts, key, prompt_repeats=G) -> Rollout

`Sampler` is the built-in engine: the policy adapter is merged into the frozen base once per
rollout phase (the merged kernels live only while sampling) or, with
`generation.merge_adapter: false`, applied unmerged at a fixed `max_rank`, so adapters of
any smaller rank reuse one compiled program. Another engine plugs in by implementing
`RolloutEngine`.

Several adapters in one batch: `generate(stacked, frozen, prompts, key, adapter_ids=ids)`
with K adapters stacked on a leading axis and `ids[b]` in 0..K (0: no adapter, the
reference), or `generate_with_adapters(engine, [a1, a2], ...)`; see docs/rollout_engine.md.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrlhf.lora import HEADS, LoraConfig, merge, pad_rank, stack_adapters
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.quant import dequantize_params
from jaxrlhf.models.transformer import kernels_out_in, unstack_layers
from jaxrlhf.rollout.sampling import SamplingConfig, make_generate_fn
from jaxrlhf.sharding import tree_shardings


@flax.struct.dataclass
class Rollout:
    """One batch of sampled completions, rows `[prompt (left-padded, P) | response (N)]`."""

    input_ids: jax.Array
    """int32 [B, P + N]: prompt and response tokens."""
    attention_mask: jax.Array
    """int32 [B, P + N]: 1 on real prompt tokens and on response tokens up to EOS."""
    response_mask: jax.Array
    """int32 [B, N]: 1 on the response's tokens (EOS included)."""
    sampler_logprobs: jax.Array
    """float32 [B, N]: log-probs of the sampled tokens as the engine computed them."""
    finished: jax.Array
    """bool [B]: the row stopped at an EOS (False: cut at max_new_tokens)."""
    tokens: jax.Array
    """int32 [B, N]: the response tokens alone."""

    def step_inputs(self) -> dict:
        """The arrays a prepare step reads (everything but the duplicate `tokens`)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "response_mask": self.response_mask,
            "sampler_logprobs": self.sampler_logprobs,
            "finished": self.finished,
        }


class RolloutEngine(Protocol):
    """What the online driver needs from a rollout engine."""

    def generate(
        self, policy: Any, frozen: Any, prompts: dict, key: jax.Array, *, prompt_repeats: int = 1
    ) -> Rollout:
        """Sample one completion per prompt row. `prompts`: `input_ids`/`attention_mask`
        [B, P], left-padded; with `prompt_repeats=k` the rows are groups of k copies of a
        prompt (each may be prefilled once for its group)."""
        ...


def merged_rollout_weights(base: Any, lora: Any, lora_cfg: LoraConfig) -> Any:
    """The weights a merged rollout decodes from: the adapter folded into the base, any
    quantized weight left (embedding, LM head, untargeted kernels) dequantized, and the
    blocks as separate arrays — what the decode loop reads in place
    (`models.transformer.unstack_layers`) — with their projection kernels stored [out, in]
    (`kernels_out_in`, for the decode's few-row products). Merged block by block, so the
    rollout holds one dense copy and XLA's temporaries are one block's (SmolLM2-135M, GGUF
    base: 79 MiB, against 503 MiB when the stacked merge is made and then split)."""
    blocks = unstack_layers(base["layers"])
    adapters = unstack_layers(lora["layers"]) if lora.get("layers") else [{}] * len(blocks)
    merged = [
        dequantize_params(merge({"layers": b}, {"layers": a}, lora_cfg, with_heads=False))
        for b, a in zip(blocks, adapters, strict=True)
    ]
    rest = dequantize_params({k: v for k, v in base.items() if k != "layers"})
    return {**rest, "layers": [kernels_out_in(m["layers"]) for m in merged]}


@jax.jit
def _join(prompt_ids, prompt_mask, tokens, response_mask):
    return (
        jnp.concatenate([prompt_ids, tokens], axis=1),
        jnp.concatenate([prompt_mask, response_mask], axis=1),
    )


class Sampler:
    """The built-in KV-cache engine (`RolloutEngine`).

    With `mesh` (the run's mesh) the sampler is compiled with explicit shardings: params by
    their logical axes, prompts and responses over ("data", "fsdp"), the KV cache rows over
    ("data", "fsdp") and its kv heads over "tensor" (see `sampling.make_generate_fn`); the
    merged policy comes out of the merge already in the params' shardings."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        gen: Any,
        *,
        lora_cfg: LoraConfig | None,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int,
        mesh: Mesh | None = None,
        per_sequence_rng: bool = False,
    ):
        """`gen`: the run's `GenerationConfig` (max_new_tokens, temperature, top_k, top_p,
        merge_adapter, max_rank). `per_sequence_rng`: each row samples from its own stream
        (`SamplingConfig.per_sequence_rng`), as `ContinuousEngine` does, so both engines give
        the same tokens for the same key."""
        self.model_cfg, self.gen, self.lora_cfg, self.mesh = model_cfg, gen, lora_cfg, mesh
        self.sampling = SamplingConfig(
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            per_sequence_rng=per_sequence_rng,
        )
        self._generate = make_generate_fn(model_cfg, self.sampling, mesh=mesh)
        self._merge_fn = lambda base, lora: merged_rollout_weights(base, lora, lora_cfg)
        self._merge = jax.jit(self._merge_fn) if mesh is None else None  # mesh: on first use

    def merged(self, frozen: Any, policy: Any) -> Any:
        """The base with the policy adapter folded in (dense: a quantized base dequantized);
        on a mesh, in the base's shardings (`tree_shardings`), which is what the sampler is
        compiled for."""
        if self._merge is None:
            shapes = jax.eval_shape(self._merge_fn, frozen, policy)
            self._merge = jax.jit(self._merge_fn, out_shardings=tree_shardings(shapes, self.mesh))
        return self._merge(frozen, policy)

    def generate(
        self,
        policy: Any,
        frozen: Any,
        prompts: dict,
        key: jax.Array,
        *,
        prompt_repeats: int = 1,
        adapter_ids: Any = None,
        sequence_ids: Any = None,
    ) -> Rollout:
        """`RolloutEngine.generate`. Several adapters in one batch: with `adapter_ids` [B]
        (0: no adapter, the reference; k: adapter k−1), `policy` is K adapters stacked on a
        leading axis (`lora.stack_adapters`), applied unmerged at the engine's scale (padded
        to `gen.max_rank` if set), one program per number of adapters. `sequence_ids` [B]
        (with `per_sequence_rng`): each row's stream, default its row index."""
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        common = dict(prompt_repeats=prompt_repeats, sequence_ids=sequence_ids)
        if adapter_ids is not None:
            if self.lora_cfg is None:
                raise ValueError(
                    "adapter_ids: several adapters in one batch need a LoRA run (lora_cfg); "
                    "full fine-tuning has no adapters to switch"
                )
            out = self._generate(
                frozen,
                ids,
                mask,
                key,
                lora=stacked_layers(policy, self.gen.max_rank),
                lora_scale=self.lora_cfg.scale,
                adapter_ids=adapter_ids,
                **common,
            )
        elif self.lora_cfg is None:
            out = self._generate(policy, ids, mask, key, **common)
        elif self.gen.merge_adapter:
            merged = self.merged(frozen, policy)
            out = self._generate(merged, ids, mask, key, **common)
            del merged
        else:
            lora = policy if self.gen.max_rank is None else pad_rank(policy, self.gen.max_rank)
            out = self._generate(
                frozen,
                ids,
                mask,
                key,
                lora={"layers": lora["layers"]},
                lora_scale=self.lora_cfg.scale,
                **common,
            )
        full_ids, full_mask = _join(ids, mask, out.tokens, out.response_mask)
        return Rollout(
            input_ids=full_ids,
            attention_mask=full_mask,
            response_mask=out.response_mask,
            sampler_logprobs=out.logprobs,
            finished=out.finished,
            tokens=out.tokens,
        )

    __call__ = generate


def stacked_layers(stacked: Any, max_rank: int | None) -> Any:
    """The decoder factors of K stacked adapters (`lora.stack_adapters`), rank-padded to
    `max_rank` when set; trained heads (modules_to_save) are refused, as a per-row batch
    cannot switch them (`lora.concat_adapters`)."""
    if not isinstance(stacked, dict) or "layers" not in stacked:
        raise ValueError("adapter_ids needs policy = K stacked adapters (lora.stack_adapters)")
    heads = [h for h in HEADS if h in stacked]
    if heads:
        raise ValueError(
            f"adapter_ids: the stacked adapters carry modules_to_save heads {heads}; a rollout "
            f"uses the decoder only: pass {{'layers': stacked['layers']}}"
        )
    tree = {"layers": stacked["layers"]}
    return tree if max_rank is None else pad_rank(tree, max_rank)


def generate_with_adapters(
    engine: Any,
    adapters: list[Any],
    frozen: Any,
    prompts: dict,
    key: jax.Array,
    adapter_ids: Any,
    *,
    prompt_repeats: int = 1,
    sequence_ids: Any = None,
) -> Rollout:
    """Sample one batch in which row b runs adapter `adapter_ids[b]`: 0 the base (the
    reference, no adapter), k ≥ 1 `adapters[k − 1]` (LoRA trees of one rank and targets on
    `frozen`; trained heads are dropped, a rollout needs the decoder only). `engine`: a
    `Sampler` or `ContinuousEngine`; with per-sequence streams a row's tokens are those it
    gets when its adapter samples it alone with the same key and sequence id. The adapters
    run unmerged as one adapter of rank K·r with per-row column scales
    (`lora.concat_adapters`): one decode step serves all of them."""
    if not adapters:
        raise ValueError("generate_with_adapters: pass at least one adapter")
    stacked = stack_adapters([{"layers": a["layers"]} for a in adapters])
    return engine.generate(
        stacked,
        frozen,
        prompts,
        key,
        prompt_repeats=prompt_repeats,
        adapter_ids=adapter_ids,
        sequence_ids=sequence_ids,
    )


def eos_ids(model_cfg: ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a response: the model's, else the tokenizer's EOS."""
    if model_cfg.eos_token_id:
        return tuple(model_cfg.eos_token_id)
    eos = getattr(tokenizer, "eos_token_id", None)
    return (eos,) if eos is not None else ()
