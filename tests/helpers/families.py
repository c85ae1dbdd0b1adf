"""Tiny random checkpoints of every model family, built and saved by transformers itself, with
the byte tokenizer beside them: `model.path` of a training config can point at the folder.

The parity tests (tests/models/test_families.py) pick switch values that make each switch
matter at 12 tokens; these folders are for training runs instead (aux loss, learning), so the
family switches keep sizes that suit 30-60-token rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from jaxrlhf.models.byte_tokenizer import VOCAB_SIZE, byte_tokenizer

TINY_HF = dict(
    vocab_size=VOCAB_SIZE + 1,  # 260: the byte tokenizer's 259 ids, rounded up to even
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# family -> (causal LM class, config class, family switches)
FAMILY_MODELS = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, {}),
    "gemma2": (
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2Config,
        dict(sliding_window=16, query_pre_attn_scalar=16),
    ),
    "gemma3_text": (
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextConfig,
        dict(
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        ),
    ),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config, {}),
    "olmo2": (transformers.Olmo2ForCausalLM, transformers.Olmo2Config, {}),
    "qwen3_moe": (
        transformers.Qwen3MoeForCausalLM,
        transformers.Qwen3MoeConfig,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
    ),
    "mixtral": (
        transformers.MixtralForCausalLM,
        transformers.MixtralConfig,
        dict(num_local_experts=4, num_experts_per_tok=2),
    ),
}
MOE_FAMILIES = ("qwen3_moe", "mixtral")


def save_tiny_family(family: str, folder: Path, *, seed: int = 0, **config: object) -> Path:
    """A random `family` model (transformers' own init, fp32) and the byte tokenizer, saved in
    `folder` with `save_pretrained`; `config` overrides the config's fields. The untied
    lm_head is re-drawn with std 1/sqrt(D), as `transformer.init_params` does: transformers'
    0.02 pins a 64-wide model's output distribution near uniform, which no adapter of the
    blocks can steer far (a policy must be able to learn)."""
    lm_cls, config_cls, switches = FAMILY_MODELS[family]
    torch.manual_seed(seed)
    model = lm_cls(config_cls(**{**TINY_HF, **switches, **config})).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        if head.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            head.normal_(0.0, model.config.hidden_size**-0.5)
    folder = Path(folder)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
