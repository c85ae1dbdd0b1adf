"""jaxrlhf: parameter-efficient RLHF (reward models, PPO, GRPO, DPO with LoRA) in JAX."""

from jaxrlhf import advantages, data, losses, rewards
from jaxrlhf.lora import (
    LoraConfig,
    init_lora,
    merge,
    pad_rank,
    trainable_summary,
    unmerge,
)
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
    score_head,
    sequence_logprobs,
    token_logprobs,
    value_head,
)
from jaxrlhf.peft_format import export_merged, export_peft, load_peft
from jaxrlhf.sampling import SampleOutput, SamplingConfig, generate, make_generate_fn
from jaxrlhf.sharding import MeshConfig, make_mesh

__version__ = "0.1.0"
