"""Rollouts: the `RolloutEngine` contract, its typed `Rollout`, the built-in KV-cache engine
(`Sampler`), the continuous-batching engine (`ContinuousEngine`), the sampling functions they
compile and prompt batches on the mesh."""

from jaxrlhf.rollout.continuous import ContinuousEngine, RolloutMetrics
from jaxrlhf.rollout.engine import (
    Rollout,
    RolloutEngine,
    Sampler,
    eos_ids,
    generate_with_adapters,
)
from jaxrlhf.rollout.prompts import prompt_batch
from jaxrlhf.rollout.sampling import (
    SampleOutput,
    SamplingConfig,
    decode_responses,
    decode_text,
    generate,
    make_generate_fn,
)

__all__ = [
    "ContinuousEngine",
    "Rollout",
    "RolloutEngine",
    "RolloutMetrics",
    "SampleOutput",
    "Sampler",
    "SamplingConfig",
    "decode_responses",
    "decode_text",
    "eos_ids",
    "generate",
    "generate_with_adapters",
    "make_generate_fn",
    "prompt_batch",
]
