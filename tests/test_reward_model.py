"""The reward model end to end: score read-out, prefix sharing, learning, accumulation,
exact resume, bad rows, the PEFT export and the metrics files.

Every `run_rm` call jits its train/eval steps afresh, so the runs here share one shape
(`SMALL`: one device, one length bucket, batch 8) and a persistent compilation cache
(`compile_cache`) compiles each distinct program once per session.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tasks import case_preference_rows

from jaxrlhf import cli
from jaxrlhf import data as D
from jaxrlhf.algorithms import reward_model as R
from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.config import load_config
from jaxrlhf.lora import init_lora
from jaxrlhf.models.base import load_base
from jaxrlhf.models.transformer import (
    backbone,
    forward,
    init_head,
    last_token_index,
    score_head,
)
from jaxrlhf.train.loop import TrainingInterrupted
from jaxrlhf.train.metrics import read_metrics
from jaxrlhf.train.runs import run_rm

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rm_tiny.yaml"
# One device, one bucket (packed pairs of these rows are <= 47 tokens, so packing never
# leaves the bucket), batch 8: every run below compiles the same train step.
SMALL = (
    "mesh.data=1",
    "data.max_length=48",
    "data.length_buckets=[48]",
    "batch_size=8",
    "eval_batch_size=32",
    "run.progress=false",
    "run.tensorboard=false",
)
ROWS = case_preference_rows(400)  # case_preference_rows(n) is a prefix of this list


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for this module (restored afterwards): the runs below jit the
    same programs again and again, which the in-memory jit cache does not see."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(
        "jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "xla_cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@functools.cache
def tiny_base():
    """(model_cfg, params on device, tokenizer) of the tiny random base of `rm_tiny.yaml`,
    as `run_rm` builds it with seed 0."""
    model_cfg, params, tokenizer = load_base(rm_config("unused").model, seed=0)
    return model_cfg, jax.tree.map(jnp.asarray, params), tokenizer


def rm_config(run_dir, *overrides: str) -> RMConfig:
    return load_config(RMConfig, CONFIG, [f"run.run_dir={run_dir}", *SMALL, *overrides])


def run(cfg: RMConfig, rows, **kw) -> dict:
    return run_rm(cfg, source=datasets.Dataset.from_list(rows), **kw)


def compiled(fn, *args):
    """`jax.jit(fn)` compiled for `args` at XLA's lowest backend optimisation level: these
    programs run a handful of times, so compiling faster matters more than running faster."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_close(actual, expected, *, rtol: float, atol: float = 0.0):
    actual, expected = host(actual), host(expected)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), e in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def leaf_at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def random_adapter(key, params, lora_cfg, model_cfg):
    """A trained-looking adapter: non-zero B and a random score head (a fresh adapter is
    the base exactly, which would hide mistakes in the LoRA path)."""
    lora = init_lora(key, params, lora_cfg, model_cfg)
    keys = iter(jax.random.split(jax.random.fold_in(key, 1), 16))
    lora["layers"] = {
        p: {
            "lora_A": ab["lora_A"],
            "lora_B": 0.1 * jax.random.normal(next(keys), ab["lora_B"].shape),
        }
        for p, ab in lora["layers"].items()
    }
    lora["score"] = {"kernel": jax.random.normal(next(keys), lora["score"]["kernel"].shape)}
    return lora


# Two pairs of the upper-case task, (chosen, rejected) each, of different lengths.
TEXTS = ["say: abc DEF GH", "say: abc def gh", "say: q ZZ", "say: q zz"]


def text_batch(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """TEXTS as training sees a pair's sequence (BOS ... EOS), right-padded with id 0."""
    seqs = [
        [
            tokenizer.bos_token_id,
            *tokenizer(t, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
        for t in TEXTS
    ]
    width = max(map(len, seqs))
    ids = np.array([s + [0] * (width - len(s)) for s in seqs], np.int32)
    return ids, (ids != 0).astype(np.int32)


def jaxrlhf_scores(params, lora, lora_scale, model_cfg, ids, mask) -> np.ndarray:
    def score(params, lora):
        return forward(
            params,
            jnp.asarray(ids),
            jnp.asarray(mask),
            cfg=model_cfg,
            head="score",
            lora=lora,
            lora_scale=lora_scale,
        )

    return np.asarray(compiled(score, params, lora)(params, lora))


def torch_scores(model, ids, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        return (
            model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
            .logits[:, 0]
            .numpy()
        )


# ----------------------------------------------------------------------------- score read-out


def test_last_token_index_left_and_right_padding():
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(last_token_index(mask), [2, 4, 4, 1])


def test_score_is_read_at_the_last_real_token():
    cfg, params, _ = tiny_base()
    params = {**params, "score": init_head(jax.random.PRNGKey(1), cfg, "score")}
    lengths, t = np.array([7, 4, 10]), 10
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (3, t)).astype(np.int32)
    col = np.arange(t)[None]
    right_mask = (col < lengths[:, None]).astype(np.int32)
    left_mask = (col >= t - lengths[:, None]).astype(np.int32)
    right_ids = np.where(right_mask, tokens, 0)
    # The same real tokens, moved to the end of the row.
    left_ids = np.stack([np.roll(r, t - n) for r, n in zip(right_ids, lengths, strict=True)])

    def scores_and_hidden(params, ids, mask):
        hidden, _ = backbone(params, ids, mask, cfg=cfg)
        return score_head(params, hidden, mask), hidden

    scores_and_hidden = compiled(scores_and_hidden, params, right_ids, right_mask)

    kernel = np.asarray(params["score"]["kernel"])[:, 0]
    by_side = {}
    for side, ids, mask, last in (
        ("right", right_ids, right_mask, lengths - 1),
        ("left", left_ids, left_mask, np.full(3, t - 1)),
    ):
        scores, hidden = map(np.asarray, scores_and_hidden(params, ids, mask))
        by_hand = np.einsum("bd,d->b", hidden[np.arange(3), last], kernel)
        np.testing.assert_allclose(scores, by_hand, rtol=1e-6, atol=1e-7, err_msg=side)
        if side == "right":  # rows 0 and 1 end in pads, whose hidden states differ
            assert not np.allclose(scores[:2], np.einsum("bd,d->b", hidden[:2, -1], kernel))
        by_side[side] = scores
    # Left padding shifts no positions: the same sequence scores the same either way.
    np.testing.assert_allclose(by_side["left"], by_side["right"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- prefix sharing


def test_packed_pairs_equal_unshared_rewards_losses_and_grads():
    cfg = rm_config("unused")
    model_cfg, base, tokenizer = tiny_base()
    rows = [{**r, "margin": 0.5 * (i % 3)} for i, r in enumerate(ROWS[:12])]
    prefs, _ = D.tokenize_preferences(rows, tokenizer, max_length=48)
    lora = random_adapter(jax.random.PRNGKey(3), base, cfg.lora, model_cfg)
    # 6 real pairs in a batch of 8: the two dummy rows must stay out of the loss.
    batches = {
        share: D.pair_batch(
            prefs, np.arange(6), pad_id=0, buckets=(48,), batch_size=8, share_prompt=share
        )
        for share in (True, False)
    }
    assert "packed_input_ids" in batches[True] and "chosen_input_ids" in batches[False]

    def rewards_loss_grads(trainable, batch):
        rewards = R.pair_rewards(trainable, base, batch, model_cfg=model_cfg, lora_cfg=cfg.lora)
        (loss, metrics), grads = jax.value_and_grad(R.reward_loss, has_aux=True)(
            trainable,
            batch,
            base,
            None,
            model_cfg=model_cfg,
            lora_cfg=cfg.lora,
            center_rewards_coefficient=0.01,
        )
        return rewards, loss, metrics, grads

    packed, unshared = (
        compiled(rewards_loss_grads, lora, batches[share])(lora, batches[share])
        for share in (True, False)
    )
    for p, u in zip(packed[0], unshared[0], strict=True):  # r_chosen, r_rejected
        assert np.std(np.asarray(u)[:6]) > 0.1  # the adapter makes the rewards differ
        np.testing.assert_allclose(p, u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[1], unshared[1], rtol=1e-5)
    assert_trees_close(packed[2], unshared[2], rtol=1e-5, atol=1e-6)
    for path, g_packed in jax.tree_util.tree_flatten_with_path(packed[3])[0]:
        g_unshared = leaf_at(unshared[3], path)
        err = relative_error(g_packed, g_unshared)
        assert err <= 1e-5, f"grad {jax.tree_util.keystr(path)}: relative error {err:.2e}"


def test_packed_lengths_come_from_a_fixed_set():
    _, _, tokenizer = tiny_base()
    rows = [{"prompt": "p" * 10, "chosen": "c" * n, "rejected": "r" * n} for n in range(30, 50)]
    prefs, _ = D.tokenize_preferences(rows, tokenizer, max_length=64)
    buckets = D.default_buckets(64)
    lengths = {
        D.pair_batch(
            prefs, np.array([i]), pad_id=0, buckets=buckets, batch_size=1, share_prompt=True
        )["packed_input_ids"].shape[1]
        for i in range(len(rows))
    }
    assert len(lengths) <= 2, sorted(lengths)


# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One LoRA run on the upper-case task, shared by the learning, metrics, plot and
    export tests."""
    run_dir = tmp_path_factory.mktemp("rm_lora")
    cfg = rm_config(run_dir, "max_steps=40", "run.eval_every=20", "run.save_every=20")
    return cfg, run(cfg, ROWS)


def test_lora_reward_model_learns(trained):
    cfg, out = trained
    assert out["steps"] == 40
    assert out["eval_before"]["accuracy"] < 0.7
    assert out["eval"]["accuracy"] >= 0.9
    assert out["eval"]["loss"] < out["eval_before"]["loss"]
    # LoRA trains the adapter and its score head only.
    assert set(out["trainable"]) == {"layers", "score"}
    assert set(out["trainable"]["layers"]) == set(cfg.lora.target_modules)


@pytest.fixture(scope="module")
def full_finetuned(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rm_full")
    cfg = rm_config(
        run_dir,
        "lora=null",
        "max_steps=30",
        "optim.learning_rate=1.0e-3",
        "run.eval_every=100",
        "run.save_every=100",
    )
    return cfg, run(cfg, ROWS)


def test_full_finetuning_learns(full_finetuned):
    cfg, out = full_finetuned
    assert out["eval_before"]["accuracy"] < 0.7
    assert out["eval"]["accuracy"] >= 0.9
    assert "embed" in out["trainable"] and "score" in out["trainable"]

    # The exported model scores alike in transformers.
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        Path(cfg.run.run_dir) / "model", num_labels=1
    ).eval()
    model_cfg, _, tokenizer = tiny_base()
    ids, mask = text_batch(tokenizer)
    theirs = torch_scores(model, ids, mask)
    ours = jaxrlhf_scores(out["trainable"], None, 1.0, model_cfg, ids, mask)
    assert relative_error(ours, theirs) <= 1e-4
    assert theirs[0] > theirs[1] and theirs[2] > theirs[3]


def test_full_finetuning_exports_a_sequence_classifier(full_finetuned):
    cfg, _ = full_finetuned
    hf_config = json.loads((Path(cfg.run.run_dir) / "model" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert len(hf_config.get("id2label", {})) == 1


# ----------------------------------------------------------------------------- accumulation


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    rows = ROWS[:16]
    common = ("max_steps=1", "data.eval_fraction=0", "run.save_every=100")
    one = run(rm_config(tmp_path / "accum1", *common), rows)["trainable"]
    two = run(rm_config(tmp_path / "accum2", *common, "optim.grad_accum_steps=2"), rows)[
        "trainable"
    ]
    # B starts at zero: a non-zero B shows the step happened.
    assert np.abs(np.asarray(one["layers"]["q_proj"]["lora_B"])).max() > 0
    assert_trees_close(two, one, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- resume

RESUME_ROWS = ROWS[:40]  # 5 batches per epoch: the resumed steps cross an epoch boundary
RESUME = ("max_steps=7", "data.eval_fraction=0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cfg = rm_config(tmp_path_factory.mktemp("rm_ref"), *RESUME, "run.save_every=100")
    return host(run(cfg, RESUME_ROWS)["trainable"])


def _at_position(monkeypatch, position: int, action) -> None:
    """Call `action()` when the run fetches the batch at data position `position`."""
    real = D.batch_indices

    def batch_indices(*args, **kwargs):
        if kwargs["position"] == position:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "batch_indices", batch_indices)


def _checkpoint_steps(run_dir) -> list[int]:
    return sorted(
        int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit()
    )


def test_sigterm_saves_and_resume_is_exact(tmp_path, monkeypatch, capsys, uninterrupted):
    cfg = rm_config(tmp_path, *RESUME, "run.save_every=100")
    with monkeypatch.context() as m:
        # SIGTERM while fetching step 3's batch: step 3 finishes, is saved, the run stops.
        _at_position(m, 2 * cfg.batch_size, lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(TrainingInterrupted, match="step 3"):
            run(cfg, RESUME_ROWS)
    assert _checkpoint_steps(tmp_path) == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed

    out = run(cfg, RESUME_ROWS, resume=True)
    assert "resumed from step 3 (data position 24)" in capsys.readouterr().out
    # Bitwise: the same programs see the same state, batches and rng after the restore.
    assert_trees_close(out["trainable"], uninterrupted, rtol=0, atol=0)


def test_crash_then_resume_from_last_periodic_checkpoint(
    tmp_path, monkeypatch, capsys, uninterrupted
):
    cfg = rm_config(tmp_path, *RESUME, "run.save_every=2")

    def crash():
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        _at_position(m, 5 * cfg.batch_size, crash)  # while fetching step 6's batch
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(cfg, RESUME_ROWS)
    assert _checkpoint_steps(tmp_path) == [2, 4]

    out = run(cfg, RESUME_ROWS, resume=True)
    assert "resumed from step 4 (data position 32)" in capsys.readouterr().out
    # Bitwise: the same programs see the same state, batches and rng after the restore.
    assert_trees_close(out["trainable"], uninterrupted, rtol=0, atol=0)
    train_steps = [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert train_steps[-3:] == [5, 6, 7]


# ----------------------------------------------------------------------------- bad rows


def test_bad_row_is_named_or_skipped(tmp_path, capsys):
    rows = [dict(r) for r in ROWS[:41]]
    rows[5]["chosen"] = ""
    cfg = rm_config(tmp_path, "max_steps=2", "data.eval_fraction=0", "run.save_every=100")
    with pytest.raises(ValueError, match=r"row 6: field 'chosen' is empty"):
        run(cfg, rows)
    out = run(
        rm_config(
            tmp_path,
            "max_steps=2",
            "data.eval_fraction=0",
            "run.save_every=100",
            "data.skip_bad_rows=true",
        ),
        rows,
    )
    assert out["steps"] == 2
    assert "skipped 1 bad rows of 41" in capsys.readouterr().out


# ----------------------------------------------------------------------------- outputs


def test_exported_adapter_scores_the_same_in_peft(trained, tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from jaxrlhf.models.loading import save_hf_folder

    cfg, out = trained
    adapter_dir = Path(cfg.run.run_dir) / "adapter"
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]

    model_cfg, base, tokenizer = load_base(cfg.model, seed=cfg.run.seed)
    save_hf_folder(base, model_cfg, tmp_path / "base")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", num_labels=1
    )
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()

    ids, mask = text_batch(tokenizer)
    theirs = torch_scores(model, ids, mask)
    ours = jaxrlhf_scores(base, out["trainable"], cfg.lora.scale, model_cfg, ids, mask)
    assert relative_error(ours, theirs) <= 1e-4
    # The trained reward model prefers the upper-case response in both pairs.
    assert theirs[0] > theirs[1] and theirs[2] > theirs[3]


def test_metrics_and_plots(trained):
    cfg, _ = trained
    run_dir = Path(cfg.run.run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 41))
    assert [r["step"] for r in evals] == [0, 20, 40]
    for key in ("loss", "accuracy", "grad_norm", "rewards/margin", "rewards/chosen_mean"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert {"loss", "accuracy", "rewards/margin"} <= set(evals[-1])
    assert _checkpoint_steps(run_dir) == [20, 40]
    assert (run_dir / "config.yaml").is_file()
    assert load_config(RMConfig, run_dir / "config.yaml") == cfg

    assert cli.main(["plot", str(run_dir)]) == 0
    for split in ("train", "eval"):
        png = run_dir / "plots" / f"{split}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
