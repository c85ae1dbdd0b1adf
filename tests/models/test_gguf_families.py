"""Qwen3, Gemma 2 and Gemma 3 GGUF files (llama.cpp tensor names and conventions) against transformers.

Each test writes a GGUF with the `gguf` package's `GGUFWriter` from a tiny random transformers
model, naming tensors by `gguf.get_tensor_name_map` (llama.cpp's own HF -> GGUF table) and
storing Gemma's norms as `1 + w`, as llama.cpp's converter does. Two readers then load it:
ours (`load_gguf`) and transformers' GGUF loader, an independent reading of the same
conventions; both must reproduce the original model's logits.
"""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.models.loading import load_gguf
from jaxrlhf.models.transformer import forward

REL_TOL = 1e-4
VOCAB = 300

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# head_dim is the one transformers' GGUF reader assumes (it reads no key_length for Qwen3, and
# no query_pre_attn_scalar for Gemma 3, which llama.cpp takes to be head_dim): 128 and 256.
CASES = {
    "qwen3": (
        gguf.MODEL_ARCH.QWEN3,
        transformers.Qwen3ForCausalLM,
        transformers.Qwen3Config(
            **TINY, head_dim=128, num_hidden_layers=2, tie_word_embeddings=False
        ),
    ),
    # llama.cpp's Gemma 2: every 2nd layer global, soft-caps in the file (transformers' reader
    # assumes its defaults 50 and 30, so the file carries those).
    "gemma2": (
        gguf.MODEL_ARCH.GEMMA2,
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2Config(
            **TINY, head_dim=256, num_hidden_layers=2, sliding_window=4, query_pre_attn_scalar=256
        ),
    ),
    # llama.cpp's Gemma 3: every 6th layer global, query scale 1/sqrt(head_dim), local rope
    # base 10000; 6 layers so the file has both kinds; a window of 4 on 12 tokens.
    "gemma3": (
        gguf.MODEL_ARCH.GEMMA3,
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextConfig(
            **TINY, head_dim=256, num_hidden_layers=6, sliding_window=4, query_pre_attn_scalar=256
        ),
    ),
}


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.1 * noise if "norm" in name else 0.08 * noise)


def write_gguf(model, arch, path):
    """A float32 GGUF of `model` as llama.cpp's converter lays it out."""
    cfg = model.config
    name = gguf.MODEL_ARCH_NAMES[arch]
    writer = gguf.GGUFWriter(str(path), name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    gemma = arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)
    if arch == gguf.MODEL_ARCH.GEMMA3:
        writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        writer.add_sliding_window(cfg.sliding_window)
    elif arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if gemma and hf_name == "lm_head.weight":
            continue  # tied
        w = t.numpy().astype(np.float32)
        if gemma and hf_name.endswith("norm.weight"):
            w = w + 1.0
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    return np.where(mask == 1, ids, 0), mask


def _hf_logits(model, ids, mask):
    positions = torch.tensor(np.clip(np.cumsum(mask, -1) - 1, 0, None))
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=positions
        ).logits.numpy()


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_loads_with_transformers_logits(case, tmp_path):
    arch, lm_cls, hf_cfg = CASES[case]
    hf_cfg._attn_implementation = "eager"
    model = lm_cls(hf_cfg).eval()
    _randomize(model, seed=3)
    path = tmp_path / f"{case}.gguf"
    write_gguf(model, arch, path)
    ids, mask = _batch()
    real = mask.astype(bool)
    ref = _hf_logits(model, ids, mask)

    cfg, params, tokenizer = load_gguf(path)
    assert tokenizer is None  # the file carries no vocabulary
    assert cfg.model_type == hf_cfg.model_type
    if case == "gemma2":  # read from the file's metadata
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (50.0, 30.0)
        assert cfg.sliding_layers == (True, False)
    ours = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg))
    assert _rel_err(ours[real], ref[real]) <= REL_TOL

    # transformers' own GGUF reader agrees on what the file means.
    theirs = lm_cls.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert _rel_err(_hf_logits(theirs, ids, mask)[real], ref[real]) <= REL_TOL
