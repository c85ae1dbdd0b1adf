"""jaxrlhf: parameter-efficient RLHF (reward models, PPO, GRPO, DPO with LoRA) in JAX."""

from jaxrlhf.models.config import ModelConfig, config_from_hf, tiny_config
from jaxrlhf.models.transformer import (
    KVCache,
    backbone,
    cast_params,
    forward,
    init_cache,
    init_head,
    init_params,
    lm_logits,
    score_head,
    sequence_logprobs,
    token_logprobs,
    value_head,
)

__version__ = "0.1.0"
