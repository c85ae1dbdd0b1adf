"""K reward models trained at once on one frozen base (`ensemble_size`): the stacked step is
K single-adapter runs, each member exports as a PEFT adapter, and the ensemble scores."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tasks import case_preference_rows
from test_reward_model import jaxrlhf_scores, relative_error, text_batch, torch_scores

from jaxrlhf import data as D
from jaxrlhf.algorithms import reward_model as R
from jaxrlhf.algorithms.common import init_train_state
from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.config import RewardModelSection, load_config
from jaxrlhf.lora import adapter_member, split_trainable, stack_adapters
from jaxrlhf.models.base import load_base
from jaxrlhf.rollout import Rollout
from jaxrlhf.sharding import MeshConfig, make_mesh, put_tree
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.runs import run_rm
from jaxrlhf.train.scoring import Scorer
from jaxrlhf.train.setup import micro_batches

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rm_tiny.yaml"
K = 2


def cfg_for(run_dir, *overrides: str) -> RMConfig:
    return load_config(
        RMConfig,
        CONFIG,
        [
            f"run.run_dir={run_dir}",
            "mesh.data=1",
            "run.progress=false",
            "run.eval_every=1000",
            "run.save_every=1000",
            "batch_size=8",
            "max_steps=6",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A K-member ensemble run (no held-out split)."""
    root = tmp_path_factory.mktemp("ensemble")
    rows = case_preference_rows(48, seed=5)
    ens = run_rm(cfg_for(root / "ens", f"ensemble_size={K}", "data.eval_fraction=0"), source=rows)
    return root, ens


def test_stacked_step_equals_the_single_adapter_steps():
    """The vmapped step of K stacked adapters, each on its own batch, gives each adapter's
    own step: losses, gradient norms and updated adapters (fp32 rounding apart)."""
    cfg = cfg_for("unused")
    model_cfg, base, tokenizer = load_base(cfg.model, seed=0)
    prefs, _ = D.tokenize_preferences(case_preference_rows(32, seed=5), tokenizer, max_length=64)
    optimizer = make_optimizer(cfg.optim, 10)
    step = R.make_train_step(cfg, model_cfg=model_cfg, optimizer=optimizer)
    states = [
        init_train_state(
            split_trainable(jax.random.PRNGKey(k), base, model_cfg, cfg.lora, heads=("score",))[0],
            optimizer,
            jax.random.PRNGKey(10 + k),
        )
        for k in range(K)
    ]
    batches = [
        D.pair_batch(prefs, np.arange(8 * k, 8 * k + 8), pad_id=0, buckets=(32, 64), batch_size=8,
                     share_prompt=True)
        for k in range(K)
    ]  # fmt: skip
    singles = [
        jax.jit(step)(st, base, micro_batches(b, 1)) for st, b in zip(states, batches, strict=True)
    ]
    stacked_batch = micro_batches(D.stack_batches(batches, pad_id=0), 1, axis=1)
    new, metrics = jax.jit(jax.vmap(step, in_axes=(0, None, 0)))(
        stack_adapters(states), base, stacked_batch
    )
    for k, (single_state, single_metrics) in enumerate(singles):
        for name in ("loss", "accuracy", "grad_norm"):
            np.testing.assert_allclose(metrics[name][k], single_metrics[name], rtol=1e-5)
        for a, b in zip(
            jax.tree.leaves(adapter_member(new.trainable, k)),
            jax.tree.leaves(single_state.trainable),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_each_member_exports_a_peft_adapter_that_scores_the_same(runs, tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from jaxrlhf.models.loading import save_hf_folder

    root, ens = runs
    out = root / "ens" / "adapter"
    assert json.loads((out / "ensemble.json").read_text()) == {
        "members": [f"member_{k}" for k in range(K)]
    }
    assert (out / "stacked.safetensors").is_file()
    cfg = cfg_for(root / "ens")
    model_cfg, base, tokenizer = load_base(cfg.model, seed=cfg.run.seed)
    save_hf_folder(base, model_cfg, tmp_path / "base")
    ids, mask = text_batch(tokenizer)
    stacked = jax.device_get(ens["trainable"])
    for k in range(K):
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "base", num_labels=1
        )
        model = peft.PeftModel.from_pretrained(hf, out / f"member_{k}").eval()
        member = jax.tree.map(lambda x, k=k: x[k], stacked)
        ours = jaxrlhf_scores(base, member, cfg.lora.scale, model_cfg, ids, mask)
        assert relative_error(ours, torch_scores(model, ids, mask)) <= 1e-4


def test_ensemble_eval_reports_members_and_the_mean(tmp_path):
    rows = case_preference_rows(48, seed=5)
    out = run_rm(cfg_for(tmp_path, f"ensemble_size={K}", "data.eval_fraction=0.25"), source=rows)
    ev = out["eval"]
    for k in range(K):
        assert 0.0 <= ev[f"member_{k}/accuracy"] <= 1.0
    assert {"accuracy", "loss", "rewards/margin"} <= set(ev)


def test_ensemble_needs_lora():
    with pytest.raises(ValueError, match="ensemble_size > 1 stacks LoRA adapters"):
        RMConfig(lora=None, ensemble_size=2)


def test_conservative_rewards_on_fixed_numbers():
    scores = jnp.asarray([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]])  # K=2 members, B=3
    np.testing.assert_allclose(R.combine_ensemble(scores, rule="mean"), [2.0, 0.0, 0.0])
    # population std of (1, 3) is 1, of (0, 0) is 0, of (2, -2) is 2
    np.testing.assert_allclose(
        R.combine_ensemble(scores, rule="mean_minus_std", coef=0.5), [1.5, 0.0, -1.0]
    )
    np.testing.assert_allclose(R.combine_ensemble(scores, rule="min"), [1.0, 0.0, -2.0])


@pytest.mark.parametrize("rule", ["mean", "mean_minus_std", "min"])
def test_scorer_reads_an_ensemble_in_one_pass(runs, rule):
    """`reward_model.path` at an ensemble folder: the K members are stacked and scored in one
    vmapped pass; the reward is their combination, each member as loaded alone."""
    root, _ = runs
    cfg = cfg_for(root / "ens")
    model_cfg, base_host, tokenizer = load_base(cfg.model, seed=cfg.run.seed)
    mesh = make_mesh(MeshConfig(data=1))
    base = put_tree(base_host, mesh)
    ids, mask = text_batch(tokenizer)
    rollout = Rollout(
        input_ids=jnp.asarray(ids),
        attention_mask=jnp.asarray(mask),
        response_mask=jnp.asarray(mask[:, -1:]),
        sampler_logprobs=jnp.zeros(mask[:, -1:].shape),
        finished=jnp.ones(ids.shape[:1], bool),
        tokens=jnp.asarray(ids[:, -1:]),
    )

    def scorer(path, **kw):
        section = RewardModelSection(path=str(path), **kw)
        return Scorer(model_cfg=model_cfg, frozen=base, mesh=mesh, section=section, funcs=(),
                      tokenizer=tokenizer, missing_eos_penalty=None)  # fmt: skip

    ens = scorer(root / "ens" / "adapter", ensemble=rule, ensemble_coef=0.5)
    assert ens.rm.members == K
    got, metrics, _ = ens(rollout, [""] * len(ids), {})
    each = np.stack(
        [np.asarray(scorer(root / "ens" / "adapter" / f"member_{k}").reward_model(
            rollout.input_ids, rollout.attention_mask)) for k in range(K)]
    )  # fmt: skip
    expected = R.combine_ensemble(jnp.asarray(each), rule=rule, coef=0.5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert metrics["rewards/ensemble_std"] > 0  # the members disagree
