"""PEFT adapter format and merged export, checked against the real `peft` and `transformers`.

Every direction is checked by outputs, not by file contents: an adapter written by one side
and read by the other must give the same logits (or reward scores) as the writer's model.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from jaxrlhf.lora import LoraConfig, init_lora  # noqa: E402
from jaxrlhf.models.loading import load_hf_folder  # noqa: E402
from jaxrlhf.models.transformer import forward  # noqa: E402
from jaxrlhf.peft_format import (  # noqa: E402
    CONFIG_NAME,
    WEIGHTS_NAME,
    export_merged,
    export_peft,
    load_peft,
)

RTOL = 1e-4  # max |ours - theirs| / max |theirs|
IDS = np.array(
    [[5, 17, 99, 3, 42, 7, 64, 12, 88, 31], [9, 120, 33, 4, 71, 26, 50, 0, 0, 0]], dtype=np.int64
)  # row 1 right-padded
MASK = (np.arange(IDS.shape[1])[None] < np.array([[10], [7]])).astype(np.int64)


def _hf_config(**kw):
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    base.update(kw)
    return transformers.LlamaConfig(**base)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_hf_config()).eval()
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base(base_dir):
    return load_hf_folder(base_dir)  # (model_cfg, params)


def _hf_lm(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()


def _hf_seq_cls(base_dir):
    """A reward model as PEFT users build one: the causal LM's backbone plus a random score."""
    torch.manual_seed(1)
    model = transformers.LlamaForSequenceClassification(_hf_config(num_labels=1)).eval()
    lm = _hf_lm(base_dir)
    missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
    assert missing == ["score.weight"] and unexpected == ["lm_head.weight"]
    return model


def _torch_out(model):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
    return out.numpy()


_forward = jax.jit(forward, static_argnames=("cfg", "head"))


def _ours(params, model_cfg, lora=None, lora_cfg=None, head="lm"):
    scale = lora_cfg.scale if lora_cfg is not None else 1.0
    out = _forward(
        params,
        jnp.asarray(IDS, jnp.int32),
        jnp.asarray(MASK, jnp.int32),
        cfg=model_cfg,
        head=head,
        lora=lora,
        lora_scale=scale,
    )
    return np.asarray(out)


def _assert_close(ours, theirs):
    if ours.ndim == 3:  # LM logits: compare real positions only (pads differ in position ids)
        ours, theirs = ours[MASK.astype(bool)], theirs[MASK.astype(bool)]
    err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    assert err <= RTOL, f"relative error {err:.2e} > {RTOL}"


def _random_adapter(params, lora_cfg, model_cfg, seed=0):
    """A jaxrlhf adapter with non-zero B (a fresh one would equal the base)."""
    lora = init_lora(jax.random.key(seed), params, lora_cfg, model_cfg)
    rng = np.random.default_rng(seed)

    def noise(x, std):
        return jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32)

    lora["layers"] = {
        p: {"lora_A": ab["lora_A"], "lora_B": noise(ab["lora_B"], 0.2)}
        for p, ab in lora["layers"].items()
    }
    for head in ("score", "value"):
        if head in lora:
            lora[head] = {k: noise(v, 0.3) for k, v in lora[head].items()}
    return lora


def _not_trivial(a, b):
    assert np.max(np.abs(a - b)) > 100 * RTOL * np.max(np.abs(b)), "the adapter changes nothing"


# ----------------------------------------------------------------------------- CAUSAL_LM


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_saved_adapter_loads(base_dir, base, tmp_path, use_rslora):
    model_cfg, params = base
    torch.manual_seed(2)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(
        _hf_lm(base_dir),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            init_lora_weights=False,
            use_rslora=use_rslora,
            task_type="CAUSAL_LM",
        ),
    ).eval()
    pm.save_pretrained(tmp_path)

    lora, lora_cfg = load_peft(tmp_path, model_cfg)
    assert (lora_cfg.r, lora_cfg.alpha, lora_cfg.use_rslora) == (4, 8.0, use_rslora)
    assert set(lora["layers"]) == set(targets)
    theirs = _torch_out(pm)
    ours = _ours(params, model_cfg, lora, lora_cfg)
    _not_trivial(ours, _ours(params, model_cfg))
    _assert_close(ours, theirs)


@pytest.mark.parametrize(
    "use_rslora,target_modules",
    [
        (False, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        (True, r".*\.(k_proj|gate_proj)"),  # a regex, which PEFT matches the same way
    ],
)
def test_exported_adapter_loads_in_peft(base_dir, base, tmp_path, use_rslora, target_modules):
    model_cfg, params = base
    lora_cfg = LoraConfig(r=4, alpha=16, target_modules=target_modules, use_rslora=use_rslora)
    lora = _random_adapter(params, lora_cfg, model_cfg)
    export_peft(lora, lora_cfg, model_cfg, tmp_path, base_model_name_or_path=base_dir)
    with open(tmp_path / CONFIG_NAME) as f:
        written = json.load(f)
    assert written["peft_type"] == "LORA" and written["base_model_name_or_path"] == base_dir

    pm = peft.PeftModel.from_pretrained(_hf_lm(base_dir), tmp_path).eval()
    assert pm.peft_config["default"].use_rslora == use_rslora
    ours = _ours(params, model_cfg, lora, lora_cfg)
    _not_trivial(ours, _ours(params, model_cfg))
    _assert_close(ours, _torch_out(pm))

    # ... and our own loader reads back exactly what we wrote.
    lora2, cfg2 = load_peft(tmp_path, model_cfg)
    assert cfg2.scale == lora_cfg.scale
    if isinstance(target_modules, str):
        assert cfg2.target_modules == target_modules
    else:
        assert set(cfg2.target_modules) == set(target_modules)
    for p, ab in lora["layers"].items():
        for leaf in ("lora_A", "lora_B"):
            np.testing.assert_array_equal(
                np.asarray(lora2["layers"][p][leaf]), np.asarray(ab[leaf])
            )


def test_merged_export_loads_in_transformers(base, tmp_path):
    model_cfg, params = base
    lora_cfg = LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"))
    lora = _random_adapter(params, lora_cfg, model_cfg, seed=3)
    export_merged(params, lora, lora_cfg, model_cfg, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours = _ours(params, model_cfg, lora, lora_cfg)
    _not_trivial(ours, _ours(params, model_cfg))
    _assert_close(ours, _torch_out(hf))


# ----------------------------------------------------------------------------- SEQ_CLS


def test_peft_seq_cls_adapter_loads(base_dir, base, tmp_path):
    model_cfg, params = base
    torch.manual_seed(3)
    pm = peft.get_peft_model(
        _hf_seq_cls(base_dir),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "gate_proj"],
            init_lora_weights=False,
            task_type="SEQ_CLS",
            modules_to_save=["score"],
        ),
    ).eval()
    with torch.no_grad():  # a trained head, different from the base's
        pm.base_model.model.score.modules_to_save["default"].weight.normal_(0, 0.3)
    pm.save_pretrained(tmp_path)

    lora, lora_cfg = load_peft(tmp_path, model_cfg)
    assert lora_cfg.task_type == "SEQ_CLS" and lora_cfg.modules_to_save == ("score",)
    theirs = _torch_out(pm)[:, 0]
    _assert_close(_ours(params, model_cfg, lora, lora_cfg, head="score"), theirs)


def test_exported_seq_cls_adapter_and_merge(base_dir, base, tmp_path):
    model_cfg, params = base  # a causal LM base: the adapter brings the score head
    lora_cfg = LoraConfig(
        r=4,
        alpha=8,
        target_modules=("q_proj", "v_proj", "up_proj"),
        modules_to_save=("score",),
        task_type="SEQ_CLS",
    )
    lora = _random_adapter(params, lora_cfg, model_cfg, seed=5)
    ours = _ours(params, model_cfg, lora, lora_cfg, head="score")

    export_peft(lora, lora_cfg, model_cfg, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(_hf_seq_cls(base_dir), tmp_path / "adapter").eval()
    _assert_close(ours, _torch_out(pm)[:, 0])

    export_merged(params, lora, lora_cfg, model_cfg, tmp_path / "merged")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == 0
    _assert_close(ours, _torch_out(hf)[:, 0])
    # jaxrlhf's own loader reads the merged reward model back (score head, no lm_head).
    cfg2, merged = load_hf_folder(tmp_path / "merged")
    np.testing.assert_allclose(_ours(merged, cfg2, head="score"), ours, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def exported(base, tmp_path):
    model_cfg, params = base
    lora_cfg = LoraConfig(
        r=2, alpha=4, target_modules=("q_proj", "down_proj"), modules_to_save=("value",)
    )
    lora = _random_adapter(params, lora_cfg, model_cfg)
    export_peft(lora, lora_cfg, model_cfg, tmp_path)
    return tmp_path, lora, lora_cfg


def _rewrite(folder, edit_tensors=None, edit_config=None):
    from safetensors.numpy import load_file, save_file

    if edit_tensors is not None:
        tensors = load_file(folder / WEIGHTS_NAME)
        edit_tensors(tensors)
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    if edit_config is not None:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        edit_config(cfg)
        (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def test_value_head_round_trip(base, exported):
    model_cfg, params = base
    folder, lora, lora_cfg = exported
    lora2, cfg2 = load_peft(folder, model_cfg)
    assert cfg2.modules_to_save == ("value",)
    np.testing.assert_array_equal(
        _ours(params, model_cfg, lora2, cfg2, head="value"),
        _ours(params, model_cfg, lora, lora_cfg, head="value"),
    )


def test_adapter_name_infix_is_accepted(base, exported):
    """A raw `PeftModel.state_dict()` keeps the adapter name: `lora_A.default.weight`."""
    model_cfg, _ = base
    folder, lora, _ = exported

    def add_infix(t):
        for k in list(t):
            new = (
                k.replace(".lora_A.", ".lora_A.default.")
                .replace(".lora_B.", ".lora_B.default.")
                .replace("value.", "value.modules_to_save.default.")
            )
            t[new] = t.pop(k)

    _rewrite(folder, add_infix)
    lora2, _ = load_peft(folder, model_cfg)
    np.testing.assert_array_equal(
        np.asarray(lora2["value"]["kernel"]), np.asarray(lora["value"]["kernel"])
    )


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda t: t.update(
                {"base_model.model.model.embed_tokens.lora_A.weight": np.zeros((2, 3))}
            ),
            "unknown tensor 'base_model.model.model.embed_tokens.lora_A.weight'",
        ),
        (
            lambda t: t.update({f"{Q0}.lora_A.weight": np.zeros((2, 7), np.float32)}),
            f"tensor '{Q0}.lora_A.weight' has shape \\(2, 7\\)",
        ),
        (
            lambda t: t.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"),
            "missing tensor 'base_model.model.model.layers.1.mlp.down_proj.lora_B.weight'",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": np.zeros(
                        (2, 64), np.float32
                    )
                }
            ),
            "block 5",
        ),
        (
            lambda t: t.update({f"{Q0}.lora_A.other.weight": np.zeros((2, 64), np.float32)}),
            "several adapters",
        ),
        (
            lambda t: t.pop("base_model.model.value.weight"),
            "missing tensor 'base_model.model.value.weight'",
        ),
        (
            lambda t: [t.pop(f"base_model.model.value.{leaf}") for leaf in ("weight", "bias")],
            "modules_to_save lists \\['value'\\] but the weights file has no such tensor",
        ),
    ],
)
def test_bad_tensors_are_named(base, exported, edit, match):
    folder, _, _ = exported
    _rewrite(folder, edit)
    with pytest.raises(ValueError, match=match):
        load_peft(folder, base[0])


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(use_dora=True), "DoRA"),
        (lambda c: c.update(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (lambda c: c.update(layers_to_transform=[0]), "layers_to_transform"),
        (lambda c: c.update(init_lora_weights="pissa"), "rewrites the base weights"),
        (lambda c: c.update(peft_type="IA3"), "peft_type='IA3'"),
        (lambda c: c.update(bias="all"), "bias='all'"),
        (lambda c: c.update(target_modules=["q_proj"]), "does not target"),
        (
            lambda c: c.update(target_modules=["q_proj", "down_proj", "k_proj"]),
            "missing tensor '.*k_proj.lora_A.weight'",
        ),
        (lambda c: c.update(modules_to_save=["value", "lm_head"]), "'lm_head'"),
        (lambda c: c.update(r=3), "r=3"),
    ],
)
def test_bad_configs_are_refused(base, exported, edit, match):
    folder, _, _ = exported
    _rewrite(folder, edit_config=edit)
    with pytest.raises(ValueError, match=match):
        load_peft(folder, base[0])


def test_bin_only_adapter_is_refused(base, tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        load_peft(tmp_path, base[0])
    os.remove(tmp_path / CONFIG_NAME)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_peft(tmp_path, base[0])


def test_export_checks_the_tree_against_the_config(base, tmp_path):
    model_cfg, params = base
    cfg = LoraConfig(r=2, alpha=4, target_modules=("q_proj",), modules_to_save=("value",))
    lora = _random_adapter(params, cfg, model_cfg)
    with pytest.raises(ValueError, match=r"q_proj.lora_A has shape \(2, 64, 2\)"):
        export_peft(
            lora,
            LoraConfig(r=4, alpha=4, target_modules=("q_proj",), modules_to_save=("value",)),
            model_cfg,
            tmp_path,
        )
    with pytest.raises(ValueError, match="has projections"):
        export_peft(
            lora,
            LoraConfig(r=2, target_modules=("q_proj", "v_proj"), modules_to_save=("value",)),
            model_cfg,
            tmp_path,
        )
    with pytest.raises(ValueError, match=r"heads \['value'\] .* would be lost"):
        export_peft(lora, LoraConfig(r=2, target_modules=("q_proj",)), model_cfg, tmp_path)
    seq_cfg = LoraConfig(
        r=2, target_modules=("q_proj",), modules_to_save=("score",), task_type="SEQ_CLS"
    )
    seq = _random_adapter(params, seq_cfg, model_cfg)
    with pytest.raises(ValueError, match="pad_token_id"):
        export_merged(params, seq, seq_cfg, model_cfg.replace(pad_token_id=None), tmp_path)
    assert not os.listdir(tmp_path)  # nothing half-written


def test_bfloat16_adapter_round_trip(base, tmp_path):
    model_cfg, params = base
    cfg = LoraConfig(r=2, alpha=4, target_modules=("v_proj",))
    lora = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _random_adapter(params, cfg, model_cfg))
    export_peft(lora, cfg, model_cfg, tmp_path)
    back, _ = load_peft(tmp_path, model_cfg, dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora), strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
