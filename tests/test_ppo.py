"""PPO with LoRA: rollouts agree with the trainer, the reference is free, the critic learns,
memory is below full fine-tuning, training raises the reward, resume is exact."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import config as C
from jaxrlhf import data as D
from jaxrlhf.algorithms import ppo as P
from jaxrlhf.lora import LoraConfig, init_lora, merge, tree_bytes
from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.transformer import init_params
from jaxrlhf.rewards import RewardFuncConfig
from jaxrlhf.rollout import Sampler
from jaxrlhf.train.loop import TrainingInterrupted
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.runs import run_ppo

CFG = tiny_config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    eos_token_id=(2,),
)
LORA = LoraConfig(r=4, alpha=8)
VALUE_LORA = LoraConfig(r=4, alpha=8, modules_to_save=("value",))
HYPER = P.PPOConfig(
    lora=LORA,
    value_lora=VALUE_LORA,
    generation=C.GenerationConfig(temperature=1.0),
    reward_funcs=(RewardFuncConfig(fn="char_share", kwargs={"chars": "abc"}),),
)
ADAPTERS = P.Adapters(policy=LORA, value=VALUE_LORA)


def _prompts(b=4, p=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, (b, p)).astype(np.int32)
    mask = np.ones((b, p), np.int32)
    mask[0, :2] = 0  # left padding
    ids[0, :2] = 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def _random_b(lora, key, scale=0.3):
    out = jax.tree.map(lambda x: x, lora)
    for i, (name, ab) in enumerate(sorted(lora["layers"].items())):
        out["layers"][name] = {
            **ab,
            "lora_B": scale * jax.random.normal(jax.random.fold_in(key, i), ab["lora_B"].shape),
        }
    return out


def _setup(nonzero: bool):
    key = jax.random.PRNGKey(0)
    base = init_params(key, CFG)
    policy = init_lora(jax.random.PRNGKey(1), base, LORA, CFG)
    if nonzero:
        policy = _random_b(policy, jax.random.PRNGKey(2))
    value = init_lora(jax.random.PRNGKey(3), base, VALUE_LORA, CFG)
    sampler = Sampler(
        CFG,
        C.GenerationConfig(max_new_tokens=6, temperature=1.0),
        lora_cfg=LORA,
        eos_token_ids=(2,),
        pad_token_id=0,
    )
    rollout = sampler(policy, base, _prompts(), jax.random.PRNGKey(4))
    trainable = {"policy": policy, "value": value}
    exp_fn = jax.jit(P.make_experience_fn(HYPER, model_cfg=CFG, adapters=ADAPTERS, prompt_len=6))
    rollout_in = {
        k: getattr(rollout, k)
        for k in ("input_ids", "attention_mask", "response_mask", "sampler_logprobs", "finished")
    }
    exp, metrics = exp_fn(trainable, base, rollout_in, jnp.ones((4,)), 0.05)
    return base, trainable, rollout, exp, metrics


def test_fresh_adapter_kl_is_exactly_zero_and_trainer_matches_sampler():
    _, _, rollout, exp, metrics = _setup(nonzero=False)
    resp = np.asarray(rollout.response_mask).astype(bool)
    assert resp.sum() > 0
    assert float(metrics["objective/kl"]) == 0.0
    assert np.array_equal(
        np.asarray(exp["old_logprobs"])[resp], np.asarray(exp["ref_logprobs"])[resp]
    )
    np.testing.assert_allclose(
        np.asarray(exp["old_logprobs"])[resp],
        np.asarray(rollout.sampler_logprobs)[resp],
        atol=1e-5,
    )


def test_nonzero_adapter_sampler_logprobs_equal_trainer_logprobs():
    """The merged-weights sampler and the unmerged training forward agree, so the rollout
    engine does not silently ignore the adapter; and the policy is not the reference."""
    _, _, rollout, exp, metrics = _setup(nonzero=True)
    resp = np.asarray(rollout.response_mask).astype(bool)
    np.testing.assert_allclose(
        np.asarray(exp["old_logprobs"])[resp],
        np.asarray(rollout.sampler_logprobs)[resp],
        atol=2e-5,
    )
    assert float(metrics["objective/kl"]) != 0.0
    assert abs(float(metrics["val/ratio_sampler_trainer"]) - 1.0) < 1e-4


def test_value_head_gets_gradients_and_reference_stays_frozen():
    base, trainable, _, exp, _ = _setup(nonzero=True)
    grads = jax.grad(
        lambda t: P.ppo_loss(
            t, exp, base, model_cfg=CFG, adapters=ADAPTERS, cfg=HYPER, prompt_len=6
        )[0]
    )(trainable)
    assert float(jnp.abs(grads["value"]["value"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["policy"]["layers"]["q_proj"]["lora_A"]).sum()) > 0
    assert set(grads) == {"policy", "value"}  # nothing of the frozen base is differentiated


def test_an_entropy_bonus_reaches_the_policy_gradient():
    """`entropy_coef` ≠ 0 differentiates the entropy (at 0 it is only logged, through the
    cheaper path): the policy gradient moves by exactly −coef · ∇H, and the two paths give
    the same loss terms."""
    base, trainable, _, exp, _ = _setup(nonzero=True)

    def grads(coef):
        cfg = dataclasses.replace(HYPER, entropy_coef=coef)
        return jax.grad(
            lambda t: P.ppo_loss(
                t, exp, base, model_cfg=CFG, adapters=ADAPTERS, cfg=cfg, prompt_len=6
            ),
            has_aux=True,
        )(trainable)

    (g0, m0), (g1, m1), (g2, _) = grads(0.0), grads(0.1), grads(0.2)
    np.testing.assert_allclose(float(m0["policy/entropy"]), float(m1["policy/entropy"]), rtol=1e-6)
    a0, a1, a2 = (np.asarray(g["policy"]["layers"]["q_proj"]["lora_A"]) for g in (g0, g1, g2))
    assert np.abs(a1 - a0).max() > 1e-6  # the bonus is in the gradient
    # linear in coef, up to fp32 rounding of gradients ~0.2 (the two paths sum differently)
    assert np.abs(a2 - a0 - 2 * (a1 - a0)).max() < 1e-5 * np.abs(a0).max()


def _update_memory(full: bool) -> int:
    key = jax.random.PRNGKey(0)
    base = init_params(key, CFG)
    if full:
        trainable = {
            "policy": base,
            "value": {
                **base,
                "value": {"kernel": jnp.zeros((CFG.hidden_size, 1)), "bias": jnp.zeros((1,))},
            },
        }
        adapters = P.Adapters(policy=None, value=None)
    else:
        trainable = {
            "policy": init_lora(key, base, LORA, CFG),
            "value": init_lora(key, base, VALUE_LORA, CFG),
        }
        adapters = ADAPTERS
    opt = make_optimizer(C.OptimConfig(), 10)
    from jaxrlhf.algorithms.common import init_train_state

    state = init_train_state(trainable, opt, key)
    b, t = 8, 16
    exp = {
        "input_ids": jnp.zeros((b, t), jnp.int32),
        "attention_mask": jnp.ones((b, t), jnp.int32),
        "response_mask": jnp.ones((b, 8), jnp.int32),
        "old_logprobs": jnp.zeros((b, 8)),
        "old_values": jnp.zeros((b, 8)),
        "advantages": jnp.zeros((b, 8)),
        "returns": jnp.zeros((b, 8)),
        "ref_logprobs": jnp.zeros((b, 8)),
    }
    update = P.make_update_fn(HYPER, model_cfg=CFG, adapters=adapters, optimizer=opt, prompt_len=8)
    compiled = jax.jit(update, donate_argnums=(0,)).lower(state, base, exp, jnp.arange(4)).compile()
    mem = compiled.memory_analysis()
    return mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes


def test_lora_update_step_needs_less_memory_than_full_finetuning():
    assert _update_memory(full=False) < _update_memory(full=True)


def test_lora_mode_holds_one_copy_of_the_base():
    """Live device bytes: LoRA = base + small trees; full fine-tuning = reference + policy +
    critic copies. Counted over every live array."""

    def live_bytes():
        return sum(x.nbytes for x in jax.live_arrays())

    key = jax.random.PRNGKey(0)
    cfg = tiny_config(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2)
    before = live_bytes()
    base = init_params(key, cfg)
    base_bytes = tree_bytes(base)
    opt = make_optimizer(C.OptimConfig(), 10)
    lora = {
        "policy": init_lora(key, base, LORA, cfg),
        "value": init_lora(key, base, VALUE_LORA, cfg),
    }
    lora_state = opt.init(lora)
    lora_total = live_bytes() - before
    assert lora_total < 1.25 * base_bytes
    full = {"policy": jax.tree.map(jnp.copy, base), "value": jax.tree.map(jnp.copy, base)}
    full_state = opt.init(full)
    assert live_bytes() - before > 3 * base_bytes
    del lora_state, full_state, full


# ----------------------------------------------------------------------------- end to end


def _rows(n=256, seed=0):
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choices("BCDEFGH", k=rng.randint(3, 8)))} for _ in range(n)]


def _cfg(tmp_path, *overrides):
    return C.load_config(
        P.PPOConfig, "configs/ppo_tiny.yaml", [f"run.run_dir={tmp_path}", "mesh.data=1", *overrides]
    )


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_ppo_raises_a_rule_based_reward_with_bounded_kl(tmp_path):
    cfg = _cfg(
        tmp_path,
        "num_iterations=30",
        "run.log_every=1",
        "optim.learning_rate=1e-2",
        "num_ppo_epochs=4",
        "kl_coef=0.02",
    )
    run_ppo(cfg, source=datasets.Dataset.from_list(_rows()))
    train = [r for r in _records(tmp_path) if r["split"] == "train"]
    first = np.mean([r["objective/scores"] for r in train[:3]])
    last = np.mean([r["objective/scores"] for r in train[-3:]])
    assert last > first + 0.25, (first, last)
    assert max(r["objective/kl"] for r in train) < 25.0
    assert train[-1]["val/explained_variance"] > 0.0


def test_resume_after_sigterm_is_exact(tmp_path, monkeypatch):
    rows = datasets.Dataset.from_list(_rows(128))
    common = [
        "num_iterations=4",
        "run.save_every=2",
        "rollout_batch_size=16",
        "mini_batch_size=8",
        "num_ppo_epochs=1",
    ]
    full = run_ppo(_cfg(tmp_path / "a", *common), source=rows)

    real = D.batch_indices
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # during the third iteration
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "batch_indices", interrupting)
    with pytest.raises(TrainingInterrupted):
        run_ppo(_cfg(tmp_path / "b", *common), source=rows)
    monkeypatch.setattr(D, "batch_indices", real)
    resumed = run_ppo(_cfg(tmp_path / "b", *common), source=rows, resume=True)
    a, b = full["state"].train, resumed["state"].train
    assert int(b.step) == int(a.step)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6),
        a.trainable,
        b.trainable,
    )
    # the critic's value head was saved and restored with everything else
    assert float(jnp.abs(b.trainable["value"]["value"]["kernel"]).sum()) > 0
    np.testing.assert_allclose(float(full["state"].kl.value), float(resumed["state"].kl.value))


def test_start_from_a_trained_adapter_has_zero_kl_to_its_reference(tmp_path):
    """An SFT adapter merged at load is the reference: KL is 0 at the first iteration."""
    from jaxrlhf.models.base import load_base
    from jaxrlhf.peft_format import export_peft

    cfg = _cfg(
        tmp_path / "run",
        "num_iterations=1",
        "rollout_batch_size=16",
        "mini_batch_size=8",
        "num_ppo_epochs=1",
        "run.log_every=1",
    )
    model_cfg, base, _ = load_base(cfg.model, seed=cfg.run.seed)
    sft = _random_b(
        init_lora(jax.random.PRNGKey(5), base, LoraConfig(r=4, alpha=8), model_cfg),
        jax.random.PRNGKey(6),
        scale=0.5,
    )
    export_peft(jax.device_get(sft), LoraConfig(r=4, alpha=8), model_cfg, tmp_path / "sft")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, adapter=str(tmp_path / "sft"))
    )
    out = run_ppo(cfg, source=datasets.Dataset.from_list(_rows(64)))
    first = [r for r in _records(tmp_path / "run") if r["split"] == "train"][0]
    assert first["objective/kl"] == 0.0
    # and the reference really is the SFT model, not the raw base
    merged = merge(base, jax.device_get(sft), LoraConfig(r=4, alpha=8))
    np.testing.assert_allclose(
        np.asarray(out["frozen"]["layers"]["q_proj"]["kernel"]),
        np.asarray(merged["layers"]["q_proj"]["kernel"]),
        atol=1e-6,
    )


def test_full_finetuning_runs_with_a_real_reference_copy(tmp_path):
    cfg = _cfg(
        tmp_path,
        "lora=null",
        "value_lora=null",
        "num_iterations=1",
        "rollout_batch_size=16",
        "mini_batch_size=8",
        "num_ppo_epochs=1",
        "optim.learning_rate=1e-4",
    )
    out = run_ppo(cfg, source=datasets.Dataset.from_list(_rows(64)))
    policy = out["state"].train.trainable["policy"]
    assert not np.array_equal(
        np.asarray(policy["layers"]["q_proj"]["kernel"]),
        np.asarray(out["frozen"]["layers"]["q_proj"]["kernel"]),
    )
    assert os.path.isfile(os.path.join(tmp_path, "model", "model.safetensors"))


def test_a_full_critic_starts_as_the_full_reward_model_and_a_lora_one_refuses_it():
    import types

    from jaxrlhf.algorithms.ppo import critic_from_reward_model

    rng = np.random.default_rng(0)
    weights = {
        "embed": {"embedding": rng.normal(size=(5, 3)).astype(np.float32)},
        "score": {"kernel": rng.normal(size=(3, 1)).astype(np.float32)},
    }
    full_rm = types.SimpleNamespace(params=weights, lora=None, members=1)
    reward = ["reward_model.path=rm"]
    cfg = C.load_config(P.PPOConfig, None, [*reward, "lora=null", "value_lora=null"])
    value, value_cfg = critic_from_reward_model(full_rm, cfg)
    assert value_cfg is None and set(value) == {"embed", "value"}
    np.testing.assert_array_equal(value["embed"]["embedding"], weights["embed"]["embedding"])
    np.testing.assert_array_equal(value["value"]["kernel"], weights["score"]["kernel"])
    np.testing.assert_array_equal(value["value"]["bias"], np.zeros(1, np.float32))
    lora_cfg = C.load_config(P.PPOConfig, None, reward)  # a LoRA critic needs a LoRA reward model
    with pytest.raises(ValueError, match="LoRA reward model"):
        critic_from_reward_model(full_rm, lora_cfg)
