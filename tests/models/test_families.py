"""Every model family against transformers (torch, CPU, float32) on tiny random models.

One tiny checkpoint per family (2 layers, hidden 64, vocab 300; every tensor re-drawn, so a
norm left at one or a bias at zero cannot hide a wrong name) is saved with
`save_pretrained` and read back with `load_hf_folder`. Each family's switches are set to
values that make them matter at these lengths: a window of 4 on sequences of 12-16, soft-caps
small enough that tanh bends, `query_pre_attn_scalar` unlike head_dim, a linear rope scaling
on Gemma 3's global layers only. `test_switches_are_exercised` checks that turning each switch
off in our config breaks the parity, so a passing parity test is evidence for every switch.
Only real-token positions are compared: what a model computes at a pad position is arbitrary.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.data.packing import pack_pairs
from jaxrlhf.lora import LoraConfig, all_targets, init_lora, merge, targeted_modules, unmerge
from jaxrlhf.models.config import config_from_hf
from jaxrlhf.models.loading import load_hf_folder, save_hf_folder
from jaxrlhf.models.transformer import (
    backbone,
    forward,
    init_params,
    load_balancing_loss,
    router_aux_loss,
    sequence_logprobs,
    token_logprobs,
)
from jaxrlhf.peft_format import export_merged, export_peft, load_peft
from jaxrlhf.rollout.sampling import SamplingConfig, generate

peft = pytest.importorskip("peft")

VOCAB = 300
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
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE_TARGETS = [*ATTN, "gate_proj", "up_proj", "down_proj"]

# family -> (config class, causal LM class, seq-cls class, config extras, PEFT targets,
#            switches of ours that must matter: overrides that turn each one off)
FAMILIES = {
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        transformers.Qwen3ForSequenceClassification,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
        DENSE_TARGETS,
        {"qk_norm": "none", "sliding_window": None},
    ),
    "qwen2-window": (  # Qwen2's windows, which jaxrlhf used to refuse
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2ForSequenceClassification,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
        DENSE_TARGETS,
        {"sliding_window": None},
    ),
    "qwen3-tied": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        transformers.Qwen3ForSequenceClassification,
        dict(tie_word_embeddings=True),
        DENSE_TARGETS,
        {"qk_norm": "none"},
    ),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2ForSequenceClassification,
        dict(
            sliding_window=4,
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=2.0,
        ),
        DENSE_TARGETS,
        {
            "norm_offset": 0.0,
            "embed_scale": False,
            "mlp_activation": "silu",
            "query_pre_attn_scalar": None,
            "attn_logit_softcap": None,
            "final_logit_softcap": None,
            "sliding_window": None,
            "norm_placement": "pre",
        },
    ),
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextForSequenceClassification,
        dict(
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
        DENSE_TARGETS,
        {"qk_norm": "none", "local_rope_theta": None, "sliding_window": None},
    ),
    "phi3": (
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        transformers.Phi3ForSequenceClassification,
        dict(sliding_window=5),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        {"sliding_window": None},
    ),
    "olmo2": (
        transformers.Olmo2Config,
        transformers.Olmo2ForCausalLM,
        transformers.Olmo2ForSequenceClassification,
        {},
        DENSE_TARGETS,
        {"qk_norm": "none"},
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        transformers.Qwen3MoeForSequenceClassification,
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
        ATTN,
        {"norm_topk_prob": False, "qk_norm": "none"},
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        transformers.MixtralForSequenceClassification,
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
        ATTN,
        {"norm_topk_prob": False, "sliding_window": None},
    ),
}
# MoE experts are 3-D parameters in transformers 5: PEFT adapts them by `target_parameters`.
PEFT_EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERT_TARGETS = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
WINDOWED = ("qwen3", "gemma2", "gemma3_text", "phi3", "mixtral")
MOE = ("qwen3_moe", "mixtral")


def hf_config(family: str, **kw):
    config_cls, _, _, extra, _, _ = FAMILIES[family]
    cfg = config_cls(**{**TINY, **extra, **kw})
    cfg._attn_implementation = "eager"  # soft-capping and windows exactly as written
    return cfg


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values in every tensor (norms near one, the rest small)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)


_BUILT: dict = {}


def built(family: str, tmp_path_factory):
    """(HF model, its folder, our cfg, our params), built once per family per session."""
    if family not in _BUILT:
        _, lm_cls, _, _, _, _ = FAMILIES[family]
        model = lm_cls(hf_config(family)).eval()
        randomize_(model, seed=1)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        cfg, params = load_hf_folder(folder)
        _BUILT[family] = (model, str(folder), cfg, params)
    return _BUILT[family]


def batch(side: str, seed: int = 0, seq: int = SEQ, lengths=LENGTHS):
    """Token ids (never the pad id, so HF's classifier finds the last real token) and mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(len(lengths), seq))
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, seq - n :] = 1
        else:
            mask[row, :n] = 1
    return np.where(mask == 1, ids, PAD_ID), mask


def hf_logits(model, ids, mask):
    # HF counts positions from slot 0; make them count real tokens, as ours do.
    positions = torch.tensor(np.clip(np.cumsum(mask, -1) - 1, 0, None))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=positions
        )
    return out.logits.numpy()


def max_rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def ours_logits(params, cfg, ids, mask, lora=None, scale=1.0):
    return np.asarray(
        forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg, lora=lora, lora_scale=scale)
    )


def random_adapter(params, lora_cfg, cfg, seed=0):
    """An adapter with B drawn too (a fresh one is the base model exactly)."""
    lora = init_lora(jax.random.key(seed), params, lora_cfg, cfg)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), lora)


# ----------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path_factory):
    model, _, cfg, params = built(family, tmp_path_factory)
    assert cfg.model_type == family.split("-")[0]
    for side in ("left", "right"):
        ids, mask = batch(side)
        real = mask.astype(bool)
        err = max_rel_err(
            ours_logits(params, cfg, ids, mask)[real], hf_logits(model, ids, mask)[real]
        )
        assert err <= REL_TOL, f"{family}, {side} padding: max relative error {err:.2e}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_switches_are_exercised(family, tmp_path_factory):
    """Each family switch, turned off, breaks the parity: the tiny configs exercise them all."""
    model, _, cfg, params = built(family, tmp_path_factory)
    ids, mask = batch("right")
    real = mask.astype(bool)
    ref = hf_logits(model, ids, mask)[real]
    for switch, off in FAMILIES[family][5].items():
        overrides = {switch: off, **({"sliding_layers": ()} if switch == "sliding_window" else {})}
        wrong = cfg.replace(**overrides)
        err = max_rel_err(ours_logits(params, wrong, ids, mask)[real], ref)
        assert err > 100 * REL_TOL, f"{family}: {switch}={off} leaves the logits unchanged"


@pytest.mark.parametrize(
    "family", ["qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "qwen3_moe", "mixtral"]
)
def test_score_head_matches_sequence_classification(family, tmp_path):
    seq_cls = FAMILIES[family][2]
    model = seq_cls(hf_config(family, num_labels=1)).eval()
    randomize_(model, seed=2)
    model.save_pretrained(tmp_path)
    cfg, params = load_hf_folder(tmp_path)
    assert "score" in params and "lm_head" not in params
    for side in ("left", "right"):
        ids, mask = batch(side, seed=3)
        ours = np.asarray(
            forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg, head="score")
        )
        ref = hf_logits(model, ids, mask)[:, 0]
        assert max_rel_err(ours, ref) <= REL_TOL, f"{family}, {side} padding"


# ----------------------------------------------------------------------------- decoding


def _left_prompts():
    ids, mask = batch("left", seed=4, seq=6, lengths=(6, 4))
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_decoding_matches_generate(family, tmp_path_factory):
    """Token for token, with 6 + 10 tokens: past the window of 4/5 on windowed families."""
    model, _, cfg, params = built(family, tmp_path_factory)
    ids, mask = _left_prompts()
    n = 10
    sampling = SamplingConfig(max_new_tokens=n, eos_token_ids=(), pad_token_id=PAD_ID, greedy=True)
    out = jax.jit(lambda p, i, m: generate(p, i, m, jax.random.key(0), cfg=cfg, sampling=sampling))(
        params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    )
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=PAD_ID,
            eos_token_id=None,
        )[:, ids.shape[1] :].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_decode_equals_full_forward(family, tmp_path_factory):
    """The sampler's log-probs (prefill + cached decode steps) equal a full forward over
    [prompt, response] (soft-capped, windowed and routed alike)."""
    _, _, cfg, params = built(family, tmp_path_factory)
    ids, mask = _left_prompts()
    sampling = SamplingConfig(max_new_tokens=10, eos_token_ids=(), pad_token_id=PAD_ID, greedy=True)
    out = jax.jit(lambda p, i, m: generate(p, i, m, jax.random.key(0), cfg=cfg, sampling=sampling))(
        params, jnp.asarray(ids), jnp.asarray(mask)
    )
    full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), out.response_mask], axis=1)
    lp, _ = sequence_logprobs(params, full_ids, full_mask, cfg=cfg)
    response_lp = np.asarray(lp[:, ids.shape[1] - 1 :])
    np.testing.assert_allclose(np.asarray(out.logprobs), response_lp, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3", "qwen3_moe"])
def test_prefix_shared_packing_equals_unpacked(family, tmp_path_factory):
    """A packed (prompt | chosen | rejected) row gives every response token the log-prob of
    the unpacked sequence: windows are measured in positions, not slots."""
    _, _, cfg, params = built(family, tmp_path_factory)
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, VOCAB, 5)
    chosen = np.concatenate([prompt, rng.integers(3, VOCAB, 6)])
    rejected = np.concatenate([prompt, rng.integers(3, VOCAB, 4)])
    width = 12
    pad = lambda x: np.pad(x, (0, width - len(x)))[None]  # noqa: E731
    packed = pack_pairs(
        {
            "chosen_input_ids": pad(chosen),
            "rejected_input_ids": pad(rejected),
            "chosen_attention_mask": pad(np.ones_like(chosen)),
            "rejected_attention_mask": pad(np.ones_like(rejected)),
            "prompt_lengths": np.array([5]),
        },
        pad_id=PAD_ID,
    )
    hidden, _ = backbone(
        params,
        jnp.asarray(packed["input_ids"]),
        jnp.asarray(packed["attention_mask"]),
        cfg=cfg,
        positions=jnp.asarray(packed["positions"]),
        segment_ids=jnp.asarray(packed["segment_ids"]),
    )
    prev = jnp.take_along_axis(hidden, jnp.asarray(packed["response_prev"])[..., None], axis=1)
    packed_lp = np.asarray(
        token_logprobs(
            params, prev, jnp.asarray(packed["response_ids"]), logit_softcap=cfg.final_logit_softcap
        )[0]
    )[0]
    for seq, sel in ((chosen, "response_chosen"), (rejected, "response_rejected")):
        lp, _ = sequence_logprobs(params, jnp.asarray(seq[None]), jnp.ones((1, len(seq))), cfg=cfg)
        np.testing.assert_allclose(
            packed_lp[packed[sel][0] == 1], np.asarray(lp[0, 4:]), atol=1e-5, rtol=1e-5
        )


# ----------------------------------------------------------------------------- LoRA, PEFT, export


def _targets(family):
    return FAMILIES[family][4]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_made_adapter_loads_with_equal_outputs(family, tmp_path_factory, tmp_path):
    model, folder, cfg, params = built(family, tmp_path_factory)
    base = FAMILIES[family][1].from_pretrained(folder, attn_implementation="eager").eval()
    torch.manual_seed(3)
    expert_params = {"target_parameters": PEFT_EXPERT_PARAMETERS} if family in MOE else {}
    pm = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=_targets(family),
            init_lora_weights=False,
            **expert_params,
        ),
    ).eval()
    pm.save_pretrained(tmp_path)
    lora, lora_cfg = load_peft(tmp_path, cfg)
    if family in MOE:  # every expert kernel adapted, gate and up sharing PEFT's gate_up A
        assert set(lora["layers"]["experts"]) == {"gate_proj", "up_proj", "down_proj"}
    ids, mask = batch("right", seed=6)
    real = mask.astype(bool)
    ours = ours_logits(params, cfg, ids, mask, lora, lora_cfg.scale)[real]
    assert max_rel_err(ours_logits(params, cfg, ids, mask)[real], ours) > 100 * REL_TOL
    assert max_rel_err(ours, hf_logits(pm, ids, mask)[real]) <= REL_TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_adapter_loads_in_peft_with_equal_outputs(family, tmp_path_factory, tmp_path):
    _, folder, cfg, params = built(family, tmp_path_factory)
    targets = tuple(_targets(family)) + EXPERT_TARGETS.get(family, ())
    lora_cfg = LoraConfig(r=4, alpha=8, target_modules=targets)
    lora = random_adapter(params, lora_cfg, cfg)
    export_peft(lora, lora_cfg, cfg, tmp_path, base_model_name_or_path=folder)
    base = FAMILIES[family][1].from_pretrained(folder, attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids, mask = batch("left", seed=7)
    real = mask.astype(bool)
    ours = ours_logits(params, cfg, ids, mask, lora, lora_cfg.scale)[real]
    assert max_rel_err(ours, hf_logits(pm, ids, mask)[real]) <= REL_TOL
    # ... and reads back into jaxrlhf with the same outputs (MoE: at the exported rank 2r).
    back, back_cfg = load_peft(tmp_path, cfg)
    again = ours_logits(params, cfg, ids, mask, back, back_cfg.scale)[real]
    assert max_rel_err(again, ours) <= REL_TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_equals_unmerged_and_merged_export_loads(family, tmp_path_factory, tmp_path):
    """merge(W + s·A·B) gives the unmerged outputs, unmerge restores W, and the merged folder
    (`export_merged`, `save_hf_folder`) loads in transformers with the same logits."""
    _, _, cfg, params = built(family, tmp_path_factory)
    targets = tuple(_targets(family)) + EXPERT_TARGETS.get(family, ())[:2]
    lora_cfg = LoraConfig(r=4, alpha=8, target_modules=targets)
    lora = random_adapter(params, lora_cfg, cfg)
    merged = merge(params, lora, lora_cfg)
    ids, mask = batch("right", seed=8)
    real = mask.astype(bool)
    unmerged = ours_logits(params, cfg, ids, mask, lora, lora_cfg.scale)[real]
    assert max_rel_err(ours_logits(merged, cfg, ids, mask)[real], unmerged) <= REL_TOL
    restored = unmerge(merged, lora, lora_cfg)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    export_merged(params, lora, lora_cfg, cfg, tmp_path / "merged")
    save_hf_folder(merged, cfg, tmp_path / "saved")
    for sub in ("merged", "saved"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / sub, attn_implementation="eager"
        ).eval()
        assert type(hf).__name__ == FAMILIES[family][1].__name__
        assert max_rel_err(hf_logits(hf, ids, mask)[real], unmerged) <= REL_TOL, sub
        assert config_from_hf(json.loads((tmp_path / sub / "config.json").read_text())) == cfg


# ----------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("family", MOE)
def test_router_aux_loss_matches_transformers(family, tmp_path_factory):
    model, _, cfg, params = built(family, tmp_path_factory)
    ids, mask = batch("right", seed=9)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            output_router_logits=True,
        )
    _, _, logits = backbone(
        params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg, with_router_logits=True
    )
    ours = float(load_balancing_loss(logits, jnp.asarray(mask), top_k=cfg.num_experts_per_tok))
    np.testing.assert_allclose(ours, out.aux_loss.item(), rtol=1e-5)
    coef = float(router_aux_loss(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg))
    np.testing.assert_allclose(coef, cfg.router_aux_loss_coef * ours, rtol=1e-6)


@pytest.mark.parametrize("family", MOE)
def test_dense_and_ragged_dispatch_agree_with_expert_lora(family, tmp_path_factory):
    _, _, cfg, params = built(family, tmp_path_factory)
    lora_cfg = LoraConfig(r=4, alpha=8, target_modules=EXPERT_TARGETS[family])
    lora = random_adapter(params, lora_cfg, cfg)
    assert lora["layers"]["experts"]["gate_proj"]["lora_A"].shape == (2, cfg.num_experts, 64, 4)
    ids, mask = batch("right", seed=10)
    ragged = ours_logits(params, cfg.replace(moe_dispatch="ragged"), ids, mask, lora, 2.0)
    dense = ours_logits(params, cfg.replace(moe_dispatch="dense"), ids, mask, lora, 2.0)
    np.testing.assert_allclose(ragged, dense, atol=1e-5, rtol=1e-5)
    base = ours_logits(params, cfg, ids, mask)
    assert max_rel_err(base, ragged) > 100 * REL_TOL  # the expert adapter does something


@pytest.mark.parametrize("dispatch", ["dense", "ragged"])
def test_moe_sharded_forward_equals_single_device(dispatch, tmp_path_factory):
    """8 simulated devices, experts split 4 ways over "fsdp" (expert parallelism), batch over
    data x fsdp, an adapter on attention and experts placed by the same rules: the forward
    and the adapter's gradient equal the single-device ones."""
    from jaxrlhf import sharding as S

    _, _, cfg, params = built("qwen3_moe", tmp_path_factory)
    cfg = cfg.replace(moe_dispatch=dispatch)
    lora_cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "gate_proj", "down_proj"))
    lora = random_adapter(params, lora_cfg, cfg)
    mesh = S.make_mesh(S.MeshConfig(data=2, fsdp=4, tensor=1))
    placed, placed_lora = S.put_tree(params, mesh), S.put_tree(lora, mesh)
    # [L, E, D, F] kernels and [L, E, D, r] factors: the expert axis is split.
    assert placed["layers"]["experts"]["gate_proj"]["kernel"].sharding.spec[1] == "fsdp"
    assert placed_lora["layers"]["experts"]["gate_proj"]["lora_A"].sharding.spec[1] == "fsdp"
    ids, mask = batch("right", seed=11, seq=SEQ, lengths=(12, 7, 3, 9, 12, 5, 1, 8))

    def loss_and_logits(p, lo, i, m):
        logits = forward(p, i, m, cfg=cfg, lora=lo, lora_scale=lora_cfg.scale)
        return jnp.mean(logits**2), logits

    step = jax.value_and_grad(loss_and_logits, argnums=1, has_aux=True)
    (_, single), single_grad = jax.jit(step)(params, lora, jnp.asarray(ids), jnp.asarray(mask))
    batch_sh = S.batch_shardings({"i": ids, "m": mask}, mesh)
    (_, sharded), sharded_grad = jax.jit(step)(
        placed, placed_lora, jax.device_put(ids, batch_sh["i"]), jax.device_put(mask, batch_sh["m"])
    )
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded_grad), jax.tree.leaves(single_grad), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- remat, soft-cap grads


@pytest.mark.parametrize("family", ["gemma2", "qwen3_moe"])
def test_remat_gives_the_same_loss_and_gradients(family, tmp_path_factory):
    _, _, cfg, params = built(family, tmp_path_factory)
    lora_cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj"))
    lora = random_adapter(params, lora_cfg, cfg)
    ids, mask = (jnp.asarray(x) for x in batch("right", seed=12))

    def loss(lo, c):
        lp, _ = sequence_logprobs(params, ids, mask, cfg=c, lora=lo, lora_scale=2.0)
        return -jnp.sum(lp * mask[:, 1:])

    plain = jax.value_and_grad(loss)(lora, cfg)
    remat = jax.value_and_grad(loss)(lora, cfg.replace(remat="block"))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_softcapped_logprob_gradient_equals_autodiff():
    """The hand-written backward of the soft-capped chunk equals autodiff of
    log_softmax(cap·tanh(h·W / cap) / T)."""
    rng = np.random.default_rng(13)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    kernel = jnp.asarray(3 * rng.normal(size=(8, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)))
    cap, temp = 2.0, 0.7

    def ours(h, w):
        lp, _ = token_logprobs({"embed": w.T}, h, targets, temperature=temp, logit_softcap=cap)
        return jnp.sum(lp * jnp.arange(10).reshape(2, 5))

    def reference(h, w):
        logits = cap * jnp.tanh(jnp.einsum("btd,dv->btv", h, w) / cap) / temp
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(lp * jnp.arange(10).reshape(2, 5))

    np.testing.assert_allclose(ours(hidden, kernel), reference(hidden, kernel), rtol=1e-6)
    for a, b in zip(
        jax.grad(ours, (0, 1))(hidden, kernel),
        jax.grad(reference, (0, 1))(hidden, kernel),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    # a frozen kernel takes the other backward rule (the direction formed in the forward)
    np.testing.assert_allclose(
        np.asarray(jax.grad(ours)(hidden, kernel)),
        np.asarray(jax.grad(reference)(hidden, kernel)),
        atol=1e-5,
        rtol=1e-5,
    )


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "family,option,match",
    [
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("qwen3", {"attention_bias": True}, "attention_bias"),
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
        ("olmo2", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_unimplemented_options_are_refused_by_name(family, option, match):
    raw = hf_config(family).to_dict()
    raw.update(option)
    with pytest.raises(ValueError, match=match):
        config_from_hf(raw)


def test_phi3_partial_rotary_is_refused():
    raw = hf_config("phi3").to_dict()
    raw["rope_parameters"] = {**(raw.get("rope_parameters") or {}), "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        config_from_hf(raw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_init_params_has_the_loaded_tree(family, tmp_path_factory):
    """`init_params` builds the same tree (paths, shapes) as a loaded checkpoint, and its
    norms start as the identity (offset + w = 1)."""
    _, _, cfg, params = built(family, tmp_path_factory)
    fresh = init_params(jax.random.key(0), cfg)
    shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
    assert shapes(fresh) == shapes(params)
    np.testing.assert_array_equal(
        cfg.norm_offset + np.asarray(fresh["layers"][cfg.norm_names[0]]["scale"]), 1.0
    )


def test_hub_style_configs_read_as_transformers_reads_them():
    """Older config.json spellings (as on the Hub) give the config transformers' own parsing
    gives: Gemma 3's `rope_theta` + `rope_scaling` + `rope_local_base_freq` +
    `sliding_window_pattern`, Gemma 2's flat `rope_theta`, Qwen3's `max_window_layers`."""
    hub = {
        "gemma3_text": dict(
            model_type="gemma3_text",
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            sliding_window_pattern=3,
            sliding_window=512,
            query_pre_attn_scalar=16,
            num_hidden_layers=6,
        ),
        "gemma2": dict(model_type="gemma2", rope_theta=1e4, sliding_window=512),
        "qwen3": dict(
            model_type="qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=1
        ),
    }
    classes = {
        "gemma3_text": transformers.Gemma3TextConfig,
        "gemma2": transformers.Gemma2Config,
        "qwen3": transformers.Qwen3Config,
    }
    for family, extra in hub.items():
        raw = {**TINY, "num_hidden_layers": 2, "num_labels": 1, **extra}
        ours = config_from_hf(raw)
        theirs = config_from_hf(
            classes[family](**{k: v for k, v in raw.items() if k != "model_type"})
        )
        assert ours == theirs, family
    g3 = config_from_hf({**TINY, **hub["gemma3_text"]})
    assert g3.sliding_layers == (True, True, False, True, True, False)
    assert (g3.rope_theta, g3.local_rope_theta, g3.rope_scaling.factor) == (1e6, 1e4, 8.0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_targets_adapts_every_projection(family, tmp_path_factory):
    _, _, cfg, _ = built(family, tmp_path_factory)
    chosen = targeted_modules(LoraConfig(target_modules=all_targets(cfg)), cfg)
    assert chosen == cfg.projections
    if family == "mixtral":
        assert all_targets(cfg)[-3:] == ("w1", "w3", "w2")
