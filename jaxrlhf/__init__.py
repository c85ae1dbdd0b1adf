"""jaxrlhf: parameter-efficient RLHF (reward models, PPO, GRPO, DPO with LoRA) in JAX."""

from jaxrlhf import advantages, data, losses, rewards
from jaxrlhf.algorithms.dpo import DPOConfig
from jaxrlhf.algorithms.grpo import GRPOConfig
from jaxrlhf.algorithms.ppo import PPOConfig
from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.config import load_config
from jaxrlhf.lora import (
    LoraConfig,
    concat_adapters,
    init_lora,
    merge,
    pad_rank,
    row_scales,
    split_trainable,
    stack_adapters,
    trainable_summary,
    unmerge,
)
from jaxrlhf.models.base import load_base
from jaxrlhf.models.config import ModelConfig, config_from_hf, tiny_config
from jaxrlhf.models.loading import load_gguf, load_hf_folder, load_model, save_hf_folder
from jaxrlhf.models.quant import (
    QuantConfig,
    QuantizedArray,
    dequantize,
    dequantize_params,
    load_quantized,
    quantize_params,
)
from jaxrlhf.models.transformer import (
    KVCache,
    backbone,
    cast_params,
    forward,
    init_cache,
    init_head,
    init_params,
    lm_logits,
    load_balancing_loss,
    router_aux_loss,
    score_head,
    sequence_logprobs,
    token_logprobs,
    value_head,
)
from jaxrlhf.peft_format import export_merged, export_peft, load_peft
from jaxrlhf.rollout import (
    Rollout,
    RolloutEngine,
    SampleOutput,
    Sampler,
    SamplingConfig,
    generate,
    generate_with_adapters,
    make_generate_fn,
)
from jaxrlhf.sharding import MeshConfig, make_mesh
from jaxrlhf.train.online import train_online
from jaxrlhf.train.preference import train_preference
from jaxrlhf.train.runs import (
    run_cpo,
    run_dpo,
    run_grpo,
    run_kto,
    run_orpo,
    run_ppo,
    run_reinforce_pp,
    run_rloo,
    run_rm,
)

__version__ = "0.1.0"
