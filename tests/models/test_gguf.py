"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader.

transformers dequantizes the same file (with torch); both sides then compute in float32,
so logits agree to float32 rounding, the tokenizers agree token for token, and greedy
decoding picks the same tokens. Each side loads the file once for the whole module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.models.loading import default_model_path, load_model
from jaxrlhf.models.transformer import forward

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 12
TEXTS = [
    "Hello world",
    "  leading spaces, trailing tab\t",
    "Numbers 1234567 and 3.14159, dates 2024-11-24.",
    "Unicode: café, naïve, 東京, emoji 🙂 — dashes…",
    "line one\nline two\n\n  indented",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square",
]


@pytest.fixture(scope="module")
def ours():
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf():
    path = default_model_path()
    kwargs = dict(gguf_file=path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=torch.float32, **kwargs
    ).eval()
    return model, tokenizer


def test_config_matches_transformers(ours, hf):
    cfg, _, _ = ours
    hf_cfg = hf[0].config
    assert (
        cfg.model_type,
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    ) == (
        "llama",
        hf_cfg.vocab_size,
        hf_cfg.hidden_size,
        hf_cfg.intermediate_size,
        hf_cfg.num_hidden_layers,
        hf_cfg.num_attention_heads,
        hf_cfg.num_key_value_heads,
        hf_cfg.head_dim,
    )
    assert cfg.rope_theta == hf_cfg.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == hf_cfg.rms_norm_eps
    assert cfg.tie_word_embeddings and hf_cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, (2,), 2)


def test_logits_match_transformers(ours, hf):
    cfg, params, tok = ours
    ids = np.asarray([tok.encode("The capital of France is Paris, and the capital of")])
    mask = np.ones_like(ids)
    logits = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg))
    with torch.no_grad():
        ref = hf[0](input_ids=torch.tensor(ids)).logits.numpy()
    err = np.max(np.abs(logits - ref)) / np.max(np.abs(ref))
    assert err <= 1e-4, f"max |Δlogit| / max |logit| = {err:.2e}"


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(ours, hf, text):
    tok, hf_tok = ours[2], hf[1]
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_padding(ours):
    tok = ours[2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tok.padding_side == "left"
    batch = tok(["Hi", "A longer line of text"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id and batch["attention_mask"][0][0] == 0


def test_chat_template_matches_transformers(ours, hf):
    tok, hf_tok = ours[2], hf[1]
    chat = [
        {"role": "system", "content": "Be brief."},
        *QUESTION,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Why?"},
    ]
    for messages in (QUESTION, chat):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert tok.encode(text) == hf_tok.encode(text)
    assert text.endswith("<|im_start|>assistant\n")


def test_greedy_decoding_matches_transformers(ours, hf):
    cfg, params, tok = ours
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt)
    n = len(prompt_ids)

    # One compiled forward over a fixed buffer: right padding leaves earlier positions alone.
    buf = np.zeros((1, n + NEW_TOKENS), np.int32)
    buf[0, :n] = prompt_ids
    step = jax.jit(lambda p, ids, mask: forward(p, ids, mask, cfg=cfg))  # params as an
    # argument: closed over, 135M weights would be baked into the program as constants
    generated: list[int] = []
    for i in range(NEW_TOKENS):
        mask = (np.arange(buf.shape[1]) < n + i)[None].astype(np.int32)
        next_id = int(jnp.argmax(step(params, jnp.asarray(buf), jnp.asarray(mask))[0, n + i - 1]))
        generated.append(next_id)
        if next_id in cfg.eos_token_id:
            break
        buf[0, n + i] = next_id

    model, hf_tok = hf
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, n, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=hf_tok.pad_token_id,
        )
    assert generated == out[0, n:].tolist()
    assert "Paris" in tok.decode(generated)
