"""Our decoder against transformers (torch, CPU, float32) on the same random weights.

Each tiny checkpoint is written with `save_pretrained` and read back with `load_hf_folder`,
so these tests cover the loader, the name mapping and the forward pass together. Only
real-token positions are compared: what a model computes at a pad position is arbitrary.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.models.config import config_from_hf
from jaxrlhf.models.loading import load_hf_folder
from jaxrlhf.models.transformer import forward

VOCAB = 160
SEQ = 12
LENGTHS = (12, 7, 3)  # one full row, two padded ones
PAD_ID = 0
REL_TOL = 1e-4

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
)

CAUSAL_CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama-rope-linear": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    ),
    # original_max_position_embeddings=16 puts head_dim 16's wavelengths on both sides of
    # the llama3 ramp (4..16), so all three branches of the rescaling are exercised.
    "llama-rope-llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 10000.0,
            }
        },
    ),
    "qwen2-bias-tied": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        {"tie_word_embeddings": True},
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}},
    ),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values in every tensor (HF zero-inits biases and one-inits norms, which would
    leave their name mapping untested)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)


def batch(side: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (never the pad id, so HF's classifier finds the last real token) and mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(len(LENGTHS), SEQ))
    mask = np.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        if side == "left":
            mask[row, SEQ - n :] = 1
        else:
            mask[row, :n] = 1
    return np.where(mask == 1, ids, PAD_ID), mask


def hf_run(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, side: str):
    kwargs = {}
    if side == "left":  # HF counts positions from slot 0; make them count real tokens
        kwargs["position_ids"] = torch.tensor(np.clip(np.cumsum(mask, -1) - 1, 0, None))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
    return out.logits.numpy()


def max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("case", sorted(CAUSAL_CASES))
def test_causal_lm_logits_match_transformers(case, tmp_path):
    config_cls, model_cls, extra = CAUSAL_CASES[case]
    hf_cfg = config_cls(**TINY, **extra)
    model = model_cls(hf_cfg).eval()
    randomize_(model, seed=1)
    model.save_pretrained(tmp_path)
    cfg, params = load_hf_folder(tmp_path)

    assert cfg.num_kv_heads < cfg.num_heads  # grouped-query attention in every case
    assert cfg.tie_word_embeddings == ("lm_head" not in params)
    if case.startswith("qwen2"):
        assert cfg.attention_bias and "bias" in params["layers"]["q_proj"]
    for side in ("left", "right"):
        ids, mask = batch(side)
        ours = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg))
        ref = hf_run(model, ids, mask, side)
        real = mask.astype(bool)
        err = max_rel_err(ours[real], ref[real])
        assert err <= REL_TOL, f"{case}, {side} padding: max relative error {err:.2e}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_score_head_matches_sequence_classification(side, tmp_path):
    hf_cfg = transformers.LlamaConfig(**TINY, num_labels=1)
    model = transformers.LlamaForSequenceClassification(hf_cfg).eval()
    randomize_(model, seed=2)
    model.save_pretrained(tmp_path)
    cfg, params = load_hf_folder(tmp_path)
    assert params["score"]["kernel"].shape == (64, 1) and "lm_head" not in params

    ids, mask = batch(side, seed=3)
    ours = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg, head="score"))
    ref = hf_run(model, ids, mask, side)[:, 0]
    assert ours.shape == (len(LENGTHS),)
    assert max_rel_err(ours, ref) <= REL_TOL


def test_config_from_hf_refuses_unsupported_architecture():
    with pytest.raises(ValueError, match=r"Unsupported architecture model_type='gpt2'"):
        config_from_hf({"model_type": "gpt2", "hidden_size": 64})


def test_config_from_hf_refuses_unsupported_rope_type():
    raw = transformers.LlamaConfig(
        **TINY,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 64,
        },
    ).to_dict()
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn' is not supported"):
        config_from_hf(raw)
