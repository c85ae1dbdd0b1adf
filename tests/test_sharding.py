"""Multi-device equals single-device: on the 8 simulated CPU devices, one reward-model step,
one PPO update and one DPO step give the same loss, metrics and updated adapters on every
mesh shape as on one device; params, adapters, optimizer state and batches really are split
(shard shapes, and per-device FLOPs of the compiled step); a checkpoint restores onto another
mesh shape; `run_rm` end to end on a 2x2x2 mesh equals the one-device run.

The steps are wrapped exactly as the commands wrap them (`ShardedStep` with the state's
`tree_shardings`, the frozen base's, and "micro_batch"/"batch" for batches). The tiny model
has every sharded dimension divisible by 8: vocab 264, hidden 64, mlp 128, q 8x8, kv 4x8.
Tolerances are float32 reassociation (the sharded programs sum in another order), no more.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.tasks import case_preference_rows

from jaxrlhf import data as D
from jaxrlhf.algorithms import dpo as DPO
from jaxrlhf.algorithms import ppo as P
from jaxrlhf.algorithms import reward_model as R
from jaxrlhf.algorithms.common import TrainState, init_train_state
from jaxrlhf.commands.common import micro_batches
from jaxrlhf.commands.dpo import dpo_batch
from jaxrlhf.commands.rm import pair_batch
from jaxrlhf.config import OptimConfig
from jaxrlhf.lora import LoraConfig, init_lora
from jaxrlhf.models.byte_tokenizer import byte_tokenizer
from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.transformer import init_params
from jaxrlhf.sharding import (
    MeshConfig,
    ShardedStep,
    make_mesh,
    put_tree,
    replicated,
    shard_batch,
    single_device_mesh,
    tree_shardings,
)
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.optim import make_optimizer

MODEL = tiny_config(
    vocab_size=264,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    head_dim=8,
)
L = MODEL.num_layers
RM_LORA = LoraConfig(r=8, alpha=16, task_type="SEQ_CLS", modules_to_save=("score",))
POLICY_LORA = LoraConfig(r=8, alpha=16)
VALUE_LORA = LoraConfig(r=8, alpha=16, modules_to_save=("value",))
# Adam's first steps move a weight by lr·g/(|g| + eps): a gradient entry at the eps scale (an
# up_proj output whose gate is ~0 on every token has |g| ~ 1e-8) turns a 1e-10 difference from
# summing in another order into a 1e-5 change of the weight. eps = 1e-6 keeps the update
# linear in such tiny gradients, so the comparison tests sharding, not Adam's conditioning.
ADAM_EPS = 1e-6
OPTIM = OptimConfig(learning_rate=1e-3, schedule="constant", max_grad_norm=1.0, eps=ADAM_EPS)
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rm_tiny.yaml"
BUCKET = 48  # packed pairs of the case rows below are <= 47 tokens: one bucket
RTOL, ATOL = 1e-4, 1e-5
# LLVM's optimisations off: compiling dominates this file on a 2-core host, and the
# partitioned HLO (what this file tests) is the same. `run_rm` below compiles as usual.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def mesh_of(shape):
    data, fsdp, tensor = shape
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def assert_trees_close(actual, expected, what: str) -> None:
    actual, expected = jax.device_get(actual), jax.device_get(expected)
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
    ):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
            np.testing.assert_array_equal(a, b, err_msg=f"{what}{jax.tree_util.keystr(path)}")
        else:
            np.testing.assert_allclose(
                a, b, rtol=RTOL, atol=ATOL, err_msg=f"{what}{jax.tree_util.keystr(path)}"
            )


@functools.cache
def base() -> dict:
    # jit: one compiled program instead of dozens of eager ops (slow on a loaded 2-core host)
    return jax.device_get(jax.jit(init_params, static_argnums=1)(jax.random.PRNGKey(0), MODEL))


def adapter(seed: int, lora_cfg: LoraConfig) -> dict:
    """A fresh adapter with non-zero B (so A gets gradients too; with B = 0 it has none)."""

    def build(key, params):
        lora = init_lora(jax.random.fold_in(key, 0), params, lora_cfg, MODEL)
        layers = {
            name: {
                **ab,
                "lora_B": 0.2
                * jax.random.normal(jax.random.fold_in(key, i + 1), ab["lora_B"].shape),
            }
            for i, (name, ab) in enumerate(sorted(lora["layers"].items()))
        }
        return {**lora, "layers": layers}

    return jax.device_get(jax.jit(build)(jax.random.PRNGKey(seed), base()))


def train_state(trainable, optimizer, seed: int) -> TrainState:
    return jax.device_get(
        jax.jit(lambda t, k: init_train_state(t, optimizer, k))(trainable, jax.random.PRNGKey(seed))
    )


@functools.cache
def preferences() -> D.PreferenceData:
    prefs, _ = D.tokenize_preferences(
        case_preference_rows(16, seed=5), byte_tokenizer(), max_length=BUCKET
    )
    return prefs


def run_sharded(fn, state, frozen, batch, batch_kind: str, extras=(), *, mesh):
    """One call of `fn(state, frozen, batch, *extras)` as the commands run it on `mesh`:
    (new state, metrics, the compiled program). `extras`: (host array, "batch" or
    "replicated") pairs."""
    state = jax.device_put(state, tree_shardings(state, mesh))
    state_sh = tree_shardings(state, mesh)
    frozen = put_tree(frozen, mesh)
    extra_sh = tuple(replicated(mesh) if kind == "replicated" else kind for _, kind in extras)
    step = ShardedStep(
        fn,
        mesh=mesh,
        arg_shardings=(state_sh, tree_shardings(frozen, mesh), batch_kind, *extra_sh),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,),
    )
    batch = shard_batch(batch, mesh, batch_axis=1 if batch_kind == "micro_batch" else 0)
    extra_args = tuple(
        shard_batch(x, mesh) if kind == "batch" else jax.device_put(x, replicated(mesh))
        for x, kind in extras
    )
    args = (state, frozen, batch, *extra_args)
    compiled = step.jitted(*args).lower(*args).compile(compiler_options=FAST_COMPILE)
    new_state, metrics = compiled(*args)
    return new_state, metrics, compiled


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def check_against_single_device(case: str, shape) -> None:
    """Run `case` on one device (cached) and on `shape`: the same metrics and new state, the
    state still split, and each device doing a fraction of the work."""
    single = single_device_result(case)
    mesh = mesh_of(shape)
    state, metrics, compiled = run_case(case, mesh)
    assert_trees_close(metrics, single["metrics"], f"{case} metrics on {shape}: ")
    assert_trees_close(state, single["state"], f"{case} state on {shape}: ")
    # Still sharded after the step (the out_shardings), i.e. training continues split.
    for leaf, sh in zip(
        jax.tree.leaves(state), jax.tree.leaves(tree_shardings(state, mesh)), strict=True
    ):
        assert leaf.sharding == sh
    # The work really is split: each device runs a fraction of the single-device FLOPs.
    ratio = flops(compiled) / single["flops"]
    assert ratio < 0.5, f"{case} on {shape}: per-device FLOPs are {ratio:.2f} of one device's"


@functools.cache
def single_device_result(case: str) -> dict:
    state, metrics, compiled = run_case(case, single_device_mesh())
    return {
        "state": jax.device_get(state),
        "metrics": jax.device_get(metrics),
        "flops": flops(compiled),
    }


# ----------------------------------------------------------------------------- the cases
# Each returns, on the host: (step fn, state, frozen, batch, batch kind[, extras]) with
# extras ((array, "batch" | "replicated"), ...) for the arguments after the batch.


@functools.cache
def rm_case():
    optimizer = make_optimizer(OPTIM, 10)
    state = train_state(adapter(1, RM_LORA), optimizer, 3)
    batch = pair_batch(
        preferences(), np.arange(8), pad_id=0, buckets=(BUCKET,), batch_size=8, share_prompt=True
    )
    step = R.make_train_step(model_cfg=MODEL, lora_cfg=RM_LORA, optimizer=optimizer)
    return step, state, base(), micro_batches(batch, 1), "micro_batch"


@functools.cache
def ppo_case():
    """An update on 8 of 16 rollouts; the experience is computed once on one device from
    random sequences (so old log-probs are the policy's own: ratios start at 1)."""
    prompt_len, n_new, n = 8, 8, 16
    adapters = P.Adapters(policy=POLICY_LORA, value=VALUE_LORA)
    hyper = P.PPOHyper()
    trainable = {"policy": adapter(1, POLICY_LORA), "value": adapter(2, VALUE_LORA)}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, MODEL.vocab_size, (n, prompt_len + n_new)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:4, :3] = 0  # left-padded prompts
    resp = np.ones((n, n_new), np.int32)
    resp[::3, 5:] = 0  # responses that stopped early
    mask[:, prompt_len:] = resp
    rollout = {"input_ids": ids, "attention_mask": mask, "response_mask": resp}
    scores = rng.normal(size=n).astype(np.float32)
    args = (trainable, base(), rollout, scores, np.float32(0.05))
    experience = jax.jit(
        P.make_experience_fn(model_cfg=MODEL, adapters=adapters, hyper=hyper, prompt_len=prompt_len)
    )
    exp, _ = experience.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)
    optimizer = make_optimizer(OPTIM, 10)
    state = train_state(trainable, optimizer, 5)
    update = P.make_update_fn(
        model_cfg=MODEL,
        adapters=adapters,
        hyper=hyper,
        optimizer=optimizer,
        prompt_len=prompt_len,
        micro_batches=1,
    )
    indices = rng.permutation(n)[:8].astype(np.int32)
    # commands/ppo.py splits the minibatch indices over the batch axes like the experience.
    return update, state, base(), jax.device_get(exp), "batch", ((indices, "batch"),)


@functools.cache
def dpo_case():
    optimizer = make_optimizer(OPTIM, 10)
    state = train_state(adapter(1, POLICY_LORA), optimizer, 3)
    batch = dpo_batch(
        preferences(), np.arange(8), pad_id=0, buckets=(BUCKET,), batch_size=8, share_prompt=True
    )
    step = DPO.make_train_step(model_cfg=MODEL, lora_cfg=POLICY_LORA, optimizer=optimizer)
    return step, state, base(), micro_batches(batch, 1), "micro_batch"


CASES = {"rm": rm_case, "ppo": ppo_case, "dpo": dpo_case}


def run_case(case: str, mesh):
    return run_sharded(*CASES[case](), mesh=mesh)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_reward_model_step_matches_single_device(shape):
    check_against_single_device("rm", shape)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_ppo_update_matches_single_device(shape):
    check_against_single_device("ppo", shape)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_dpo_step_matches_single_device(shape):
    check_against_single_device("dpo", shape)


# ----------------------------------------------------------------------------- placement


def shard_shapes(tree) -> dict:
    """{'layers/q_proj/kernel': per-device shard shape} of a placed tree."""
    return {
        "/".join(
            str(getattr(k, "key", getattr(k, "name", k))) for k in path
        ): leaf.sharding.shard_shape(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_params_adapters_optimizer_and_batches_are_split():
    """Shard shapes on three meshes: kernels by their logical axes, LoRA A like its kernel's
    input axis and B like its output axis, Adam moments like their params, batches over
    data x fsdp. (Projections are stacked over layers: [L, in, out].)"""
    _, state, frozen, batch, _ = rm_case()

    def placed(shape):
        mesh = mesh_of(shape)
        return (
            shard_shapes(put_tree(frozen, mesh)),
            shard_shapes(jax.device_put(state, tree_shardings(state, mesh))),
            shard_batch(batch, mesh, batch_axis=1),
        )

    # tensor=8: heads / kv_heads / mlp / vocab split 8 ways; embed whole.
    base_sh, state_sh, mb = placed((1, 1, 8))
    assert base_sh["layers/q_proj/kernel"] == (L, 64, 8)
    assert base_sh["layers/k_proj/kernel"] == (L, 64, 4)
    assert base_sh["layers/o_proj/kernel"] == (L, 8, 64)
    assert base_sh["layers/gate_proj/kernel"] == (L, 64, 16)
    assert base_sh["layers/down_proj/kernel"] == (L, 16, 64)
    assert base_sh["embed"] == (33, 64)
    assert base_sh["lm_head/kernel"] == (64, 33)
    assert state_sh["trainable/layers/q_proj/lora_A"] == (L, 64, 8)  # input axis: embed
    assert state_sh["trainable/layers/q_proj/lora_B"] == (L, 8, 8)  # output axis: heads
    assert state_sh["trainable/layers/o_proj/lora_A"] == (L, 8, 8)  # input axis: heads
    assert state_sh["trainable/layers/o_proj/lora_B"] == (L, 8, 64)
    assert state_sh["trainable/layers/down_proj/lora_A"] == (L, 16, 8)
    assert state_sh["trainable/score/kernel"] == (64, 1)
    for moment in ("mu", "nu"):
        adam = {k.split(f"/{moment}/", 1)[1]: v for k, v in state_sh.items() if f"/{moment}/" in k}
        assert adam["layers/q_proj/lora_B"] == (L, 8, 8)
        assert adam["layers/o_proj/lora_A"] == (L, 8, 8)
    assert mb["packed_input_ids"].sharding.shard_shape(mb["packed_input_ids"].shape) == (
        1,
        8,
        BUCKET,
    )  # tensor parallelism alone: every device sees the whole batch

    # fsdp=8: the embed axis split; the batch too.
    base_sh, state_sh, mb = placed((1, 8, 1))
    assert base_sh["layers/q_proj/kernel"] == (L, 8, 64)
    assert base_sh["layers/o_proj/kernel"] == (L, 64, 8)
    assert base_sh["embed"] == (264, 8)
    assert base_sh["layers/input_norm/scale"] == (L, 8)
    assert state_sh["trainable/layers/q_proj/lora_A"] == (L, 8, 8)
    assert state_sh["trainable/layers/q_proj/lora_B"] == (L, 8, 64)
    assert state_sh["trainable/layers/o_proj/lora_B"] == (L, 8, 8)
    assert state_sh["trainable/score/kernel"] == (8, 1)
    assert mb["packed_input_ids"].sharding.shard_shape(mb["packed_input_ids"].shape) == (
        1,
        1,
        BUCKET,
    )

    # 2x2x2: fsdp and tensor on different axes of one kernel; batch over data x fsdp = 4.
    base_sh, state_sh, mb = placed((2, 2, 2))
    assert base_sh["layers/q_proj/kernel"] == (L, 32, 32)
    assert base_sh["embed"] == (132, 32)
    assert state_sh["trainable/layers/q_proj/lora_A"] == (L, 32, 8)
    assert state_sh["trainable/layers/q_proj/lora_B"] == (L, 8, 32)
    for key in ("packed_input_ids", "chosen_last", "pair_mask"):
        shape = mb[key].shape
        assert mb[key].sharding.shard_shape(shape) == (1, 2, *shape[2:]), key


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_restores_onto_other_mesh_shapes(tmp_path):
    """Saved from data=8 (and from tensor=8, where leaves really are split), restored into
    the shardings of other meshes: same values, the target's shardings."""
    _, state, _, _, _ = rm_case()
    for source, targets in (((8, 1, 1), ((1, 1, 8), (2, 2, 2))), ((1, 1, 8), ((1, 8, 1),))):
        src_mesh = mesh_of(source)
        saved = jax.device_put(state, tree_shardings(state, src_mesh))
        ckpt = Checkpointer(tmp_path / "x".join(map(str, source)))
        ckpt.save(3, saved, {"data_position": 24})
        for target in targets:
            shardings = tree_shardings(state, mesh_of(target))
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
            )
            restored, meta, step = ckpt.restore(abstract)
            assert step == 3 and meta == {"data_position": 24}
            for got, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
                assert got.sharding == sh, (source, target)
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)
        ckpt.close()


# ----------------------------------------------------------------------------- end to end


def test_run_rm_on_2x2x2_mesh_matches_one_device(tmp_path, capsys):
    from jaxrlhf.commands.rm import run_rm
    from jaxrlhf.config import RMConfig, load_config

    tiny = (
        "{vocab_size: 264, hidden_size: 64, intermediate_size: 128, num_layers: 2, "
        "num_heads: 8, num_kv_heads: 4, head_dim: 8}"
    )
    rows = case_preference_rows(64, seed=1)

    def run(name, *mesh):
        cfg = load_config(
            RMConfig,
            CONFIG,
            [
                f"run.run_dir={tmp_path / name}",
                f"model.tiny={tiny}",
                "max_steps=3",
                "batch_size=8",
                f"data.max_length={BUCKET}",
                f"data.length_buckets=[{BUCKET}]",
                "data.eval_fraction=0",
                f"optim.eps={ADAM_EPS}",
                "run.progress=false",
                "run.tensorboard=false",
                *mesh,
            ],
        )
        return run_rm(cfg, source=rows)

    single = run("single", "mesh.data=1")
    capsys.readouterr()
    sharded = run("mesh222", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    out = capsys.readouterr().out
    assert "mesh: data=2, fsdp=2, tensor=2 (8 devices)" in out
    assert "per-device bytes: frozen params" in out
    q_b = sharded["trainable"]["layers"]["q_proj"]["lora_B"]
    assert q_b.sharding.shard_shape(q_b.shape) == (L, 8, 32)
    assert_trees_close(sharded["trainable"], single["trainable"], "run_rm adapter: ")
