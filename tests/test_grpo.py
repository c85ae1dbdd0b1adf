"""GRPO with LoRA: group advantages of a real rollout, no reference pass at β = 0, KL and
ratio exactly where they must be, a rule-based reward rises, full fine-tuning runs, resume
is exact."""

from __future__ import annotations

import json
import os
import random
import signal
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import config as C
from jaxrlhf.algorithms import common as AC
from jaxrlhf.algorithms import grpo as G
from jaxrlhf.algorithms.common import init_train_state
from jaxrlhf.data import load_prompts
from jaxrlhf.lora import LoraConfig, init_lora
from jaxrlhf.losses import kl_estimate, masked_mean
from jaxrlhf.models.base import load_base
from jaxrlhf.rewards import RewardFuncConfig
from jaxrlhf.rollout import Sampler, prompt_batch
from jaxrlhf.sharding import MeshConfig, make_mesh, put_tree
from jaxrlhf.train.loop import TrainingInterrupted
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.runs import run_grpo
from jaxrlhf.train.scoring import Scorer

CONFIG = "configs/grpo_tiny.yaml"
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
}
LORA = LoraConfig(r=8, alpha=16)
LOWER = RewardFuncConfig(fn="char_share", kwargs={"chars": "abcdefghijklmnopqrstuvwxyz"})
G_SIZE, N_PROMPTS, MAX_NEW = 4, 4, 6


def _rows(n=64, seed=0):
    """Upper-case prompts: the reward (share of lower-case letters in the completion) is
    something the random model must learn to produce, not copy."""
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choices("BCDEFGH", k=rng.randint(3, 8)))} for _ in range(n)]


# ----------------------------------------------------------------------------- the steps


@pytest.fixture(scope="module")
def setup():
    """A tiny byte-level model, a fresh adapter and one real rollout of N_PROMPTS × G_SIZE."""
    mesh = make_mesh(MeshConfig(data=1))
    model_cfg, base_host, tok = load_base(C.ModelSection(path="tiny", tiny=TINY))
    base = put_tree(base_host, mesh)
    splits = load_prompts(
        C.PromptDataConfig(max_prompt_length=16, length_buckets=(16,)), tok, seed=0, source=_rows()
    )
    prompts, values, columns = prompt_batch(
        splits.train,
        np.arange(N_PROMPTS),
        pad_id=tok.pad_token_id,
        buckets=splits.buckets,
        mesh=mesh,
        repeat=G_SIZE,
    )
    policy = init_lora(jax.random.PRNGKey(1), base, LORA, model_cfg)
    sampler = Sampler(
        model_cfg,
        C.GenerationConfig(max_new_tokens=MAX_NEW, temperature=1.0),
        lora_cfg=LORA,
        eos_token_ids=tuple(model_cfg.eos_token_id),
        pad_token_id=tok.pad_token_id,
        mesh=mesh,
    )
    rollout = sampler(policy, base, prompts, jax.random.PRNGKey(2))
    scorer = Scorer(
        model_cfg=model_cfg,
        frozen=base,
        mesh=mesh,
        section=None,
        funcs=(LOWER,),
        tokenizer=tok,
        missing_eos_penalty=None,
        score_clip=None,
    )
    scores, _, _ = scorer(rollout, values, columns)
    rollout_in = {
        k: getattr(rollout, k) for k in ("input_ids", "attention_mask", "response_mask", "finished")
    }
    return {
        "model_cfg": model_cfg,
        "base": base,
        "policy": policy,
        "prompts": prompts,
        "rollout": rollout,
        "rollout_in": rollout_in,
        "scores": scores,
    }


def _hyper(*, use_old_logprobs=False, micro_batches=1, share_prompt=False, **kw):
    """The GRPO config of these step tests (μ = 2 when the old log-probs are needed)."""
    return G.GRPOConfig(
        lora=LORA,
        reward_funcs=(LOWER,),
        num_generations=G_SIZE,
        prompts_per_iteration=N_PROMPTS,
        generation=C.GenerationConfig(max_new_tokens=MAX_NEW, temperature=1.0),
        num_iterations=2 if use_old_logprobs else 1,
        optim=C.OptimConfig(grad_accum_steps=micro_batches),
        share_prompt=share_prompt,
        **kw,
    )


def _prepare(setup, hyper, scores=None):
    fn = G.make_prepare_fn(
        hyper,
        model_cfg=setup["model_cfg"],
        prompt_len=setup["prompts"]["input_ids"].shape[1],
    )
    scores = setup["scores"] if scores is None else scores
    return jax.jit(fn)(setup["policy"], setup["base"], setup["rollout_in"], jnp.asarray(scores))


def test_shared_prompt_groups_give_the_unshared_logprobs(setup):
    """Packing each prompt once for its G completions changes no log-prob or entropy of a
    real response token (left-padded prompts, completions stopped early by EOS)."""
    ids, mask = setup["rollout_in"]["input_ids"], setup["rollout_in"]["attention_mask"]
    resp = np.asarray(setup["rollout_in"]["response_mask"]).astype(bool)
    assert resp.sum() < resp.size  # some completions stopped early
    p_len = setup["prompts"]["input_ids"].shape[1]
    policy = jax.tree.map(lambda x: x + 0.05, setup["policy"])  # a non-zero adapter

    def run(group):
        return jax.jit(
            lambda base, lora: G.response_logprobs(
                base,
                ids,
                mask,
                p_len,
                model_cfg=setup["model_cfg"],
                lora=lora,
                lora_scale=LORA.scale,
                with_entropy=True,
                group=group,
            )
        )(setup["base"], policy)

    (lp1, ent1), (lp_g, ent_g) = run(1), run(G_SIZE)
    assert lp_g.shape == lp1.shape
    np.testing.assert_allclose(np.asarray(lp_g)[resp], np.asarray(lp1)[resp], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ent_g)[resp], np.asarray(ent1)[resp], rtol=1e-5, atol=1e-5
    )


def _numpy_group_advantages(scores, g, scale=True, eps=1e-4):
    groups = np.asarray(scores, np.float64).reshape(-1, g)
    adv = groups - groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, ddof=1)
    if scale:
        adv = adv / (std[:, None] + eps)
    return adv.reshape(-1), std


def test_rollout_groups_are_consecutive_copies_of_a_prompt(setup):
    ids = np.asarray(setup["prompts"]["input_ids"]).reshape(N_PROMPTS, G_SIZE, -1)
    assert (ids == ids[:, :1]).all()
    assert len({tuple(ids[i, 0]) for i in range(N_PROMPTS)}) == N_PROMPTS


def test_group_advantages_of_a_rollout_match_numpy(setup):
    scores = np.asarray(setup["scores"])
    assert scores.std() > 0  # the random policy's completions differ in reward
    for scale in (True, False):
        batch, metrics = _prepare(setup, _hyper(scale_rewards=scale))
        want, std = _numpy_group_advantages(scores, G_SIZE, scale)
        np.testing.assert_allclose(np.asarray(batch["advantages"]), want, rtol=1e-5, atol=1e-6)
        assert float(metrics["reward"]) == pytest.approx(scores.mean(), rel=1e-6)
        assert float(metrics["reward_std"]) == pytest.approx(std.mean(), rel=1e-5)
    # A group whose completions all score the same carries no signal: advantage 0.
    flat = scores.copy()
    flat[:G_SIZE] = 0.5
    batch, metrics = _prepare(setup, _hyper(), scores=flat)
    assert np.all(np.asarray(batch["advantages"])[:G_SIZE] == 0.0)
    assert float(metrics["frac_reward_zero_std"]) == pytest.approx(1 / N_PROMPTS)


def test_trl_reward_options_in_prepare(setup):
    """scale_rewards group|batch|none, mask_truncated_completions, overlong_buffer (DAPO's soft
    overlong punishment) and dynamic_sampling, each against numpy on a real rollout."""
    scores = np.asarray(setup["scores"], np.float64)
    grouped = scores.reshape(N_PROMPTS, G_SIZE)
    centred = (grouped - grouped.mean(1, keepdims=True)).reshape(-1)
    for scale, want in (
        ("group", _numpy_group_advantages(scores, G_SIZE, True)[0]),
        ("batch", centred / (scores.std(ddof=1) + 1e-4)),  # PPO Lite: one std for the batch
        ("none", centred),
    ):
        batch, _ = _prepare(setup, _hyper(scale_rewards=scale))
        np.testing.assert_allclose(np.asarray(batch["advantages"]), want, rtol=1e-5, atol=1e-6)

    resp = np.asarray(setup["rollout_in"]["response_mask"])
    finished = np.asarray(setup["rollout_in"]["finished"])
    batch, _ = _prepare(setup, _hyper(mask_truncated_completions=True))
    np.testing.assert_array_equal(np.asarray(batch["response_mask"]), resp * finished[:, None])

    # L = MAX_NEW = 6, C = 3: 0 up to 3 tokens, then (3 − n)/3 down to −1 at 6 tokens.
    lengths = resp.sum(-1)
    penalty = np.where(lengths <= 3, 0.0, (3 - lengths) / 3)
    batch, metrics = _prepare(setup, _hyper(overlong_buffer=3, scale_rewards="none"))
    shaped = (scores + penalty).reshape(N_PROMPTS, G_SIZE)
    want = (shaped - shaped.mean(1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(np.asarray(batch["advantages"]), want, rtol=1e-5, atol=1e-6)
    assert float(metrics["rewards/soft_overlong_punishment"]) == pytest.approx(penalty.mean())

    tied = scores.copy()
    tied[G_SIZE : 2 * G_SIZE] = 0.25  # group 1 ties; the others keep their spread
    assert all(np.ptp(g) > 0 for i, g in enumerate(scores.reshape(N_PROMPTS, G_SIZE)) if i != 1)
    batch, metrics = _prepare(setup, _hyper(dynamic_sampling=True), scores=tied)
    keep = np.repeat(np.arange(N_PROMPTS) != 1, G_SIZE)
    np.testing.assert_array_equal(np.asarray(batch["response_mask"]), resp * keep[:, None])
    assert float(metrics["dynamic_sampling/masked_groups"]) == 1.0
    # The driver's host filter agrees with the mask prepare applies.
    rollout = SimpleNamespace(response_mask=setup["rollout_in"]["response_mask"])
    keep_groups = G.keep_groups(_hyper(dynamic_sampling=True), tied, rollout)
    np.testing.assert_array_equal(keep_groups, np.arange(N_PROMPTS) != 1)
    assert G.keep_groups(_hyper(), tied, rollout) is None  # off: keep everything


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_global_token_losses_are_independent_of_micro_batching(setup, loss_type):
    """dapo and cispo normalise by the tokens of the whole optimizer step: splitting it into
    two micro-batches with different token counts gives the same gradient (bnpo, a mean per
    micro-batch, does not — the check is not vacuous)."""
    batch, _ = _prepare(setup, _hyper())
    mask = np.asarray(batch["response_mask"]).copy()
    mask[: N_PROMPTS * G_SIZE // 2, 2:] = 0  # the first micro-batch gets far fewer tokens
    batch = {**batch, "response_mask": jnp.asarray(mask)}
    opt = make_optimizer(C.OptimConfig(), 10)
    state = init_train_state(setup["policy"], opt, jax.random.PRNGKey(0))
    p_len = setup["prompts"]["input_ids"].shape[1]
    idx = jnp.arange(N_PROMPTS * G_SIZE)

    def grad_norm(kind, micro_batches):
        hyper = _hyper(micro_batches=micro_batches, loss_type=kind, epsilon_high=5.0)
        update = G.make_update_fn(
            hyper, model_cfg=setup["model_cfg"], optimizer=opt, prompt_len=p_len
        )
        return float(jax.jit(update)(state, setup["base"], batch, idx)[1]["grad_norm"])

    assert grad_norm(loss_type, 2) == pytest.approx(grad_norm(loss_type, 1), rel=1e-5)
    assert grad_norm("bnpo", 2) != pytest.approx(grad_norm("bnpo", 1), rel=1e-3)


def _count_backbone_calls(monkeypatch):
    """Record, at trace time, every backbone pass the GRPO steps make: True for a pass with
    an adapter (the policy), False for one without (the reference). Every training forward
    runs through `algorithms.common.hidden_and_aux`, so its `backbone` is the one to count."""
    calls: list[bool] = []
    real = AC.backbone

    def counting(params, *args, lora=None, **kwargs):
        calls.append(lora is not None)
        return real(params, *args, lora=lora, **kwargs)

    monkeypatch.setattr(AC, "backbone", counting)
    return calls


def test_beta_zero_runs_no_reference_pass(setup, monkeypatch):
    calls = _count_backbone_calls(monkeypatch)
    args = (setup["policy"], setup["base"], setup["rollout_in"], jnp.asarray(setup["scores"]))
    p_len = setup["prompts"]["input_ids"].shape[1]

    def traced(hyper):
        calls.clear()
        fn = G.make_prepare_fn(hyper, model_cfg=setup["model_cfg"], prompt_len=p_len)
        batch = jax.eval_shape(fn, *args)[0]
        return list(calls), set(batch)

    # β = 0, μ = 1, one mini-batch: prepare runs no model at all.
    assert traced(_hyper(beta=0.0)) == (
        [],
        {"input_ids", "attention_mask", "response_mask", "advantages"},
    )
    # β > 0 adds exactly one pass, without the adapter; reused batches add one policy pass.
    assert traced(_hyper(beta=0.1)) == (
        [False],
        {"input_ids", "attention_mask", "response_mask", "advantages", "ref_logprobs"},
    )
    assert traced(_hyper(use_old_logprobs=True))[0] == [True]

    # The update at β = 0 runs the policy once, and never the reference.
    opt = make_optimizer(C.OptimConfig(), 10)
    state = init_train_state(setup["policy"], opt, jax.random.PRNGKey(0))
    batch, _ = _prepare(setup, _hyper())
    calls.clear()
    update = G.make_update_fn(
        _hyper(micro_batches=2),
        model_cfg=setup["model_cfg"],
        optimizer=opt,
        prompt_len=p_len,
    )
    jax.eval_shape(update, state, setup["base"], batch, jnp.arange(N_PROMPTS * G_SIZE))
    assert calls == [True]


def test_kl_is_zero_at_start_and_first_inner_update_has_ratio_one(setup):
    """β > 0 and μ = 2: with the zero-initialised adapter the policy *is* the reference (KL
    exactly 0), the trainer's log-probs are the sampler's, and the first of the μ updates
    sees ratio 1; the second, after a step, does not."""
    hyper = _hyper(beta=0.04, use_old_logprobs=True)
    batch, _ = _prepare(setup, hyper)
    resp = np.asarray(setup["rollout"].response_mask).astype(bool)
    old, ref = np.asarray(batch["old_logprobs"]), np.asarray(batch["ref_logprobs"])
    assert np.array_equal(old[resp], ref[resp])
    assert (
        float(
            masked_mean(
                kl_estimate(batch["old_logprobs"], batch["ref_logprobs"]), batch["response_mask"]
            )
        )
        == 0.0
    )
    np.testing.assert_allclose(
        old[resp], np.asarray(setup["rollout"].sampler_logprobs)[resp], atol=1e-5
    )

    opt = make_optimizer(C.OptimConfig(learning_rate=1e-2), 10)
    state = init_train_state(setup["policy"], opt, jax.random.PRNGKey(0))
    update = jax.jit(
        G.make_update_fn(
            hyper,
            model_cfg=setup["model_cfg"],
            optimizer=opt,
            prompt_len=setup["prompts"]["input_ids"].shape[1],
        )
    )
    idx = jnp.arange(N_PROMPTS * G_SIZE)
    state, first = update(state, setup["base"], batch, idx)
    # The update's policy pass is a different compiled program (fused with its backward), so
    # it matches the reference pass to float32 rounding (~1e-7 in log-prob), not bitwise;
    # k3 is quadratic in that difference.
    assert float(first["kl"]) < 1e-10
    assert float(first["ratio"]) == 1.0
    assert float(first["clip_ratio"]) == 0.0
    assert float(first["grad_norm"]) > 0.0
    state, second = update(state, setup["base"], batch, idx)
    assert float(second["ratio"]) != 1.0
    assert float(second["kl"]) > 0.0


# ----------------------------------------------------------------------------- end to end


def _cfg(run_dir, *overrides):
    return C.load_config(
        G.GRPOConfig,
        CONFIG,
        [f"run.run_dir={run_dir}", "mesh.data=1", "run.progress=false", *overrides],
    )


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if json.loads(line)["split"] == "train"]


def test_grpo_raises_a_rule_based_reward_without_a_reference(tmp_path, monkeypatch):
    calls = _count_backbone_calls(monkeypatch)
    out = run_grpo(_cfg(tmp_path, "max_steps=30"), source=_rows(256))
    train = _records(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 31))
    first = np.mean([r["reward"] for r in train[:3]])
    last = np.mean([r["reward"] for r in train[-3:]])
    assert last > first + 0.3, (first, last)
    assert all(r["kl"] == 0.0 for r in train)
    assert calls and all(calls)  # only policy passes were traced: β = 0 has no reference
    for key in (
        "reward_std",
        "rewards/lowercase",
        "frac_reward_zero_std",
        "clip_ratio",
        "completion_length",
        "entropy",
        "loss",
        "grad_norm",
        "time/rollout_tokens_per_s",
        "time/update_tokens_per_s",
    ):
        assert np.isfinite(train[-1][key]), key
    assert os.path.isfile(os.path.join(out["export"], "adapter_config.json"))


def test_full_finetuning_runs_one_iteration_against_a_frozen_copy(tmp_path):
    cfg = _cfg(
        tmp_path,
        "lora=null",
        "max_steps=1",
        "beta=0.04",
        "prompts_per_iteration=2",
        "num_generations=4",
        "optim.learning_rate=1e-3",
    )
    out = run_grpo(cfg, source=_rows())
    (rec,) = _records(tmp_path)
    assert rec["kl"] < 1e-10  # the trained copy starts equal to the reference copy
    assert np.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    trained, frozen = jax.device_get(out["state"].train.trainable), jax.device_get(out["frozen"])
    assert not np.array_equal(
        trained["layers"]["q_proj"]["kernel"], frozen["layers"]["q_proj"]["kernel"]
    )
    assert os.path.isfile(os.path.join(out["export"], "config.json"))


@pytest.mark.slow
def test_resume_after_sigterm_is_exact(tmp_path, monkeypatch):
    """Interrupted by SIGTERM in iteration 2, resumed: the final adapter and optimizer state
    equal an uninterrupted run's (β > 0, μ = 2, two mini-batches: every path is exercised)."""
    common = [
        "max_steps=4",
        "run.save_every=2",
        "prompts_per_iteration=2",
        "num_generations=4",
        "beta=0.04",
        "num_iterations=2",
        "mini_batch_size=4",
    ]
    rows = _rows()
    full = run_grpo(_cfg(tmp_path / "a", *common), source=rows)

    real, calls = Scorer.__call__, {"n": 0}

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "__call__", interrupting)
    with pytest.raises(TrainingInterrupted):
        run_grpo(_cfg(tmp_path / "b", *common), source=rows)
    monkeypatch.setattr(Scorer, "__call__", real)
    assert [r["step"] for r in _records(tmp_path / "b")] == [1, 2]
    resumed = run_grpo(_cfg(tmp_path / "b", *common), source=rows, resume=True)

    a, b = jax.device_get((full["state"].train, resumed["state"].train))
    assert int(a.step) == int(b.step) == 4 * 2 * 2
    for x, y in zip(
        jax.tree.leaves((a.trainable, a.opt_state, a.rng)),
        jax.tree.leaves((b.trainable, b.opt_state, b.rng)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    rec_a, rec_b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert rec_a[-1]["reward"] == rec_b[-1]["reward"]


def test_config_validation():
    base = ["reward_funcs=[{fn: contains, kwargs: {text: a}}]"]
    cases = {
        "num_generations must be >= 2": ["num_generations=1"],
        "must divide the generation batch": ["mini_batch_size=5"],
        "GRPO needs a reward": [],
        "loss_type": ["loss_type=ppo"],
        "exceeds generation.max_rank": ["generation.merge_adapter=false", "generation.max_rank=16"],
        "multiple of optim.grad_accum_steps": ["mini_batch_size=16", "optim.grad_accum_steps=3"],
        "no critic": ["lora.modules_to_save=[value]"],
        "multiple of num_generations": ["mini_batch_size=4"],
    }
    for message, overrides in cases.items():
        extra = [] if message == "GRPO needs a reward" else base
        with pytest.raises(ValueError, match=message):
            C.load_config(G.GRPOConfig, None, extra + overrides)
    cfg = C.load_config(G.GRPOConfig, None, base)
    assert (
        cfg.num_generations,
        cfg.beta,
        cfg.epsilon,
        cfg.loss_type,
        cfg.lora.r,
        cfg.generation.max_new_tokens,
    ) == (8, 0.0, 0.2, "dapo", 32, 256)
    assert C.load_config(G.GRPOConfig, CONFIG).generation.max_new_tokens == 8
