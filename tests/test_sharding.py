"""Multi-device equals single-device: on the 8 simulated CPU devices, one reward-model step,
one PPO update and one DPO step give the same loss, metrics and updated adapters on every
mesh shape as on one device; params, adapters, optimizer state and batches really are split
(shard shapes, and per-device FLOPs of the compiled step); a checkpoint restores onto another
mesh shape; `run_rm` end to end on a 2x2x2 mesh equals the one-device run; the KV-cache
sampler on every mesh shape gives the one-device tokens and log-probs with its cache split
over rows (data x fsdp) and kv heads (tensor).

The steps are wrapped exactly as the commands wrap them (`ShardedStep` with the state's
`tree_shardings`, the frozen base's, and "micro_batch"/"batch" for batches). The tiny model
has every sharded dimension divisible by 8: vocab 264, hidden 64, mlp 128, q 8x8, kv 4x8.
Tolerances are float32 reassociation (the sharded programs sum in another order), no more.
"""

from __future__ import annotations

import dataclasses
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
from jaxrlhf.config import GenerationConfig, OptimConfig
from jaxrlhf.data import pair_batch
from jaxrlhf.lora import LoraConfig, init_lora
from jaxrlhf.models.byte_tokenizer import byte_tokenizer
from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.transformer import init_cache, init_params, split_cache_layers
from jaxrlhf.rewards import RewardFuncConfig
from jaxrlhf.rollout import Sampler
from jaxrlhf.rollout import sampling as sampling_mod
from jaxrlhf.rollout.sampling import SamplingConfig, make_generate_fn
from jaxrlhf.sharding import (
    MeshConfig,
    ShardedStep,
    batch_sharding,
    kv_cache_sharding,
    make_mesh,
    put_tree,
    replicated,
    shard_batch,
    single_device_mesh,
    tree_shardings,
)
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.setup import micro_batches

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
    step = R.make_train_step(R.RMConfig(lora=RM_LORA), model_cfg=MODEL, optimizer=optimizer)
    return step, state, base(), micro_batches(batch, 1), "micro_batch"


@functools.cache
def ppo_case():
    """An update on 8 of 16 rollouts; the experience is computed once on one device from
    random sequences (so old log-probs are the policy's own: ratios start at 1)."""
    prompt_len, n_new, n = 8, 8, 16
    adapters = P.Adapters(policy=POLICY_LORA, value=VALUE_LORA)
    hyper = P.PPOConfig(
        lora=POLICY_LORA,
        value_lora=VALUE_LORA,
        generation=GenerationConfig(temperature=1.0),
        reward_funcs=(RewardFuncConfig(fn="char_share", kwargs={"chars": "abc"}),),
    )
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
        P.make_experience_fn(hyper, model_cfg=MODEL, adapters=adapters, prompt_len=prompt_len)
    )
    exp, _ = experience.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)
    optimizer = make_optimizer(OPTIM, 10)
    state = train_state(trainable, optimizer, 5)
    update = P.make_update_fn(
        hyper, model_cfg=MODEL, adapters=adapters, optimizer=optimizer, prompt_len=prompt_len
    )
    indices = rng.permutation(n)[:8].astype(np.int32)
    # commands/ppo.py splits the minibatch indices over the batch axes like the experience.
    return update, state, base(), jax.device_get(exp), "batch", ((indices, "batch"),)


@functools.cache
def dpo_case():
    optimizer = make_optimizer(OPTIM, 10)
    state = train_state(adapter(1, POLICY_LORA), optimizer, 3)
    batch = pair_batch(
        preferences(), np.arange(8), pad_id=0, buckets=(BUCKET,), batch_size=8, share_prompt=True
    )
    step = DPO.make_train_step(
        DPO.DPOConfig(lora=POLICY_LORA), model_cfg=MODEL, optimizer=optimizer
    )
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
    from jaxrlhf.algorithms.reward_model import RMConfig
    from jaxrlhf.config import load_config
    from jaxrlhf.train.runs import run_rm

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


# ----------------------------------------------------------------------------- sampling
# 8 kv heads (16 query heads of 4): on every mesh below the cache splits over its rows or
# its kv heads (MODEL's 4 kv heads would stay whole on tensor=8).
SAMPLE_MODEL = tiny_config(
    vocab_size=264,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=16,
    num_kv_heads=8,
    head_dim=4,
)
ROWS, PROMPT, NEW = 8, 6, 6
GREEDY = SamplingConfig(max_new_tokens=NEW, eos_token_ids=(2,), pad_token_id=0, greedy=True)


@functools.cache
def sample_params() -> dict:
    return jax.device_get(
        jax.jit(init_params, static_argnums=1)(jax.random.PRNGKey(1), SAMPLE_MODEL)
    )


def sample_prompts(rows: int = ROWS, length: int = PROMPT, seed: int = 0):
    """Left-padded prompts with 1..length real tokens (ids >= 3: no pad/bos/eos inside)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, SAMPLE_MODEL.vocab_size, (rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(rows):
        mask[row, : row % length] = 0
    return ids * mask, mask


@functools.cache
def single_device_sample():
    ids, mask = sample_prompts()
    out = make_generate_fn(SAMPLE_MODEL, GREEDY)(sample_params(), ids, mask, jax.random.key(0))
    return jax.device_get(out)


def assert_samples_close(actual, expected, what: str) -> None:
    actual, expected = jax.device_get(actual), jax.device_get(expected)
    for name in ("tokens", "response_mask", "finished"):
        np.testing.assert_array_equal(
            getattr(actual, name), getattr(expected, name), err_msg=f"{what}{name}"
        )
    np.testing.assert_allclose(
        actual.logprobs, expected.logprobs, rtol=RTOL, atol=ATOL, err_msg=f"{what}logprobs"
    )


def spy_on_cache(monkeypatch) -> dict:
    """Record, at compile time, the shardings the partitioner gave the KV cache after the
    prefill and as the decode loop carries it (`jax.debug.inspect_array_sharding`)."""
    seen: dict = {}

    def record(name, x):
        jax.debug.inspect_array_sharding(x, callback=lambda sh: seen.__setitem__(name, sh))

    real_prefill, real_decode = sampling_mod.prefill, sampling_mod.decode_step

    def prefill(*args, **kwargs):
        logits, cache = real_prefill(*args, **kwargs)
        record("prefill_k", cache.k)
        return logits, cache

    def decode_step(params, tokens, positions, cache, **kwargs):
        record("k", cache.k[0])  # the decode loop carries one array per layer
        record("v", cache.v[-1])
        record("valid", cache.valid)
        return real_decode(params, tokens, positions, cache, **kwargs)

    monkeypatch.setattr(sampling_mod, "prefill", prefill)
    monkeypatch.setattr(sampling_mod, "decode_step", decode_step)
    return seen


def count_traces(monkeypatch) -> list:
    traces: list = []
    real_generate = sampling_mod.generate

    def counting_generate(*args, **kwargs):
        traces.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sampling_mod, "generate", counting_generate)
    return traces


def test_kv_cache_sharding_rules():
    """Rows over data x fsdp, kv heads over tensor; a dimension the axes do not divide
    (MODEL's 4 kv heads on tensor=8, 6 rows on data x fsdp = 4) stays whole."""
    cache = jax.eval_shape(lambda: init_cache(MODEL, 8, 12))  # k, v: [L, 8, 4, 12, 8]
    kv = (L, 8, 4, 12, 8)

    def shapes(shape, cache=cache):
        sh = kv_cache_sharding(cache, mesh_of(shape))
        return (
            sh.k.shard_shape(cache.k.shape),
            sh.v.shard_shape(cache.v.shape),
            sh.valid.shard_shape(cache.valid.shape),
            sh.index.shard_shape(()),
        )

    assert shapes((8, 1, 1)) == ((L, 1, 4, 12, 8),) * 2 + ((1, 12), ())
    assert shapes((1, 8, 1)) == ((L, 1, 4, 12, 8),) * 2 + ((1, 12), ())
    assert shapes((1, 1, 8)) == (kv, kv, (8, 12), ())  # 4 kv heads: not split 8 ways
    assert shapes((2, 2, 2)) == ((L, 2, 2, 12, 8),) * 2 + ((2, 12), ())
    odd = jax.eval_shape(lambda: init_cache(MODEL, 6, 12))
    assert shapes((2, 2, 2), odd)[0] == (L, 6, 2, 12, 8)
    # Per-layer caches (what the decode loop carries): each layer's array alike.
    split = kv_cache_sharding(jax.eval_shape(split_cache_layers, cache), mesh_of((2, 2, 2)))
    assert [sh.shard_shape((8, 4, 12, 8)) for sh in split.k] == [(2, 2, 12, 8)] * L


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_greedy_generation_matches_single_device_with_split_cache(shape, monkeypatch):
    """`make_generate_fn(mesh=...)`: the one-device tokens and log-probs; the KV cache in
    the compiled loop split by rows over data x fsdp and kv heads over tensor; the outputs
    split by rows; new values of the same shapes reuse the one compiled program."""
    expected = single_device_sample()  # before the spies: they record one compilation
    seen, traces = spy_on_cache(monkeypatch), count_traces(monkeypatch)
    mesh = mesh_of(shape)
    data, fsdp, tensor = shape
    fn = make_generate_fn(SAMPLE_MODEL, GREEDY, mesh=mesh)
    params = put_tree(sample_params(), mesh)
    ids, mask = sample_prompts()
    batch = shard_batch({"ids": ids, "mask": mask}, mesh)
    out = fn(params, batch["ids"], batch["mask"], jax.random.key(0))
    assert_samples_close(out, expected, f"generate on {shape}: ")

    rows, heads = ROWS // (data * fsdp), SAMPLE_MODEL.num_kv_heads // tensor
    slots, hd = PROMPT + NEW, SAMPLE_MODEL.head_dim
    layer_shape = (ROWS, SAMPLE_MODEL.num_kv_heads, slots, hd)
    stacked = seen["prefill_k"].shard_shape((SAMPLE_MODEL.num_layers, *layer_shape))
    assert stacked == (SAMPLE_MODEL.num_layers, rows, heads, slots, hd)
    for name in ("k", "v"):
        assert seen[name].shard_shape(layer_shape) == (rows, heads, slots, hd)
    assert seen["valid"].shard_shape((ROWS, slots)) == (rows, slots)
    for name, x in out._asdict().items():
        assert x.sharding.is_equivalent_to(batch_sharding(mesh, x.ndim), x.ndim), name
        assert x.sharding.shard_shape(x.shape) == (rows, *x.shape[1:]), name

    # Host arrays, other values, another key: the same program.
    fn(sample_params(), ids[::-1].copy(), mask[::-1].copy(), jax.random.key(1))
    assert len(traces) == 1 and fn.num_programs() == 1


def test_sharded_generate_constraints_buckets_and_odd_batches(monkeypatch):
    """On 2x2x2: the program pins k and v explicitly (fresh cache, after the prefill, every
    decode step) rather than leaving them to propagation; another prompt bucket is one more
    program; a batch that data x fsdp does not divide runs with whole rows (as `shard_batch`
    places it) and gives the same results."""
    expected = jax.tree.map(lambda x: x[:6], single_device_sample())
    traces = count_traces(monkeypatch)
    mesh = mesh_of((2, 2, 2))
    fn = make_generate_fn(SAMPLE_MODEL, GREEDY, mesh=mesh)
    params = put_tree(sample_params(), mesh)
    ids, mask = sample_prompts()
    fn(params, ids, mask, jax.random.key(0))
    long_ids, long_mask = sample_prompts(length=PROMPT + 2, seed=1)
    fn(params, long_ids, long_mask, jax.random.key(0))
    fn(params, long_ids[::-1].copy(), long_mask[::-1].copy(), jax.random.key(2))
    assert len(traces) == 2 and fn.num_programs() == 2
    odd = shard_batch({"ids": ids[:6], "mask": mask[:6]}, mesh)
    out = fn(params, odd["ids"], odd["mask"], jax.random.key(0))
    assert_samples_close(out, expected, "6 rows on 2x2x2: ")
    assert out.tokens.sharding.is_fully_replicated
    assert fn.num_programs() == 3

    args = (params, ids, mask, jax.random.key(0), None, np.float32(1.0))
    text = fn.jitted_for(*args).lower(*args).as_text()
    m = SAMPLE_MODEL
    layer_dims = (ROWS, m.num_kv_heads, PROMPT + NEW, m.head_dim)

    def pinned(dims):
        kv_type = f"tensor<{'x'.join(map(str, dims))}xf32>"
        return [
            line
            for line in text.splitlines()
            if ("sharding_constraint" in line or "@Sharding" in line) and kv_type in line
        ]

    stacked, per_layer = pinned((m.num_layers, *layer_dims)), pinned(layer_dims)
    assert len(stacked) >= 4, text  # k and v: init, prefill
    assert len(per_layer) >= 4 * m.num_layers, text  # every layer's k and v: split, loop
    if "sdy.sharding_constraint" in text:  # Shardy (the default partitioner)
        assert all('[{}, {"data", "fsdp"}, {"tensor"}, {}, {}]' in line for line in stacked)
        assert all('[{"data", "fsdp"}, {"tensor"}, {}, {}]' in line for line in per_layer)


def test_sampler_on_mesh_matches_single_device():
    """`rollout.Sampler` given the run's mesh (as ppo/grpo give it): the merged
    policy comes out in the base's shardings, and merged and unmerged rollouts on 2x2x2
    equal the one-device rollout (same key: the same sampled tokens)."""
    mesh = mesh_of((2, 2, 2))
    lora_cfg = LoraConfig(r=4, alpha=8)
    frozen = sample_params()
    policy = jax.device_get(
        jax.jit(
            lambda k: jax.tree.map(
                lambda x: 0.2 * jax.random.normal(k, x.shape),
                init_lora(k, frozen, lora_cfg, SAMPLE_MODEL),
            )
        )(jax.random.PRNGKey(3))
    )
    ids, mask = sample_prompts()
    key = jax.random.PRNGKey(4)

    def sampler(mesh, merge_adapter=True):
        return Sampler(
            SAMPLE_MODEL,
            GenerationConfig(max_new_tokens=NEW, temperature=0.9, merge_adapter=merge_adapter),
            lora_cfg=lora_cfg,
            eos_token_ids=(2,),
            pad_token_id=0,
            mesh=mesh,
        )

    expected = dataclasses.asdict(
        jax.device_get(
            sampler(None)(policy, frozen, {"input_ids": ids, "attention_mask": mask}, key)
        )
    )
    placed_frozen, placed_policy = put_tree(frozen, mesh), put_tree(policy, mesh)
    prompts = shard_batch({"input_ids": ids, "attention_mask": mask}, mesh)
    merged_sampler = sampler(mesh)
    merged = merged_sampler.merged(placed_frozen, placed_policy)
    for leaf, sh in zip(
        jax.tree.leaves(merged), jax.tree.leaves(tree_shardings(merged, mesh)), strict=True
    ):
        assert leaf.sharding == sh
    for name, s in (("merged", merged_sampler), ("unmerged", sampler(mesh, False))):
        got = dataclasses.asdict(jax.device_get(s(placed_policy, placed_frozen, prompts, key)))
        for k in ("input_ids", "attention_mask", "response_mask", "tokens", "finished"):
            np.testing.assert_array_equal(got[k], expected[k], err_msg=f"{name} {k}")
        np.testing.assert_allclose(
            got["sampler_logprobs"], expected["sampler_logprobs"], rtol=RTOL, atol=ATOL
        )
