"""The MoE router's load-balancing loss in training: its value is transformers' `aux_loss`
(padding masked), and every training step that runs the policy (or reward model) forward
with gradients adds `router_aux_loss_coef · aux_loss` to its loss and logs `aux_loss`, as
TRL does; `model.router_aux_loss_coef` overrides the checkpoint's coefficient, 0 turns the
term off, and a dense model is unaffected."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.families import save_tiny_family
from helpers.tasks import case_preference_rows

from jaxrlhf import config as C
from jaxrlhf import data as D
from jaxrlhf.algorithms import ppo as P
from jaxrlhf.algorithms.common import (
    add_router_aux_loss,
    hidden_and_aux,
    init_train_state,
    router_aux_active,
)
from jaxrlhf.data.packing import pack_groups
from jaxrlhf.lora import LoraConfig, init_lora, split_trainable
from jaxrlhf.losses import masked_mean
from jaxrlhf.models.base import load_base
from jaxrlhf.models.transformer import backbone, load_balancing_loss, sequence_logprobs
from jaxrlhf.rewards import RewardFuncConfig
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.runs import ALGORITHMS

COEF = 0.5  # large, so the term is far above float32 noise in the loss difference
BUCKET = 48
PREFERENCE = ("rm", "dpo", "kto", "orpo", "cpo")
ONLINE = ("grpo", "rloo", "reinforce_pp")


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory):
    return {
        family: save_tiny_family(family, tmp_path_factory.mktemp(family), seed=3)
        for family in ("qwen3_moe", "mixtral")
    }


def _base(folder, coef=None):
    model_cfg, base, tok = load_base(C.ModelSection(path=str(folder), router_aux_loss_coef=coef))
    return model_cfg, jax.tree.map(jnp.asarray, base), tok


def _padded(side: str, seed=0, lengths=(14, 9, 4), seq=14):
    """Byte-token ids (never the pad id 0) and a left- or right-padded mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 259, size=(len(lengths), seq))
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, seq - n :] = 1
        else:
            mask[row, :n] = 1
    return np.where(mask == 1, ids, 0), mask


def _aux_of(params, ids, mask, model_cfg, **forward) -> float:
    """The load-balancing loss of the base forward (a fresh adapter is the base exactly)."""
    _, _, logits = backbone(
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        cfg=model_cfg,
        with_router_logits=True,
        **forward,
    )
    return float(
        load_balancing_loss(logits, jnp.asarray(mask), top_k=model_cfg.num_experts_per_tok)
    )


# ----------------------------------------------------------------------------- the value


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_aux_loss_and_total_loss_match_transformers(family, moe_folders):
    """`hidden_and_aux` gives transformers' `aux_loss` with left and right padding, and
    the causal-LM loss + coef · aux is transformers' `loss` with labels (right padding, so
    every predicted token follows a real one)."""
    import transformers

    folder = moe_folders[family]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model_cfg, params, _ = _base(folder)
    assert model_cfg.router_aux_loss_coef == hf.config.router_aux_loss_coef > 0  # the checkpoint's
    for side in ("left", "right"):
        ids, mask = _padded(side)
        positions = torch.tensor(np.clip(np.cumsum(mask, -1) - 1, 0, None))
        labels = torch.tensor(np.where(mask == 1, ids, -100))
        with torch.no_grad():
            out = hf(
                input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                position_ids=positions,
                labels=labels,
                output_router_logits=True,
            )
        _, aux = hidden_and_aux(params, jnp.asarray(ids), jnp.asarray(mask), model_cfg=model_cfg)
        np.testing.assert_allclose(float(aux), out.aux_loss.item(), rtol=1e-5)
        if side == "right":
            lp, _ = sequence_logprobs(params, jnp.asarray(ids), jnp.asarray(mask), cfg=model_cfg)
            ce = -masked_mean(lp, jnp.asarray(mask[:, 1:]))
            total, metrics = add_router_aux_loss(ce, {"loss": ce}, aux, model_cfg=model_cfg)
            np.testing.assert_allclose(float(total), out.loss.item(), rtol=1e-5)
            assert float(metrics["loss"]) == float(total)
            assert float(metrics["aux_loss"]) == float(aux)


def test_the_option_overrides_refuses_and_disables(moe_folders, tmp_path):
    folder = moe_folders["qwen3_moe"]
    assert _base(folder, 0.25)[0].router_aux_loss_coef == 0.25
    off = _base(folder, 0.0)[0]
    assert not router_aux_active(off)
    ids, mask = _padded("right")
    assert hidden_and_aux(_base(folder)[1], ids, mask, model_cfg=off)[1] is None
    with pytest.raises(ValueError, match="router_aux_loss_coef must be >= 0"):
        C.ModelSection(router_aux_loss_coef=-1.0)
    dense = save_tiny_family("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match="model.router_aux_loss_coef=0.5: .* not a mixture"):
        _base(dense, 0.5)
    assert not router_aux_active(_base(dense, 0.0)[0])  # 0 on a dense model is allowed


# ----------------------------------------------------------------------------- the steps


def test_reward_and_grpo_losses_add_coef_times_aux_loss(moe_folders):
    """The default suite's check (forward only, so two cheap compiles per loss): the reward
    model's Bradley–Terry loss and GRPO's policy loss, at coefficient 0.5 and 0, differ by
    0.5 · the load-balancing loss of their forward. The slow tests below run every
    algorithm's compiled train step."""
    from jaxrlhf.algorithms import grpo as G
    from jaxrlhf.algorithms import reward_model as R

    folder = moe_folders["qwen3_moe"]
    _, base, tok = _base(folder)
    prefs, _ = D.tokenize_preferences(case_preference_rows(4, seed=5), tok, max_length=BUCKET)
    pairs = D.pair_batch(
        prefs, np.arange(4), pad_id=0, buckets=(BUCKET,), batch_size=4, share_prompt=False
    )
    rollout, scores = _online_inputs()
    out = {}
    for coef in (COEF, 0.0):
        model_cfg = _base(folder, coef)[0]
        lora = LoraConfig(r=4, alpha=8, task_type="SEQ_CLS", modules_to_save=("score",))
        rm_trainable, _ = split_trainable(jax.random.PRNGKey(0), base, model_cfg, lora, ("score",))
        rm = jax.jit(
            lambda t, b, model_cfg=model_cfg, lora=lora: R.reward_loss(
                t,
                b,
                base,
                None,
                model_cfg=model_cfg,
                lora_cfg=lora,
                center_rewards_coefficient=None,
            )
        )(rm_trainable, pairs)
        cfg = C.load_config(
            G.GRPOConfig,
            "configs/grpo_tiny.yaml",
            ["num_generations=4", "prompts_per_iteration=2", "share_prompt=false"],
        )
        policy, _ = split_trainable(jax.random.PRNGKey(0), base, model_cfg, cfg.lora)
        prepared = {**rollout, "advantages": scores, "loss_scale": jnp.ones(())}
        grpo = jax.jit(
            lambda t, m, model_cfg=model_cfg, cfg=cfg: G.grpo_objective(
                t, m, base, model_cfg=model_cfg, cfg=cfg, prompt_len=6
            )
        )(policy, prepared)
        out[coef] = jax.device_get((rm, grpo))
    ids = np.concatenate([pairs["chosen_input_ids"], pairs["rejected_input_ids"]])
    mask = np.concatenate([pairs["chosen_attention_mask"], pairs["rejected_attention_mask"]])
    rm_aux = _aux_of(base, ids, mask, model_cfg)
    grpo_aux = _aux_of(base, rollout["input_ids"], rollout["attention_mask"], model_cfg)
    for i, aux in ((0, rm_aux), (1, grpo_aux)):
        (loss_c, metrics_c), (loss_0, metrics_0) = out[COEF][i], out[0.0][i]
        np.testing.assert_allclose(loss_c - loss_0, COEF * aux, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(metrics_c["aux_loss"], aux, rtol=1e-5)
        assert metrics_c["loss"] == pytest.approx(loss_c) and "aux_loss" not in metrics_0


def _preference_step(name, folder, coef, *, share_prompt, dense=False):
    """Metrics of one train step of `name` from a fresh adapter on 6 pairs (+2 pad pairs)."""
    spec = ALGORITHMS[name]
    cfg = C.load_config(spec.config, f"configs/{name}_tiny.yaml", ["mesh.data=1"])
    model_cfg, base, tok = _base(folder, coef)
    rows = case_preference_rows(8, seed=5)
    if spec.prepare_rows is not None:
        rows = spec.prepare_rows(cfg, rows)
    prefs, _ = D.tokenize_preferences(rows, tok, max_length=BUCKET)
    batch = D.pair_batch(
        prefs, np.arange(6), pad_id=0, buckets=(BUCKET,), batch_size=8, share_prompt=share_prompt
    )
    trainable, _ = split_trainable(jax.random.PRNGKey(0), base, model_cfg, cfg.lora, spec.heads)
    optimizer = make_optimizer(cfg.optim, 10)
    state = init_train_state(trainable, optimizer, jax.random.PRNGKey(1))
    step = jax.jit(spec.make_train_step(cfg, model_cfg=model_cfg, optimizer=optimizer))
    micro = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)
    _, metrics = step(state, base, micro)
    if "packed_input_ids" in batch:
        forward = {k: batch[f"packed_{k}"] for k in ("positions", "segment_ids")}
        ids, mask = batch["packed_input_ids"], batch["packed_attention_mask"]
    else:
        forward = {}
        ids = np.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = np.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    aux = None if dense else _aux_of(base, ids, mask, model_cfg, **forward)
    return jax.device_get(metrics), aux


def _check_step(metrics_c, metrics_0, aux, loss_key="loss"):
    assert "aux_loss" not in metrics_0  # coefficient 0: no term, no metric (as TRL)
    np.testing.assert_allclose(metrics_c["aux_loss"], aux, rtol=1e-5)
    # Same state, batch and rng: the losses differ by exactly coef · aux.
    np.testing.assert_allclose(
        metrics_c[loss_key] - metrics_0[loss_key], COEF * aux, rtol=1e-4, atol=1e-6
    )
    # The term has a gradient: it reaches the adapter through the activations (the router
    # itself is frozen and not in the trainable tree).
    assert abs(metrics_c["grad_norm"] - metrics_0["grad_norm"]) > 1e-6


@pytest.mark.slow  # 14 compiled train steps, ~30 s each on a loaded 2-core host
@pytest.mark.parametrize(
    ("name", "share_prompt"), [*((n, False) for n in PREFERENCE), ("rm", True), ("dpo", True)]
)
def test_preference_steps_add_coef_times_aux_loss(name, share_prompt, moe_folders):
    folder = moe_folders["qwen3_moe"]
    with_c, aux = _preference_step(name, folder, COEF, share_prompt=share_prompt)
    without, aux_0 = _preference_step(name, folder, 0.0, share_prompt=share_prompt)
    assert aux == aux_0 > 1.0  # top-2 of 4 experts: uniform routing gives exactly 2
    _check_step(with_c, without, aux)


def _online_inputs(prompt_len=6, new=6, group=4, prompts=2, seed=0):
    """A fake rollout: left-padded prompts, completions stopped early by padding."""
    rng = np.random.default_rng(seed)
    b = group * prompts
    prompt = np.repeat(rng.integers(3, 259, (prompts, prompt_len)), group, axis=0)
    prompt_mask = np.ones_like(prompt)
    prompt_mask[:group, :2] = 0  # the first prompt is left-padded
    prompt = np.where(prompt_mask == 1, prompt, 0)
    resp = rng.integers(3, 259, (b, new))
    lengths = rng.integers(2, new + 1, b)
    resp_mask = (np.arange(new)[None] < lengths[:, None]).astype(np.int32)
    resp = np.where(resp_mask == 1, resp, 0)
    rollout = {
        "input_ids": jnp.asarray(np.concatenate([prompt, resp], 1), jnp.int32),
        "attention_mask": jnp.asarray(np.concatenate([prompt_mask, resp_mask], 1), jnp.int32),
        "response_mask": jnp.asarray(resp_mask),
        "finished": jnp.asarray(lengths < new),
    }
    return rollout, jnp.asarray(rng.normal(size=b), jnp.float32)


def _online_step(name, folder, coef, *, share_prompt):
    spec = ALGORITHMS[name]
    overrides = ["num_generations=4", "prompts_per_iteration=2", "mini_batch_size=8"]
    overrides.append(f"share_prompt={str(share_prompt).lower()}")
    cfg = C.load_config(spec.config, f"configs/{name}_tiny.yaml", overrides)
    model_cfg, base, _ = _base(folder, coef)
    rollout, scores = _online_inputs()
    prompt_len = 6
    trainable, adapters = spec.init_trainable(
        cfg, key=jax.random.PRNGKey(0), base=base, model_cfg=model_cfg, reward_model=None
    )
    optimizer = make_optimizer(cfg.optim, 10)
    state = init_train_state(trainable, optimizer, jax.random.PRNGKey(1))
    prepare = spec.make_prepare(cfg, model_cfg=model_cfg, adapters=adapters, prompt_len=prompt_len)
    update = spec.make_update(
        cfg, model_cfg=model_cfg, adapters=adapters, optimizer=optimizer, prompt_len=prompt_len
    )
    batch, _ = jax.jit(prepare)(trainable, base, rollout, scores, 0.0)
    _, metrics = jax.jit(update)(state, base, batch, jnp.arange(8))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if share_prompt:
        packed = pack_groups(ids, mask, prompt_len, 4)
        aux = _aux_of(
            base,
            packed["input_ids"],
            packed["attention_mask"],
            model_cfg,
            positions=packed["positions"],
            segment_ids=packed["segment_ids"],
        )
    else:
        aux = _aux_of(base, ids, mask, model_cfg)
    return jax.device_get(metrics), aux


@pytest.mark.slow  # 10 compiled updates
@pytest.mark.parametrize(
    ("name", "share_prompt"), [*((n, False) for n in ONLINE), ("rloo", True), ("grpo", True)]
)
def test_online_policy_losses_add_coef_times_aux_loss(name, share_prompt, moe_folders):
    folder = moe_folders["mixtral"]
    with_c, aux = _online_step(name, folder, COEF, share_prompt=share_prompt)
    without, _ = _online_step(name, folder, 0.0, share_prompt=share_prompt)
    _check_step(with_c, without, aux)


def test_ppo_loss_adds_coef_times_the_policy_aux_loss(moe_folders):
    folder = moe_folders["qwen3_moe"]
    rollout, _ = _online_inputs()
    lora = LoraConfig(r=4, alpha=8)
    value_lora = LoraConfig(r=4, alpha=8, modules_to_save=("value",))
    hyper = P.PPOConfig(
        lora=lora,
        value_lora=value_lora,
        generation=C.GenerationConfig(temperature=1.0),
        reward_funcs=(RewardFuncConfig(fn="char_share", kwargs={"chars": "abc"}),),
    )
    adapters = P.Adapters(policy=lora, value=value_lora)
    resp = rollout["response_mask"]
    minibatch = {
        **rollout,
        "old_logprobs": jnp.full(resp.shape, -5.0),
        "advantages": jnp.ones(resp.shape),
        "old_values": jnp.zeros(resp.shape),
        "returns": jnp.ones(resp.shape),
    }
    out = {}
    for coef in (COEF, 0.0):
        model_cfg, base, _ = _base(folder, coef)
        trainable = {
            "policy": init_lora(jax.random.PRNGKey(1), base, lora, model_cfg),
            "value": init_lora(jax.random.PRNGKey(2), base, value_lora, model_cfg),
        }
        loss_fn = jax.jit(
            lambda t, base=base, model_cfg=model_cfg: P.ppo_loss(
                t, minibatch, base, model_cfg=model_cfg, adapters=adapters, cfg=hyper, prompt_len=6
            )
        )
        loss, metrics = loss_fn(trainable)
        out[coef] = float(loss), jax.device_get(metrics)
    aux = _aux_of(base, rollout["input_ids"], rollout["attention_mask"], model_cfg)
    np.testing.assert_allclose(out[COEF][0] - out[0.0][0], COEF * aux, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out[COEF][1]["aux_loss"], aux, rtol=1e-5)
    assert out[COEF][1]["loss/total"] == pytest.approx(out[COEF][0])
    assert "aux_loss" not in out[0.0][1]


def test_dense_models_are_unaffected(tmp_path):
    """A dense base: no router, no term, no `aux_loss` metric, whatever the option says."""
    folder = save_tiny_family("llama", tmp_path / "llama")
    metrics, _ = _preference_step("rm", folder, None, share_prompt=False, dense=True)
    metrics_0, _ = _preference_step("rm", folder, 0.0, share_prompt=False, dense=True)
    assert "aux_loss" not in metrics and set(metrics) == set(metrics_0)
    for key, value in metrics.items():
        np.testing.assert_array_equal(value, metrics_0[key], err_msg=key)
