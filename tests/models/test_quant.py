"""The quantized frozen base (`jaxrlhf.models.quant`).

Exactness is tested the QLoRA way: for the same quantized values, the quantized path (which
dequantizes inside the step) must compute what a float model whose weights ARE the
dequantized values computes — logits, LoRA gradients, reward scores and KV-cache decoding,
on one device and on a 2x2x2 mesh. The GGUF blocks are decoded bit for bit as the `gguf`
package does; NF4's code book is QLoRA's.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import entry_float_buffers
from jaxrlhf.lora import LoraConfig, init_lora, merge, trainable_summary, tree_bytes, tree_size
from jaxrlhf.models import loading
from jaxrlhf.models import quant as Q
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import forward, init_params, sequence_logprobs
from jaxrlhf.rollout.sampling import SamplingConfig, make_generate_fn
from jaxrlhf.sharding import MeshConfig, make_mesh, per_device_bytes, put_tree, tree_shardings

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    pad_token_id=0,
    eos_token_id=(1,),
)
# Every way a weight can be stored; "gguf" kinds are made by `gguf.quants.quantize`.
KINDS = {
    "int8": dict(kind="int8"),
    "nf4": dict(kind="nf4", double_quant=False),
    "nf4_dq": dict(kind="nf4", double_quant=True),
    "q4_0": dict(gguf="Q4_0"),
    "q4_1": dict(gguf="Q4_1"),
    "q8_0": dict(gguf="Q8_0"),
}


def quantized(params, name, **kw):
    spec = KINDS[name]
    if "gguf" in spec:
        return Q.quantize_params(
            params, "none", quantizer=functools.partial(Q.quantize_gguf, type_name=spec["gguf"])
        )
    return Q.quantize_params(params, Q.QuantConfig(**spec, **kw))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def base():
    # std 0.06 (not init_params' 0.02) so the logits move visibly with every weight (max
    # |logit| ≈ 11). Much wider (std 0.2, |logit| ≈ 36) and the random network amplifies
    # float32 reassociation (XLA may apply a per-channel scale after the dot instead of
    # before) to 3e-5 in the LoRA gradients; here it is ≈ 1.5e-6.
    params = init_params(jax.random.PRNGKey(0), CFG, heads=("lm", "score"))
    return jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x, params)


@pytest.fixture(scope="module")
def adapter(base):
    lcfg = LoraConfig(r=4, alpha=8.0, task_type="SEQ_CLS", modules_to_save=("score",))
    lora = init_lora(jax.random.PRNGKey(1), base, lcfg, CFG)
    # A trained-looking adapter: B random, so the LoRA term is not zero.
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 16))
    layers = {
        k: {**v, "lora_B": 0.1 * jax.random.normal(next(keys), v["lora_B"].shape)}
        for k, v in lora["layers"].items()
    }
    return lcfg, {**lora, "layers": layers}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, CFG.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


# ----------------------------------------------------------------------------- formats


def test_nf4_codebook_is_qlora():
    """QLoRA's construction, as bitsandbytes' `create_normal_map(offset=0.9677083)` computes
    it (torch float32): 8 positive and 7 negative N(0,1) quantiles, plus zero, divided by the
    largest."""
    stats = pytest.importorskip("scipy.stats")
    torch = pytest.importorskip("torch")
    offset = 0.9677083
    pos = stats.norm.ppf(torch.linspace(offset, 0.5, 9)[:-1]).tolist()
    neg = (-stats.norm.ppf(torch.linspace(offset, 0.5, 8)[:-1])).tolist()
    book = torch.tensor(pos + [0.0] + neg, dtype=torch.float32).sort().values
    np.testing.assert_array_equal(Q.NF4_CODEBOOK, (book / book.max()).numpy())
    assert len(np.unique(Q.NF4_CODEBOOK)) == 16


def test_nf4_round_trip_blocks_of_64():
    w = np.random.default_rng(0).normal(size=(2, 128, 48)).astype(np.float32)  # [L, in, out]
    qa = Q.quantize_nf4(w, double_quant=False)
    assert qa.shape == w.shape and qa.codes.dtype == np.uint8
    assert qa.codes.shape == (2, 48, 64)  # [L, out, 2 blocks of 64 values, 32 bytes each]
    assert qa.scales.shape == (2, 48, 2) and qa.block_size == 64
    blocks = np.swapaxes(w, 1, 2).reshape(2, 48, 2, 64)
    absmax = np.abs(blocks).max(-1)
    np.testing.assert_array_equal(qa.scales, absmax)  # stored exactly (float32)
    deq = np.asarray(Q.dequantize(qa))
    normed = np.swapaxes(deq, 1, 2).reshape(blocks.shape) / absmax[..., None]
    # Every value is a code book entry, and the nearest one to the original.
    on_book = np.abs(normed[..., None] - Q.NF4_CODEBOOK).min(-1)
    assert on_book.max() < 1e-6
    dist = np.abs((blocks / absmax[..., None])[..., None] - Q.NF4_CODEBOOK)
    np.testing.assert_allclose(np.abs(blocks / absmax[..., None] - normed), dist.min(-1), atol=1e-6)
    # The block's extreme value is ±1 on the book: reproduced exactly.
    i = np.abs(blocks).argmax(-1)[..., None]
    np.testing.assert_array_equal(
        np.take_along_axis(normed, i, -1), np.sign(np.take_along_axis(blocks, i, -1))
    )


def test_nf4_double_quant_absmax():
    w = np.random.default_rng(1).normal(size=(3, 256, 96)).astype(np.float32)
    plain, dq = Q.quantize_nf4(w, double_quant=False), Q.quantize_nf4(w, double_quant=True)
    np.testing.assert_array_equal(plain.codes, dq.codes)  # same 4-bit values
    assert dq.scales.dtype == np.uint8 and dq.scale_offset.shape == (3,)
    n = 96 * 256 // 64
    assert dq.scale_scales.shape == (3, -(-n // 256))  # one float32 per 256 absmax
    book = Q.dynamic_map()
    assert book.shape == (256,) and np.all(np.diff(book) >= 0) and {0.0, 1.0} <= set(book)
    # The coarsest step of the dynamic map (its [0.1, 1] decade has 64 steps of 0.9/64)
    # bounds the absmax error: half a step of each group's scale.
    decoded = np.asarray(Q.block_scales(dq))
    group_scale = np.repeat(dq.scale_scales, 256, axis=-1)[:, :n].reshape(decoded.shape)
    assert np.all(np.abs(decoded - plain.scales) <= 0.5 * 0.9 / 64 * group_scale + 1e-7)


def test_int8_per_output_channel():
    w = np.random.default_rng(2).normal(size=(64, 24)).astype(np.float32)  # [in, out]
    qa = Q.quantize_int8(w)
    assert qa.codes.dtype == np.int8 and qa.codes.shape == (24, 64)
    assert qa.scales.shape == (24, 1) and qa.block_size == 64
    scale = np.abs(w).max(0) / 127
    np.testing.assert_allclose(qa.scales[:, 0], scale, rtol=1e-7)
    assert np.abs(qa.codes.astype(int)).max() == 127
    deq = np.asarray(Q.dequantize(qa))
    assert np.all(np.abs(deq - w) <= scale / 2 * (1 + 1e-6))  # rounding: half a step


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("transposed", [False, True])
def test_gguf_blocks_decode_bit_for_bit(type_name, transposed):
    x = np.random.default_rng(3).normal(size=(2, 16, 96)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(x, qtype)
    expected = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    qa = Q.gguf_blocks(raw, type_name, x.shape, name="t")
    if transposed:
        qa, expected = dataclasses.replace(qa, transposed=True), np.swapaxes(expected, -1, -2)
    got = np.asarray(jax.jit(Q.dequantize)(qa))
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"model\.quant\.kind='fp8'.*int8, nf4"):
        Q.QuantConfig(kind="fp8")
    with pytest.raises(ValueError, match="model.quant.skip.*'score'"):
        Q.QuantConfig(kind="nf4", skip=("score",))
    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' has type Q4_K"):
        Q.gguf_blocks(np.zeros(144, np.uint8), "Q4_K", (1, 256), name="blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="'gguf' keeps a GGUF file's own blocks"):
        Q.quantize_params({"embed": np.zeros((4, 64))}, "gguf")
    with pytest.raises(ValueError, match="embed.*blocks of 64.*model.quant.skip"):
        Q.quantize_params({"embed": np.zeros((96, 48), np.float32)}, "nf4")
    # A GGUF tensor of a type that cannot be kept is refused with the file, name and type.
    tensor = types.SimpleNamespace(
        name="blk.0.ffn_down.weight",
        tensor_type=gguf.GGMLQuantizationType.Q6_K,
        shape=np.array([256, 4]),
        data=np.zeros((4, 210), np.uint8),
    )
    with pytest.raises(ValueError, match=r"model\.gguf.*'blk\.0\.ffn_down\.weight'.*Q6_K"):
        loading._kept_blocks(tensor, loading.Path("model.gguf"))


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", list(KINDS))
def test_forward_and_lora_gradients_equal_dequantized_model(name, base, adapter, batch):
    lcfg, lora = adapter
    qp = quantized(base, name)
    ref = Q.dequantize_params(qp)
    ids, mask = batch
    assert all(Q.is_quantized(qp["layers"][p]["kernel"]) for p in ("q_proj", "down_proj"))
    assert Q.is_quantized(qp["embed"]) and Q.is_quantized(qp["lm_head"]["kernel"])

    @jax.jit
    def outputs(params, lora):
        logits = forward(params, ids, mask, cfg=CFG)
        lora_logits = forward(params, ids, mask, cfg=CFG, lora=lora, lora_scale=lcfg.scale)
        scores = forward(params, ids, mask, cfg=CFG, head="score", lora=lora)
        return logits, lora_logits, scores

    def loss(lora, params):
        lp, _ = sequence_logprobs(params, ids, mask, cfg=CFG, lora=lora, lora_scale=lcfg.scale)
        rm = forward(params, ids, mask, cfg=CFG, head="score", lora=lora, lora_scale=lcfg.scale)
        return jnp.sum(lp * mask[:, 1:]) + jnp.sum(rm)

    grad = jax.jit(jax.grad(loss))
    for got, want in zip(outputs(qp, lora), outputs(ref, lora), strict=True):
        assert rel_err(got, want) <= 1e-5
    g_q, g_ref = grad(lora, qp), grad(lora, ref)
    # The gradients' bound is float32 rounding of two different dot kernels, measured against
    # a float64 computation of the same dequantized model on an AMD EPYC (AVX-512): XLA:CPU's
    # kernel for the dense reference lands within 3e-8 of it, the one taking the fused
    # dequantize within 1.1e-5 (NF4's LoRA-A of q_proj); with XLA's ynn dots switched off the
    # two agree exactly, both 4.9e-6 from float64. One block scale 1% off moves them by 3e-2.
    for path, a in jax.tree_util.tree_leaves_with_path(g_q):
        b = functools.reduce(lambda t, k: t[k.key], path, g_ref)
        assert rel_err(a, b) <= 3e-5, path
    assert float(jnp.max(jnp.abs(g_q["layers"]["q_proj"]["lora_A"]))) > 0


def test_quantized_leaves_get_no_gradient(base, adapter, batch):
    lcfg, lora = adapter
    qp = quantized(base, "q4_1")
    ids, mask = batch

    def loss(params):
        return jnp.sum(forward(params, ids, mask, cfg=CFG, lora=lora, lora_scale=lcfg.scale))

    g = jax.grad(loss, allow_int=True)(qp)
    qa = g["layers"]["up_proj"]["kernel"]
    assert qa.codes.dtype == jax.dtypes.float0  # integer codes: not differentiable
    assert float(jnp.max(jnp.abs(qa.scales))) == 0.0 and float(jnp.max(jnp.abs(qa.mins))) == 0.0


@pytest.mark.parametrize("name", ["int8", "nf4_dq", "q4_0"])
def test_kv_cache_decode_with_unmerged_lora_equals_dequantized(name, base, adapter, batch):
    lcfg, lora = adapter
    qp = quantized(base, name)
    ref = Q.dequantize_params(qp)
    ids, mask = batch
    sampling = SamplingConfig.for_model(CFG, max_new_tokens=5, greedy=True)
    gen = make_generate_fn(CFG, sampling)
    key = jax.random.PRNGKey(0)
    got = gen(qp, ids, mask, key, lora=lora, lora_scale=lcfg.scale)
    want = gen(ref, ids, mask, key, lora=lora, lora_scale=lcfg.scale)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.logprobs, want.logprobs) <= 1e-5


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_one_token_product_reads_the_packed_kernel(name, shape):
    # `matmul` of one token takes `vector_product`: the dequantized dot's value, and no
    # weight-sized float buffer in the compiled program (the dequantize is fused).
    w = (0.1 * np.random.default_rng(3).normal(size=shape)).astype(np.float32)
    qa = quantized({"layers": {"up_proj": {"kernel": w}}}, name)["layers"]["up_proj"]["kernel"]
    qa = jax.tree.map(jnp.asarray, qa)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 1, shape[0])), jnp.float32)
    fn = jax.jit(Q.matmul)
    want = x @ Q.dequantize(qa)
    assert fn(x, qa).shape == want.shape and rel_err(fn(x, qa), want) <= 1e-5
    assert entry_float_buffers(fn.lower(x, qa).compile().as_text(), w.shape) == []
    # More than one token: the dot with the dequantized weight (materialised per call).
    x3 = jnp.concatenate([x] * 3, axis=1)
    assert rel_err(fn(x3, qa), x3 @ Q.dequantize(qa)) <= 1e-5
    assert entry_float_buffers(fn.lower(x3, qa).compile().as_text(), w.shape) != []


def while_body(compiled_text: str) -> str:
    """The body computation of the (one) while loop of an optimized HLO module."""
    m = re.search(r"while\([^)]*\), condition=%\S+, body=%([\w.\-]+)", compiled_text)
    start = compiled_text.index(f"\n%{m.group(1)} ") + 1
    return re.split(r"\n(?=\S)", compiled_text[start:])[0]


@pytest.mark.parametrize("name", ["int8", "q4_1"])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_loop_holds_no_dequantized_weight(name, rows, base, adapter, batch):
    # The packed kernels are loop-invariant in the decode loop; without `quant.tied` XLA
    # hoists their dequantize out of it, and the loop carries a float copy of every weight.
    lcfg, lora = adapter
    qp = jax.tree.map(jnp.asarray, quantized(base, name))
    ids, mask = (jnp.concatenate([a] * 2)[:rows] for a in batch)
    gen = make_generate_fn(CFG, SamplingConfig.for_model(CFG, max_new_tokens=4, greedy=True))
    compiled = gen.jitted.lower(qp, ids, mask, jax.random.PRNGKey(0), lora, lcfg.scale).compile()
    # Nor does a one-row prefill hold every layer's dequantized weight at once (XLA:CPU
    # schedules them all first without `tied`'s data dependency): temporaries 0.47-0.55x of
    # the float base's bytes here, ~1x without (at 3 rows activations are a larger share).
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert rows > 1 or temp < 0.75 * Q.float32_bytes(qp)
    body = while_body(compiled.as_text())
    # Loop-carried float matrices: with a quantized base only LoRA's (a dim of rank 4) are
    # legitimate; a dequantized kernel (or a 4-bit kernel's half, [out, in/2]) is not.
    carried = re.findall(r"= f32\[(\d+),(\d+)\]\{[\d,]*\} get-tuple-element", body)
    assert "fusion" in body and [d for d in carried if min(map(int, d)) >= 16] == []


@pytest.mark.parametrize("name", ["int8", "nf4_dq", "q4_1", "q8_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_batch_one_decode_equals_dequantized(name, tied, base, adapter, batch):
    # One row: every decode step is one token per weight (the fused `vector_product`, the
    # LM head or tied embedding included); prefill and the reference take the dense dot.
    lcfg, lora = adapter
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    params = {k: v for k, v in base.items() if not (tied and k == "lm_head")}
    qp = quantized(params, name)
    assert Q.is_quantized(qp["embed"] if tied else qp["lm_head"]["kernel"])
    ref = Q.dequantize_params(qp)
    ids, mask = batch
    sampling = SamplingConfig.for_model(cfg, max_new_tokens=6, temperature=1.0)
    gen = make_generate_fn(cfg, sampling)
    key = jax.random.PRNGKey(7)
    got = gen(qp, ids[1:], mask[1:], key, lora=lora, lora_scale=lcfg.scale)
    want = gen(ref, ids[1:], mask[1:], key, lora=lora, lora_scale=lcfg.scale)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.logprobs, want.logprobs) <= 1e-5


def test_tied_quantized_embedding_is_the_lm_head(batch):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    params = init_params(jax.random.PRNGKey(5), cfg)
    qp = quantized(params, "nf4_dq")
    ids, mask = batch
    fwd = jax.jit(lambda p: forward(p, ids, mask, cfg=cfg))
    assert "lm_head" not in qp and Q.is_quantized(qp["embed"])
    assert rel_err(fwd(qp), fwd(Q.dequantize_params(qp))) <= 1e-5


@pytest.mark.parametrize("name", ["int8", "nf4_dq", "q4_1"])
def test_sharded_quantized_forward_equals_single_device(name, base, adapter, batch):
    lcfg, lora = adapter
    qp = quantized(base, name)
    ids, mask = batch
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    placed = put_tree(jax.tree.map(jnp.asarray, qp), mesh)

    def fwd(params, lora):
        return forward(params, ids, mask, cfg=CFG, lora=lora, lora_scale=lcfg.scale)

    got = jax.jit(fwd)(placed, put_tree(lora, mesh))
    assert rel_err(got, jax.jit(fwd)(qp, lora)) <= 1e-5
    # The packed values and the scales are split along their kernel's [L, in=64, out=128]
    # axes, stored [L, out, bytes] and [L, out, blocks]: "fsdp" (the `embed` input axis)
    # splits every row's bytes, and the blocks' scales when fsdp=2 divides their number
    # (Q4_1: 2 blocks of 32; int8: one block per row; NF4: one block of 64).
    specs = tree_shardings(qp, mesh)["layers"]["gate_proj"]["kernel"]
    n_blocks = qp["layers"]["gate_proj"]["kernel"].scales.shape[2]
    P = jax.sharding.PartitionSpec
    assert specs.codes.spec == P(None, "tensor", "fsdp")
    assert specs.scales.spec == P(None, "tensor", "fsdp" if n_blocks % 2 == 0 else None)
    assert per_device_bytes(placed) < tree_bytes(qp) / 2


def test_bytes_and_summary_count_the_packed_base(base):
    qp = quantized(base, "nf4_dq")
    assert tree_size(qp) == tree_size(base)  # logical parameters
    kernel = qp["layers"]["q_proj"]["kernel"]
    assert tree_bytes(kernel) == kernel.nbytes < tree_bytes(base["layers"]["q_proj"]) / 6
    summary = trainable_summary({"x": jnp.zeros(3)}, qp)
    assert summary.total_params == 3 + tree_size(base)
    assert summary.frozen_bytes == tree_bytes(qp) < 0.3 * tree_bytes(base)


def test_merge_and_export_dequantize(base, adapter, tmp_path):
    lcfg, lora = adapter
    qp = quantized(base, "q8_0")
    ref = Q.dequantize_params(qp)
    merged = merge(qp, lora, lcfg)
    want = merge(ref, lora, lcfg)
    for proj in ("q_proj", "down_proj"):
        assert merged["layers"][proj]["kernel"].dtype == jnp.float32
        np.testing.assert_array_equal(
            merged["layers"][proj]["kernel"], want["layers"][proj]["kernel"]
        )
    out = loading.save_hf_folder({k: v for k, v in qp.items() if k != "score"}, CFG, tmp_path)
    _, back = loading.load_hf_folder(out)
    np.testing.assert_array_equal(
        back["layers"]["o_proj"]["kernel"], ref["layers"]["o_proj"]["kernel"]
    )
    np.testing.assert_array_equal(back["embed"], ref["embed"])


@pytest.mark.parametrize("name", ["int8", "nf4_dq"])
def test_quantized_while_loading_equals_quantized_after(name, base, tmp_path):
    # `load_quantized` on an HF folder quantizes each layer's array as it is read (the float
    # checkpoint is never whole in memory) and gets the values `quantize_params` gives the
    # loaded float tree, double-quantized absmax included (its groups are per layer).
    folder = loading.save_hf_folder({k: v for k, v in base.items() if k != "score"}, CFG, tmp_path)
    qcfg = Q.QuantConfig(**KINDS[name], skip=("o_proj",))
    _, got, _ = Q.load_quantized(str(folder), qcfg)
    _, float_params, _ = loading.load_model(folder)
    want = Q.quantize_params(float_params, qcfg)
    assert jax.tree.structure(got, is_leaf=Q.is_quantized) == jax.tree.structure(
        want, is_leaf=Q.is_quantized
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)
    assert not Q.is_quantized(got["layers"]["o_proj"]["kernel"])  # skipped: float
    seen = []

    def recording(path, w):
        seen.append((path, np.shape(w)))
        return Q.quantizing_hook(qcfg)(path, w)

    loading.load_model(folder, weight_hook=recording)
    shapes = dict(seen)
    # One layer at a time ([in, out], not [L, in, out]), the embedding in its own layout.
    assert shapes[("layers", "gate_proj", "kernel")] == (CFG.hidden_size, CFG.intermediate_size)
    assert shapes[("embed",)] == (CFG.vocab_size, CFG.hidden_size)
    assert sum(p == ("layers", "q_proj", "kernel") for p, _ in seen) == CFG.num_layers


@pytest.mark.slow
def test_default_gguf_kept_quantized_equals_dequantized_load():
    cfg, ref, tok = loading.load_model("default")
    _, qp, _ = loading.load_gguf(loading.default_model_path(), keep_quantized=True)
    assert Q.quant_summary(qp) == {"q4_1": 7, "q8_0": 1, "float": 2}
    assert qp["layers"]["q_proj"]["kernel"].shape == ref["layers"]["q_proj"]["kernel"].shape
    assert tree_bytes(qp) <= 0.3 * tree_bytes(ref)
    ids = jnp.asarray(tok(["The capital of France is"], return_tensors="np")["input_ids"])
    fwd = jax.jit(lambda p: forward(p, ids, jnp.ones_like(ids), cfg=cfg))
    assert rel_err(fwd(jax.tree.map(jnp.asarray, qp)), fwd(ref)) <= 1e-5


def _write_tiny_gguf(path, params, cfg, type_name: str) -> None:
    """A llama GGUF of `params` with every 2-D weight stored as `type_name` blocks (q/k rows
    permuted the llama.cpp way, the inverse of `loading.unpermute_qk`)."""
    from jaxrlhf.models.hf_names import state_dict_from_params

    names = {v: k for k, v in loading._GGUF_GLOBAL.items()}
    block = {v: k for k, v in loading._GGUF_BLOCK.items()}
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(cfg.num_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    qtype = gguf.GGMLQuantizationType[type_name]
    for hf_name, w in state_dict_from_params(params, cfg).items():
        if hf_name.startswith("model.layers."):
            i, rest = hf_name.split(".", 3)[2:]
            module, leaf = rest.rsplit(".", 1)
            name = f"blk.{i}.{block[module]}.{leaf}"
        else:
            name = names[hf_name]
        for proj, heads in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
            if proj in hf_name:
                w = w.reshape(heads, 2, -1, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        if w.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, w.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0"])
def test_gguf_file_kept_quantized_equals_dequantized(type_name, base, batch, tmp_path):
    params = {k: v for k, v in jax.device_get(base).items() if k != "score"}
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, params, CFG, type_name)
    cfg, dense, _ = loading.load_gguf(path)
    _, kept, _ = loading.load_gguf(path, keep_quantized=True)
    assert cfg.num_kv_heads == CFG.num_kv_heads and not cfg.tie_word_embeddings
    assert Q.quant_summary(kept)[type_name.lower()] == 9  # 7 projections, lm head, embedding
    # Kept blocks dequantize to exactly what the float load made of the same file.
    for module in ("q_proj", "k_proj", "down_proj"):
        np.testing.assert_array_equal(
            np.asarray(kept["layers"][module]["kernel"]), dense["layers"][module]["kernel"]
        )
    ids, mask = batch
    fwd = jax.jit(lambda p: forward(p, ids, mask, cfg=cfg))
    assert rel_err(fwd(kept), fwd(dense)) <= 1e-5
    # load_quantized keeps the file's blocks; `skip` loads those modules dense.
    _, partly, _ = Q.load_quantized(str(path), Q.QuantConfig(kind="gguf", skip=("embed", "v_proj")))
    assert not Q.is_quantized(partly["embed"]) and Q.is_quantized(partly["lm_head"]["kernel"])
    np.testing.assert_array_equal(partly["embed"], dense["embed"])
    assert not Q.is_quantized(partly["layers"]["v_proj"]["kernel"])
    np.testing.assert_array_equal(
        partly["layers"]["v_proj"]["kernel"], dense["layers"]["v_proj"]["kernel"]
    )
    with pytest.raises(ValueError, match="kind='gguf'.*not a .gguf file"):
        Q.load_quantized(str(tmp_path), Q.QuantConfig(kind="gguf"))


def test_sampler_on_mesh_with_quantized_base_equals_single_device(base, adapter, batch):
    lcfg, lora = adapter
    qp = jax.tree.map(jnp.asarray, quantized(base, "nf4_dq"))
    ids, mask = batch
    ids, mask = jnp.concatenate([ids] * 2), jnp.concatenate([mask] * 2)  # 4 rows: data x fsdp
    sampling = SamplingConfig.for_model(CFG, max_new_tokens=4, greedy=True)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    key = jax.random.PRNGKey(0)
    got = make_generate_fn(CFG, sampling, mesh)(
        put_tree(qp, mesh), ids, mask, key, lora=put_tree(lora, mesh), lora_scale=lcfg.scale
    )
    want = make_generate_fn(CFG, sampling)(qp, ids, mask, key, lora=lora, lora_scale=lcfg.scale)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.logprobs, want.logprobs) <= 1e-5


@pytest.mark.parametrize("name", ["nf4_dq", "q4_1"])
def test_dense_rollout_copy_of_a_quantized_base_equals_the_dequantized_model(
    name, base, adapter, batch
):
    """`generation.dequantize_base`: the sampler merges the adapter into a dense copy of the
    quantized base (every quantized weight dequantized, the embedding and LM head too) and
    samples what the float model whose weights are the dequantized values samples."""
    from jaxrlhf.config import GenerationConfig, ModelSection
    from jaxrlhf.rollout.engine import Sampler, merged_rollout_weights
    from jaxrlhf.train.online import rollout_generation

    lcfg, lora = adapter
    qp = quantized(base, name)
    ref = Q.dequantize_params(qp)
    dense = merged_rollout_weights(qp, lora, lcfg)
    assert not any(Q.is_quantized(x) for x in jax.tree.leaves(dense, is_leaf=Q.is_quantized))
    gen = GenerationConfig(max_new_tokens=6, temperature=1.0, merge_adapter=True)
    sampler = Sampler(CFG, gen, lora_cfg=lcfg, eos_token_ids=(1,), pad_token_id=0)
    ids, mask = batch
    prompts = {"input_ids": ids, "attention_mask": mask}
    key = jax.random.PRNGKey(3)
    got = sampler.generate(lora, qp, prompts, key)
    want = sampler.generate(lora, ref, prompts, key)
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    assert rel_err(got.sampler_logprobs, want.sampler_logprobs) <= 1e-5
    # The run's choice: merged (dense copy) only when asked, on a quantized base.
    run = types.SimpleNamespace(model=ModelSection(quant=Q.QuantConfig(kind="nf4")))
    for asked in (False, True):
        run.generation = GenerationConfig(merge_adapter=True, dequantize_base=asked)
        assert rollout_generation(run).merge_adapter is asked
    run.model = ModelSection()
    run.generation = GenerationConfig(merge_adapter=True)
    assert rollout_generation(run).merge_adapter is True
