"""The algorithms on the shared drivers beyond DPO/GRPO: KTO, ORPO, CPO/SimPO (pair driver) and
RLOO, REINFORCE++ (online driver); plus GRPO's TRL options. Each learns a tiny task from
scratch (held-out metric), resumes exactly after SIGTERM, and refuses bad options by name."""

from __future__ import annotations

import functools
import json
import os
import random
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tasks import case_preference_rows
from test_grpo import setup  # noqa: F401  (the fixture: a tiny model and one real rollout)

from jaxrlhf import config as C
from jaxrlhf import data as D
from jaxrlhf import sharding
from jaxrlhf.algorithms import grpo, reinforce_pp, rloo
from jaxrlhf.data.unpaired import kto_rows
from jaxrlhf.train import setup as run_setup
from jaxrlhf.train.loop import TrainingInterrupted
from jaxrlhf.train.runs import ALGORITHMS, run_algorithm
from jaxrlhf.train.scoring import Scorer

PREFERENCE = {
    "orpo": [],
    "cpo": [],
    "simpo": ["loss_type=simpo", "cpo_alpha=0.0", "beta=2.0", "simpo_gamma=1.0"],
    "kto": [],
}
ONLINE = ("rloo", "reinforce_pp")


def _command(case: str) -> str:
    return "cpo" if case == "simpo" else case


def _cfg(name: str, run_dir, *overrides: str):
    base = [f"run.run_dir={run_dir}", "mesh.data=1", "run.progress=false"]
    if name not in ONLINE:
        base.append("data.length_buckets=[64]")
    return C.load_config(ALGORITHMS[name].config, f"configs/{name}_tiny.yaml", [*base, *overrides])


@pytest.fixture
def one_device(monkeypatch):
    monkeypatch.setattr(
        run_setup,
        "make_mesh",
        lambda mesh_cfg: sharding.make_mesh(mesh_cfg, devices=jax.devices()[:1]),
    )


def _prompt_rows(n=64, seed=0):
    """Upper-case prompts; the reward (share of lower-case letters) must be learned."""
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choices("BCDEFGH", k=rng.randint(3, 8)))} for _ in range(n)]


def _train_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


# --------------------------------------------------------------------------- data and options


def _kto_data(rows, *, block, max_length=64, max_prompt_length=None):
    """`kto_rows` tokenized by the byte tokenizer, with their KL completions."""
    from jaxrlhf.models.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    data, _ = D.tokenize_preferences(
        kto_rows(rows), tok, max_length=max_length, max_prompt_length=max_prompt_length
    )
    return D.with_kl_completions(data, block=block, max_length=max_length), tok


def _which_row(completions, candidates):
    """For each completion (token ids), the index of the candidate row it equals."""
    keys = [tuple(np.asarray(c).tolist()) for c in candidates]
    assert len(set(keys)) == len(keys), "completions must be distinct"
    return [keys.index(tuple(np.asarray(c).tolist())) for c in completions]


def test_kto_kl_completions_rotate_within_blocks():
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(5)]
    data, _ = _kto_data(rows, block=2)
    # Blocks [0, 1], [2, 3], [4]: row i takes the completion of the previous row of its block
    # (TRL's rotation), a one-row block takes its own.
    assert _which_row(data.rejected_ids, data.chosen_ids) == [1, 0, 3, 2, 4]
    np.testing.assert_array_equal(data.margin, [1.0, 0.0, 1.0, 0.0, 1.0])
    paired = kto_rows([{"prompt": "x", "chosen": "A", "rejected": "a"}] * 2)
    # unpaired as TRL: chosen rows (label True) then rejected rows (False)
    assert [(p["chosen"], p["margin"]) for p in paired] == [
        ("A", 1.0),
        ("A", 1.0),
        ("a", 0.0),
        ("a", 0.0),
    ]
    # A KL completion is cut to fit after its own prompt: prompt "p" * 40 (40 byte tokens,
    # no BOS) leaves 64 − 40 = 24 tokens for the 30 + EOS of the other row's completion.
    long = [
        {"prompt": "p" * 40, "completion": "a", "label": True},
        {"prompt": "q", "completion": "b" * 30, "label": False},
    ]
    data, _ = _kto_data(long, block=2, max_prompt_length=48)
    assert len(data.prompt_ids[0]) == 40 and len(data.rejected_ids[0]) == 24
    np.testing.assert_array_equal(data.rejected_ids[0], data.chosen_ids[1][:24])


def test_kto_kl_pairing_is_trls_on_the_same_rows(tmp_path):
    """TRL 1.16's own dataset preparation (`KTOTrainer._prepare_dataset`, called unbound
    with what it reads of the trainer) on 11 rows with per_device_train_batch_size 4: its
    `KL_completion_ids` pair each row with the same row's completion as ours with block 4
    (blocks [0-3], [4-7], [8-10], each rotated by one), and TRL's sequential batches are
    exactly our blocks."""
    from types import SimpleNamespace

    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.kto_trainer import KTOTrainer

    rows = [
        {"prompt": f"question {i}: ", "completion": f"answer {i * 7}", "label": i % 3 != 0}
        for i in range(11)
    ]
    ours, tok = _kto_data(rows, block=4, max_length=64)
    args = trl.KTOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_length=64,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    trainer = SimpleNamespace(
        _tokenizer=tok, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0
    )
    theirs = KTOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tok, args, "train")
    trl_kl = _which_row(theirs["KL_completion_ids"], theirs["completion_ids"])
    our_kl = _which_row(ours.rejected_ids, ours.chosen_ids)
    assert our_kl == trl_kl == [3, 0, 1, 2, 7, 4, 5, 6, 10, 8, 9]
    # The same completions on both sides (TRL appends the EOS text, we the EOS id).
    for mine, trls in zip(ours.chosen_ids, theirs["completion_ids"], strict=True):
        assert tok.decode(mine) == tok.decode(trls)
    # TRL requires the sequential sampler: batch k is rows 4k .. 4k + 3, one KL block. Ours
    # visits whole blocks (in a seeded order), so every batch is one of those blocks.
    batches = {
        tuple(D.block_batch_indices(11, batch_size=4, seed=0, position=4 * k)[0]) for k in range(2)
    }
    assert batches == {(0, 1, 2, 3), (4, 5, 6, 7)}


def test_kto_micro_batches_hold_their_own_kl_completions(tmp_path, one_device, monkeypatch):
    """In a real run (two micro-batches of 4 per step, a held-out eval split), every micro-
    batch the step receives is one KL block: row r's KL completion is row r − 1's completion
    (cyclically) of the same micro-batch."""
    from jaxrlhf.train import preference

    seen, real = [], preference.micro_batches

    def recording(batch, n, **kw):
        out = real(batch, n, **kw)
        seen.append(jax.tree.map(np.asarray, out))
        return out

    monkeypatch.setattr(preference, "micro_batches", recording)
    cfg = _cfg(
        "kto",
        tmp_path,
        "batch_size=8",
        "optim.grad_accum_steps=2",
        "share_prompt=false",
        "max_steps=3",
        "data.eval_fraction=0.25",
    )
    run_algorithm("kto", cfg, source=case_preference_rows(24, seed=3))
    assert len(seen) == 3

    def completions(mb, m, side):
        ids, resp = mb[f"{side}_input_ids"][m], mb[f"{side}_response_mask"][m]
        return [tuple(row[r == 1].tolist()) for row, r in zip(ids, resp, strict=True)]

    for mb in seen:
        for m in range(2):
            chosen, rejected = completions(mb, m, "chosen"), completions(mb, m, "rejected")
            assert len(set(chosen)) > 1  # not vacuous
            assert rejected == chosen[-1:] + chosen[:-1]


def test_kto_rows_without_a_label_are_refused():
    with pytest.raises(ValueError, match="label"):
        kto_rows([{"prompt": "x", "completion": "y"}] * 2)
    with pytest.raises(ValueError, match="row 2: field 'label'"):  # rows count from 1
        kto_rows(
            [
                {"prompt": "x", "completion": "y", "label": True},
                {"prompt": "x", "completion": "y", "label": "yes"},
            ]
        )


def test_bad_option_combinations_name_the_option():
    rf = ["reward_funcs=[{fn: contains, kwargs: {text: a}}]"]
    cases = [
        (
            grpo.GRPOConfig,
            ["importance_sampling_level=sequence", "loss_type=dapo"],
            "importance_sampling_level",
        ),
        (
            grpo.GRPOConfig,
            ["importance_sampling_level=sequence", "loss_type=cispo"],
            "importance_sampling_level",
        ),
        (grpo.GRPOConfig, ["delta=2.0", "loss_type=sapo"], "delta"),
        (grpo.GRPOConfig, ["delta=0.5"], "delta must be > 1"),
        (grpo.GRPOConfig, ["scale_rewards=prompt"], "scale_rewards"),
        (grpo.GRPOConfig, ["overlong_buffer=1000"], "overlong_buffer"),
        (rloo.RLOOConfig, ["num_generations=1"], "num_generations"),
        (rloo.RLOOConfig, ["reward_clip_range=[1.0, -1.0]"], "reward_clip_range"),
        (
            reinforce_pp.ReinforcePPConfig,
            ["advantage_estimator=reinforce_baseline", "num_generations=1"],
            "reinforce_baseline",
        ),
        (
            reinforce_pp.ReinforcePPConfig,
            ["advantage_estimator=reinforce_baseline", "num_generations=2", "gamma=0.9"],
            "gamma",
        ),
    ]
    for cls, overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            C.load_config(cls, None, rf + overrides)
    pref = [
        ("cpo", ["loss_type=hinge", "label_smoothing=0.1"], "label_smoothing"),
        ("cpo", ["loss_type=kto"], "loss_type"),
        ("kto", ["loss_type=sigmoid"], "loss_type"),
        ("kto", ["desirable_weight=0"], "desirable_weight"),
        ("kto", ["batch_size=1"], "batch_size / optim.grad_accum_steps must be >= 2"),
        (
            "kto",
            ["batch_size=4", "optim.grad_accum_steps=4"],
            "batch_size / optim.grad_accum_steps must be >= 2",
        ),
        ("orpo", ["lora.modules_to_save=[score]"], "modules_to_save"),
    ]
    for name, overrides, message in pref:
        with pytest.raises(ValueError, match=message):
            _cfg(name, "/tmp/unused", *overrides)
    # GRPO keeps its defaults; the new options accept TRL's spellings.
    cfg = C.load_config(grpo.GRPOConfig, None, rf)
    assert (cfg.loss_type, cfg.scale_rewards, cfg.importance_sampling_level, cfg.delta) == (
        "dapo",
        True,
        "token",
        None,
    )
    assert (
        C.load_config(grpo.GRPOConfig, None, [*rf, "scale_rewards=batch"]).scale_rewards == "batch"
    )
    assert C.load_config(rloo.RLOOConfig, None, rf).num_generations == 2  # TRL's default


def test_shipped_configs_load():
    for name in ("orpo", "cpo", "kto", "rloo", "reinforce_pp"):
        for kind in ("tiny", "smollm2"):
            cfg = C.load_config(ALGORITHMS[name].config, f"configs/{name}_{kind}.yaml")
            assert cfg.lora is not None and cfg.lora.task_type == "CAUSAL_LM"


# --------------------------------------------------------------------------- preference driver


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PREFERENCE))
def test_preference_algorithms_learn_case_preference(tmp_path, one_device, case):
    """From a random model: the held-out accuracy of the implied reward (the eval split,
    never trained on) rises well above its value at the start."""
    name = _command(case)
    cfg = _cfg(name, tmp_path, *PREFERENCE[case], "num_epochs=3", "run.eval_every=1000")
    out = run_algorithm(name, cfg, source=case_preference_rows(240, seed=0))
    before, after = out["eval_before"], out["eval"]
    assert after["rewards/accuracies"] >= 0.9, (before, after)
    assert after["rewards/accuracies"] > before["rewards/accuracies"] + 0.1, (before, after)
    assert after["rewards/margins"] > before["rewards/margins"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("case", ["kto", "orpo", "simpo"])
def test_preference_resume_after_sigterm_is_exact(tmp_path, one_device, monkeypatch, case):
    name = _command(case)
    rows = case_preference_rows(24, seed=2)
    overrides = (*PREFERENCE[case], "data.eval_fraction=0.0", "batch_size=8", "max_steps=4")
    overrides = (*overrides, "run.save_every=1000")
    full = run_algorithm(name, _cfg(name, tmp_path / "full", *overrides), source=rows)

    order = "block_batch_indices" if name == "kto" else "batch_indices"  # KTO: whole KL blocks
    real = getattr(D, order)

    def interrupting(n, *, position, **kw):
        if position == 2 * 8:  # fetching the 3rd batch: step 3 finishes, then it stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real(n, position=position, **kw)

    cfg = _cfg(name, tmp_path / "cut", *overrides)
    monkeypatch.setattr(D, order, interrupting)
    with pytest.raises(TrainingInterrupted, match="step 3"):
        run_algorithm(name, cfg, source=rows)
    monkeypatch.setattr(D, order, real)
    resumed = run_algorithm(name, cfg, resume=True, source=rows)
    for a, b in zip(_leaves(full["trainable"]), _leaves(resumed["trainable"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in _train_records(tmp_path / "cut")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- online driver


@pytest.mark.slow
@pytest.mark.parametrize("name", ONLINE)
def test_online_algorithms_raise_the_held_out_score(tmp_path, name):
    """The reward on held-out prompts (sampled at evaluation, never trained on) rises."""
    cfg = _cfg(name, tmp_path, "data.eval_size=16", "eval_prompts_batch=16")
    out = run_algorithm(name, cfg, source=_prompt_rows(256))
    before, after = out["eval_before"]["score"], out["eval"]["score"]
    assert after > before + 0.3, (before, after)
    train = _train_records(tmp_path)
    assert np.mean([r["reward"] for r in train[-3:]]) > np.mean([r["reward"] for r in train[:3]])
    for key in ("reward", "kl", "loss", "grad_norm", "completions/mean_length", "entropy"):
        assert np.isfinite(train[-1][key]), key
    assert os.path.isfile(os.path.join(out["export"], "adapter_config.json"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ONLINE)
def test_online_resume_after_sigterm_is_exact(tmp_path, monkeypatch, name):
    """μ = 2 and two mini-batches (old log-probs, the KL pass): interrupted in iteration 2,
    resumed, the adapter, optimizer state and rng equal an uninterrupted run's."""
    common = ["max_steps=3", "run.save_every=1000", "prompts_per_iteration=2", "num_iterations=2"]
    common += ["mini_batch_size=4"]
    rows = _prompt_rows()
    full = run_algorithm(name, _cfg(name, tmp_path / "a", *common), source=rows)

    real, calls = Scorer.__call__, {"n": 0}

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "__call__", interrupting)
    with pytest.raises(TrainingInterrupted):
        run_algorithm(name, _cfg(name, tmp_path / "b", *common), source=rows)
    monkeypatch.setattr(Scorer, "__call__", real)
    resumed = run_algorithm(name, _cfg(name, tmp_path / "b", *common), source=rows, resume=True)
    a, b = full["state"].train, resumed["state"].train
    assert int(a.step) == int(b.step) == 3 * 2 * 2
    for x, y in zip(
        _leaves((a.trainable, a.opt_state, a.rng)),
        _leaves((b.trainable, b.opt_state, b.rng)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- the steps


@pytest.fixture(scope="module")
def pair_setup():
    """The tiny model, a random adapter (policy ≠ base) and 6 tokenized case pairs."""
    from test_dpo import random_adapter

    from jaxrlhf.models.base import load_base

    cfg = _cfg("orpo", "/tmp/unused")
    model_cfg, base, tok = load_base(cfg.model, seed=0)
    base = jax.tree.map(jnp.asarray, base)
    prefs, _ = D.tokenize_preferences(case_preference_rows(6, seed=3), tok, max_length=64)
    return cfg, model_cfg, base, random_adapter(cfg, model_cfg, base), prefs


def _naive_chosen_tokens(params, lora, scale, model_cfg, prefs):
    """Per pair: Σ log p and counts over the chosen prompt tokens (after the first) and the
    chosen completion tokens, from full logits and a plain log-softmax, one row per pair."""
    from jaxrlhf.models.transformer import forward

    out = []
    for i in range(len(prefs)):
        p, c = prefs.prompt_ids[i], prefs.chosen_ids[i]
        ids = np.concatenate([p, c])[None].astype(np.int32)
        logits = forward(params, ids, np.ones_like(ids), cfg=model_cfg, lora=lora, lora_scale=scale)
        lp = np.take_along_axis(
            np.asarray(jax.nn.log_softmax(logits[0, :-1], -1)), ids[0, 1:, None], -1
        )[:, 0]
        n_p = len(p)
        out.append((lp[: n_p - 1].sum(), n_p - 1, lp[n_p - 1 :].sum(), len(c)))
    return np.array(out, np.float64)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_orpo_and_cpo_nll_terms_match_a_plain_log_softmax(pair_setup, share_prompt):
    """ORPO's NLL covers the chosen prompt and completion, CPO's the completion only (as TRL
    builds their labels); packed and unshared batches give the naive numbers."""
    from jaxrlhf.algorithms import cpo, orpo

    cfg, model_cfg, base, lora, prefs = pair_setup
    batch = D.pair_batch(
        prefs,
        np.arange(len(prefs)),
        pad_id=0,
        buckets=(64,),
        batch_size=8,  # two padding pairs, which must count nowhere
        share_prompt=share_prompt,
    )
    naive = _naive_chosen_tokens(base, lora, cfg.lora.scale, model_cfg, prefs)
    o = jax.jit(functools.partial(orpo.orpo_outputs, cfg=cfg, model_cfg=model_cfg))(
        lora, base, batch
    )
    np.testing.assert_allclose(np.asarray(o[2])[:6], -(naive[:, 0] + naive[:, 2]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(o[3]), [*(naive[:, 1] + naive[:, 3]), 0, 0])
    np.testing.assert_allclose(np.asarray(o[0])[:6], naive[:, 2] / naive[:, 3], rtol=1e-5)
    c_cfg = _cfg("cpo", "/tmp/unused")
    c = jax.jit(functools.partial(cpo.cpo_outputs, cfg=c_cfg, model_cfg=model_cfg))(
        lora, base, batch
    )
    np.testing.assert_allclose(np.asarray(c[2])[:6], -naive[:, 2], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(c[3]), [*naive[:, 3], 0, 0])
    np.testing.assert_allclose(np.asarray(c[0])[:6], naive[:, 2], rtol=1e-5)  # summed


def test_kto_precomputed_reference_gives_the_same_steps(tmp_path, one_device):
    rows = case_preference_rows(16, seed=4)
    common = ("data.eval_fraction=0.0", "batch_size=8", "max_steps=2")
    for sub, extra in (("live", ()), ("pre", ("precompute_ref_logps=true",))):
        run_algorithm("kto", _cfg("kto", tmp_path / sub, *common, *extra), source=rows)
    live, pre = _train_records(tmp_path / "live"), _train_records(tmp_path / "pre")
    for a, b in zip(live, pre, strict=True):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def _online_prepare(setup, module, cfg):  # noqa: F811
    fn = module.make_prepare_fn(
        cfg, model_cfg=setup["model_cfg"], prompt_len=setup["prompts"]["input_ids"].shape[1]
    )
    args = (setup["policy"], setup["base"], setup["rollout_in"], jnp.asarray(setup["scores"]))
    return jax.jit(fn)(*args, jnp.float32(0.05))


def _online_cfg(cls, **kw):
    from test_grpo import G_SIZE, LORA, LOWER, MAX_NEW, N_PROMPTS

    return cls(
        lora=LORA,
        reward_funcs=(LOWER,),
        num_generations=G_SIZE,
        prompts_per_iteration=N_PROMPTS,
        generation=C.GenerationConfig(max_new_tokens=MAX_NEW, temperature=1.0),
        share_prompt=False,
        **kw,
    )


def test_rloo_prepare_gives_leave_one_out_advantages(setup):  # noqa: F811
    """A fresh adapter is the reference, so the folded-in KL is exactly 0 and the advantage is
    r_i − mean of the other k − 1 (= k/(k − 1)·(r_i − group mean)); clipping comes first."""
    from test_grpo import G_SIZE

    scores = np.asarray(setup["scores"], np.float64)
    for clip in (None, (0.0, 0.2)):
        batch, metrics = _online_prepare(
            setup, rloo, _online_cfg(rloo.RLOOConfig, beta=0.05, reward_clip_range=clip)
        )
        r = scores if clip is None else np.clip(scores, *clip)
        g = r.reshape(-1, G_SIZE)
        want = (g - (g.sum(1, keepdims=True) - g) / (G_SIZE - 1)).reshape(-1)
        np.testing.assert_allclose(np.asarray(batch["advantages"]), want, rtol=1e-5, atol=1e-6)
        assert float(metrics["kl"]) == 0.0
        assert float(metrics["reward"]) == pytest.approx(scores.mean(), rel=1e-6)
        assert "old_logprobs" not in batch  # one optimizer step per batch: π_old = π


def test_reinforce_pp_prepare_normalises_returns_over_the_batch(setup):  # noqa: F811
    """KL 0 (fresh adapter), γ = 1: every response token's return is its sequence's
    (baselined) score; the advantage is that, normalised over all response tokens."""
    from test_grpo import G_SIZE

    scores = np.asarray(setup["scores"], np.float64)
    resp = np.asarray(setup["rollout_in"]["response_mask"]).astype(bool)
    cfg = _online_cfg(
        reinforce_pp.ReinforcePPConfig, advantage_estimator="reinforce_baseline", kl_coef=0.05
    )
    batch, metrics = _online_prepare(setup, reinforce_pp, cfg)
    g = scores.reshape(-1, G_SIZE)
    s = (g - g.mean(1, keepdims=True)).reshape(-1)
    returns = np.broadcast_to(s[:, None], resp.shape)[resp]
    want = np.zeros(resp.shape)
    want[resp] = (returns - returns.mean()) / returns.std()  # population std, as OpenRLHF
    np.testing.assert_allclose(np.asarray(batch["advantages"]), want, rtol=1e-4, atol=1e-5)
    assert float(metrics["kl"]) == 0.0


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss_type=cispo", "epsilon_high=5.0", "optim.grad_accum_steps=2"],
        ["loss_type=sapo", "importance_sampling_level=sequence", "beta=0.04"],
        ["loss_type=grpo", "delta=1.5", "scale_rewards=batch", "mask_truncated_completions=true"],
        ["overlong_buffer=4", "dynamic_sampling=true", "scale_rewards=none"],
    ],
    ids=["cispo", "gspo-sapo", "delta", "dapo-shaping"],
)
def test_grpo_options_run_through_the_driver(tmp_path, overrides):
    """Each new GRPO option runs one iteration of the real command: finite loss and
    gradient, TRL's metric names present."""
    cfg = C.load_config(
        grpo.GRPOConfig,
        "configs/grpo_tiny.yaml",
        [f"run.run_dir={tmp_path}", "mesh.data=1", "run.progress=false", "max_steps=1", *overrides],
    )
    run_algorithm("grpo", cfg, source=_prompt_rows())
    (rec,) = _train_records(tmp_path)
    assert np.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert key in rec
    if "loss_type=cispo" in overrides:
        assert "cispo_clip_ratio" in rec
    if "dynamic_sampling=true" in overrides:
        assert rec["dynamic_sampling/dropped_groups"] >= 0
        assert rec["rewards/soft_overlong_punishment"] <= 0
