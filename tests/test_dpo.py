"""DPO: sequence log-probs (packed == unshared == a plain log-softmax), the step at init,
precomputed references, full fine-tuning, learning from scratch, exact resume."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tasks import case_preference_rows

from jaxrlhf import config as C
from jaxrlhf import data as D
from jaxrlhf import sharding
from jaxrlhf.algorithms import dpo as A
from jaxrlhf.algorithms.common import init_train_state
from jaxrlhf.lora import split_trainable
from jaxrlhf.models.base import load_base
from jaxrlhf.models.transformer import forward
from jaxrlhf.train import setup as run_setup
from jaxrlhf.train.loop import TrainingInterrupted
from jaxrlhf.train.metrics import read_metrics
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.runs import run_dpo

TINY = Path(__file__).parent.parent / "configs" / "dpo_tiny.yaml"
BUCKET = 64  # one length bucket: one compiled program per step function


def tiny_cfg(run_dir=None, *overrides: str) -> A.DPOConfig:
    base = ["mesh.data=1", f"data.length_buckets=[{BUCKET}]", "run.progress=false"]
    if run_dir is not None:
        base.append(f"run.run_dir={run_dir}")
    return C.load_config(A.DPOConfig, TINY, [*base, *overrides])


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for this module: the runs of one test (e.g. uninterrupted,
    interrupted, resumed) compile the same programs, which on a 2-core host dominates."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.set_cache_dir(str(tmp_path_factory.mktemp("xla_cache")))
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture
def one_device(monkeypatch):
    """Commands build their mesh from the config; tests run the tiny model on one of the
    8 simulated devices (mesh.data=1), which compiles much faster on a 2-core host."""
    monkeypatch.setattr(
        run_setup,
        "make_mesh",
        lambda mesh_cfg: sharding.make_mesh(mesh_cfg, devices=jax.devices()[:1]),
    )


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_cfg()
    model_cfg, base, tokenizer = load_base(cfg.model, seed=0)
    base = jax.tree.map(jnp.asarray, base)
    prefs, _ = D.tokenize_preferences(
        case_preference_rows(24, seed=3), tokenizer, max_length=cfg.data.max_length
    )
    return cfg, model_cfg, base, prefs


def random_adapter(cfg, model_cfg, base, seed=1):
    """A LoRA adapter with non-zero B, so the policy differs from the reference."""
    lora, _ = split_trainable(jax.random.PRNGKey(seed), base, model_cfg, cfg.lora)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 32))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.5 * jax.random.normal(next(keys), x.shape) if "lora_B" in str(p) else x, lora
    )


def batch_of(prefs, idx, *, share_prompt, batch_size=None, ref=None):
    idx = np.asarray(idx)
    return D.pair_batch(
        prefs,
        idx,
        pad_id=0,
        buckets=(BUCKET,),
        batch_size=batch_size or len(idx),
        share_prompt=share_prompt,
        per_pair=None if ref is None else dict(zip(A.REF_KEYS, ref, strict=True)),
    )


def naive_logps(params, lora, scale, model_cfg, prefs, idx):
    """[len(idx), 2] log π(chosen), log π(rejected) from full [T, V] logits and a plain
    log-softmax, each sequence on its own row (right-padded, so padding changes nothing)."""
    rows, starts = [], []
    for i in idx:
        for resp in (prefs.chosen_ids[i], prefs.rejected_ids[i]):
            rows.append(np.concatenate([prefs.prompt_ids[i], resp]))
            starts.append(len(prefs.prompt_ids[i]))
    ids = np.zeros((len(rows), BUCKET), np.int32)
    mask = np.zeros_like(ids)
    for k, r in enumerate(rows):
        ids[k, : len(r)], mask[k, : len(r)] = r, 1
    logits = jax.jit(
        lambda p, lo, x, m: forward(p, x, m, cfg=model_cfg, lora=lo, lora_scale=scale)
    )(params, lora, ids, mask)
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
    tok = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    cols = np.arange(BUCKET - 1)[None]
    response = (cols >= np.array(starts)[:, None] - 1) & (cols < mask.sum(1)[:, None] - 1)
    return (tok * response).sum(1).reshape(len(idx), 2)


# --------------------------------------------------------------------------- log-probs


def test_packed_and_unshared_logps_agree_with_plain_log_softmax(tiny):
    cfg, model_cfg, base, prefs = tiny
    lora = random_adapter(cfg, model_cfg, base)
    # Pairs of different lengths plus 2 dummy rows (batch_size 8 for 6 pairs).
    idx = np.array([0, 5, 9, 13, 17, 21])
    fn = jax.jit(
        lambda params, lora, b: A.sequence_logps(
            params, lora, cfg.lora.scale, b, model_cfg=model_cfg, chunk_size=16
        )
    )
    packed = fn(base, lora, batch_of(prefs, idx, share_prompt=True, batch_size=8))
    unshared = fn(base, lora, batch_of(prefs, idx, share_prompt=False, batch_size=8))
    for p, u in zip(packed, unshared, strict=True):
        np.testing.assert_allclose(np.asarray(p)[:6], np.asarray(u)[:6], rtol=1e-5, atol=1e-4)
    naive = naive_logps(base, lora, cfg.lora.scale, model_cfg, prefs, idx)
    np.testing.assert_allclose(np.asarray(packed[0])[:6], naive[:, 0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(packed[1])[:6], naive[:, 1], rtol=1e-5, atol=1e-4)
    # The adapter matters: with B zeroed (the reference) the numbers differ.
    zero_b = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "lora_B" in str(p) else x, lora
    )
    ref_c, _ = fn(base, zero_b, batch_of(prefs, idx, share_prompt=True, batch_size=8))
    assert np.abs(np.asarray(ref_c)[:6] - np.asarray(packed[0])[:6]).min() > 1e-3


def test_packed_response_window_lists_response_tokens_only():
    """The vocabulary projection sees response tokens only: the packed row's response window
    holds each response token and the slot that predicts it, nothing of the prompt."""
    from jaxrlhf.data.packing import pack_pairs

    prompt, chosen, rejected = [5, 6, 7], [8, 9], [10, 11, 12]
    batch = {
        "chosen_input_ids": np.array([prompt + chosen + [0]]),
        "chosen_attention_mask": np.array([[1] * 5 + [0]]),
        "rejected_input_ids": np.array([prompt + rejected]),
        "rejected_attention_mask": np.array([[1] * 6]),
        "prompt_lengths": np.array([3]),
    }
    packed = pack_pairs(batch, pad_id=0, buckets=(4, 8))
    assert packed["input_ids"][0, :8].tolist() == prompt + chosen + rejected
    assert packed["response_ids"].shape == (1, 8)  # 5 response tokens, bucket 8
    assert packed["response_ids"][0, :5].tolist() == chosen + rejected
    # 8 is predicted by the last prompt token (slot 2), 9 by 8 (slot 3); the rejected
    # response restarts from the prompt: 10 by slot 2, 11 by slot 5 (10), 12 by slot 6.
    assert packed["response_prev"][0, :5].tolist() == [2, 3, 2, 5, 6]
    assert packed["response_chosen"][0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert packed["response_rejected"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]


# --------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def lora_step(tiny):
    cfg, model_cfg, base, _ = tiny
    optimizer = make_optimizer(cfg.optim, 10)
    step = jax.jit(A.make_train_step(cfg, model_cfg=model_cfg, optimizer=optimizer))
    return step, optimizer


def micro(batch):
    return jax.tree.map(lambda x: x[None], batch)


def test_step_zero_loss_is_log2_and_rewards_are_zero(tiny, lora_step):
    cfg, model_cfg, base, prefs = tiny
    step, optimizer = lora_step
    lora, _ = split_trainable(jax.random.PRNGKey(0), base, model_cfg, cfg.lora)
    state = init_train_state(lora, optimizer, jax.random.PRNGKey(1))
    batch = batch_of(prefs, np.arange(8), share_prompt=True)
    # B = 0: the policy IS the reference. A forward pass gives bit-identical log-probs with
    # the adapter on and off, so every implicit reward is exactly 0 ...
    pi_c, pi_r, ref_c, ref_r = jax.jit(A.make_eval_step(cfg, model_cfg=model_cfg))(
        lora, base, batch
    )
    np.testing.assert_array_equal(np.asarray(pi_c), np.asarray(ref_c))
    np.testing.assert_array_equal(np.asarray(pi_r), np.asarray(ref_r))
    # ... and the train step sees the same up to float32 rounding: XLA fuses the log-softmax
    # of the differentiated pass differently (<= 1 ulp per token), so |reward| ~ 1e-8 there.
    new_state, m = step(state, base, micro(batch))
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(m[k])) < 1e-6, (k, float(m[k]))
    np.testing.assert_allclose(float(m["loss"]), math.log(2), rtol=1e-6)
    assert float(m["logps/chosen"]) < 0 and float(m["grad_norm"]) > 0
    # Only the adapter moved (B gets a gradient first; the base is untouched by design).
    b = new_state.trainable["layers"]["q_proj"]["lora_B"]
    assert float(jnp.abs(b).max()) > 0


def test_precomputed_reference_gives_the_same_step(tiny, lora_step):
    cfg, model_cfg, base, prefs = tiny
    step, optimizer = lora_step
    state = init_train_state(random_adapter(cfg, model_cfg, base), optimizer, jax.random.PRNGKey(1))
    ref_fn = jax.jit(A.make_ref_logps_step(cfg, model_cfg=model_cfg))
    ref = [
        np.asarray(x)
        for x in ref_fn(base, batch_of(prefs, np.arange(len(prefs)), share_prompt=True)).values()
    ]
    idx = np.array([3, 7, 11, 2, 19, 23, 0, 15])
    on_the_fly = step(state, base, micro(batch_of(prefs, idx, share_prompt=True)))
    precomputed = step(
        state, base, micro(batch_of(prefs, idx, share_prompt=True, ref=(ref[0], ref[1])))
    )
    for a, b in zip(jax.tree.leaves(on_the_fly), jax.tree.leaves(precomputed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert float(on_the_fly[1]["rewards/margins"]) != 0.0  # the adapter is not the reference


def test_ipo_and_hinge_at_init(tiny):
    cfg, model_cfg, base, prefs = tiny
    lora, _ = split_trainable(jax.random.PRNGKey(0), base, model_cfg, cfg.lora)

    def objectives(trainable, frozen, batch):
        return {
            lt: A.dpo_objective(
                trainable,
                batch,
                frozen,
                None,
                model_cfg=model_cfg,
                lora_cfg=cfg.lora,
                beta=0.1,
                loss_type=lt,
                label_smoothing=0.0,
            )
            for lt in ("ipo", "hinge")
        }

    out = jax.jit(objectives)(lora, base, batch_of(prefs, np.arange(8), share_prompt=False))
    np.testing.assert_allclose(float(out["ipo"][0]), (1 / (2 * 0.1)) ** 2, rtol=1e-6)
    np.testing.assert_allclose(float(out["hinge"][0]), 1.0, rtol=1e-6)
    # "ipo" uses per-token MEAN log-probs (TRL): about log(1/259) for a random model over the
    # byte vocabulary, not a sum over the response.
    assert -7 < float(out["ipo"][1]["logps/chosen"]) < -4
    assert float(out["hinge"][1]["logps/chosen"]) < -20


def test_config_validation():
    with pytest.raises(ValueError, match="loss_type"):
        tiny_cfg(None, "loss_type=kto")
    with pytest.raises(ValueError, match="beta"):
        tiny_cfg(None, "beta=0")
    with pytest.raises(ValueError, match="label_smoothing"):
        tiny_cfg(None, "loss_type=ipo", "label_smoothing=0.1")
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        tiny_cfg(None, "lora.task_type=SEQ_CLS", "lora.modules_to_save=[score]")
    assert tiny_cfg(None, "lora=null").lora is None


def test_shipped_configs_load():
    smol = C.load_config(A.DPOConfig, TINY.parent / "dpo_smollm2.yaml")
    assert smol.model.path == "default" and smol.lora.r == 16 and smol.lora.task_type == "CAUSAL_LM"
    assert (smol.beta, smol.loss_type, smol.share_prompt) == (0.1, "sigmoid", True)
    assert A.DPOConfig().lora.scale == 2.0  # r=16, alpha=32


# --------------------------------------------------------------------------- the command


def test_learns_case_preference_from_scratch(tmp_path, one_device):
    """A random model, LoRA DPO only: held-out implicit-reward accuracy goes 0 -> >= 0.9."""
    cfg = tiny_cfg(tmp_path, "num_epochs=2", "run.eval_every=1000", "run.save_every=1000")
    out = run_dpo(cfg, source=case_preference_rows(240, seed=0))
    before, after = out["eval_before"], out["eval"]
    assert before["rewards/accuracies"] == 0.0 and before["rewards/margins"] == 0.0
    np.testing.assert_allclose(before["loss"], math.log(2), rtol=1e-5)
    assert after["rewards/accuracies"] >= 0.9, after
    assert after["loss"] < before["loss"] - 0.05 and after["rewards/margins"] > 0.1
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    records = read_metrics(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == out["steps"] and "grad_norm" in train[-1]
    evals = [r for r in records if r["split"] == "eval"]
    for k in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "loss",
    ):
        assert k in evals[-1]


def test_full_finetuning_with_reference_copy(tmp_path, one_device):
    """lora: null trains every weight against a frozen reference copy, and exports an HF folder."""
    from jaxrlhf.models.loading import load_hf_folder

    cfg = tiny_cfg(
        tmp_path,
        "lora=null",
        "max_steps=2",
        "batch_size=8",
        "data.eval_fraction=0.0",
        "optim.learning_rate=1e-3",
    )
    out = run_dpo(cfg, source=case_preference_rows(16, seed=1))
    first, second = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    # Step 1: the policy is the reference. Step 2 compares the once-updated policy with the
    # untouched reference copy, so the implicit rewards are no longer zero.
    np.testing.assert_allclose(first["loss"], math.log(2), rtol=1e-5)
    assert abs(first["rewards/margins"]) < 1e-5
    assert abs(second["rewards/chosen"]) > 1e-4 and abs(second["rewards/rejected"]) > 1e-4
    _, exported = load_hf_folder(tmp_path / "model")
    np.testing.assert_allclose(
        np.asarray(exported["embed"]), np.asarray(out["trainable"]["embed"]), rtol=1e-6
    )
    _, base, _ = load_base(cfg.model, seed=cfg.run.seed)
    assert not np.allclose(np.asarray(base["embed"]), np.asarray(out["trainable"]["embed"]))


def _adapter_leaves(out):
    return [np.asarray(x) for x in jax.tree.leaves(out["trainable"])]


def test_exact_resume_after_sigterm(tmp_path, one_device, monkeypatch):
    """SIGTERM mid-run saves a checkpoint and stops; --resume ends at the same adapter
    (bit for bit) as an uninterrupted run, dropout rng included."""
    rows = case_preference_rows(48, seed=2)
    overrides = (
        "data.eval_fraction=0.0",
        "batch_size=8",
        "max_steps=5",
        "lora.dropout=0.1",
        "run.save_every=1000",
    )
    full = run_dpo(tiny_cfg(tmp_path / "full", *overrides), source=rows)

    real_batch_indices = D.batch_indices

    def interrupting(n, *, position, **kw):
        if position == 2 * 8:  # while fetching the 3rd batch: step 3 finishes, then it stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch_indices(n, position=position, **kw)

    cfg = tiny_cfg(tmp_path / "cut", *overrides)
    monkeypatch.setattr(D, "batch_indices", interrupting)
    with pytest.raises(TrainingInterrupted, match="step 3"):
        run_dpo(cfg, source=rows)
    monkeypatch.setattr(D, "batch_indices", real_batch_indices)
    resumed = run_dpo(cfg, resume=True, source=rows)

    for a, b in zip(_adapter_leaves(full), _adapter_leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = [r["step"] for r in read_metrics(tmp_path / "cut") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_learns_on_8_devices_with_precomputed_reference(tmp_path, loss_type):
    """The whole command on the 8-device data mesh, unshared rows, reference precomputed:
    held-out accuracy reaches >= 0.95 for every loss."""
    cfg = C.load_config(
        A.DPOConfig,
        TINY,
        [
            f"run.run_dir={tmp_path}",
            "run.progress=false",
            "num_epochs=3",
            "precompute_ref_logps=true",
            "share_prompt=false",
            f"loss_type={loss_type}",
        ],
    )
    out = run_dpo(cfg, source=case_preference_rows(400, seed=0))
    assert out["eval"]["rewards/accuracies"] >= 0.95, out["eval"]
    assert out["eval"]["loss"] < out["eval_before"]["loss"]
