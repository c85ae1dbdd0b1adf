"""Several adapters in one batch: each row names its adapter (0: none, the reference), and
its logits and tokens are those it gets when that adapter (or the bare base) runs alone."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.lora import (
    LoraConfig,
    concat_adapters,
    init_lora,
    row_scales,
    stack_adapters,
)
from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.transformer import forward, init_params
from jaxrlhf.rollout.continuous import ContinuousEngine
from jaxrlhf.rollout.engine import Sampler, generate_with_adapters

PAD = 0
EOS = tuple(range(2, 20))  # many stop ids: response lengths vary
N = 10
LORA = LoraConfig(r=4, alpha=8.0)
# 10 rows over the base (0) and two adapters (1, 2), mixed in no particular order.
IDS = np.array([1, 0, 2, 2, 1, 0, 1, 2, 0, 1], np.int32)
LENGTHS = (7, 3, 5, 1, 6, 2, 7, 4, 3, 5)


def gen(temperature=1.0, **kw):
    fields = dict(max_new_tokens=N, temperature=temperature, top_k=0, top_p=1.0)
    fields.update(merge_adapter=False, max_rank=None)
    fields.update(kw)
    return SimpleNamespace(**fields)


def trained(adapter, seed):
    """A trained-looking adapter: B nonzero, so it moves the model away from the base."""
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    flat_paths = jax.tree_util.tree_flatten_with_path(adapter)[0]
    out = [
        x + 0.3 * jax.random.normal(k, x.shape) if path[-1].key == "lora_B" else x
        for (path, x), k in zip(flat_paths, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    params = init_params(jax.random.PRNGKey(0), cfg)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 8.0  # clear greedy margins
    adapters = [
        trained(init_lora(jax.random.PRNGKey(10 + i), params, LORA, cfg), seed=20 + i)
        for i in range(2)
    ]
    return cfg, params, adapters


def make_prompts(lengths, width=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.integers(20, 256, n)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def sampler(cfg, g, lora_cfg=LORA):
    return Sampler(
        cfg, g, lora_cfg=lora_cfg, eos_token_ids=EOS, pad_token_id=PAD, per_sequence_rng=True
    )


def rows_of(prompts, rows):
    return {k: v[rows] for k, v in prompts.items()}


def alone(cfg, params, adapters, prompts, key, ids, g):
    """Each adapter (and the base) sampling only its own rows, each row on the stream it has
    in the mixed batch (`sequence_ids`): what the mixed batch must reproduce row by row."""
    out = {}
    for a in range(len(adapters) + 1):
        rows = np.flatnonzero(ids == a)
        if a == 0:
            engine, policy, frozen = sampler(cfg, g, lora_cfg=None), params, None
        else:
            engine, policy, frozen = sampler(cfg, g), adapters[a - 1], params
        got = engine(policy, frozen, rows_of(prompts, rows), key, sequence_ids=rows)
        out[a] = (rows, got)
    return out


def assert_rows_equal(mixed, pieces, rtol=1e-5):
    for rows, got in pieces.values():
        for name in ("tokens", "response_mask", "finished", "input_ids"):
            np.testing.assert_array_equal(
                np.asarray(getattr(mixed, name))[rows], np.asarray(getattr(got, name)), name
            )
        # Same math on a different batch: float32 rounding only (as the engine tests).
        np.testing.assert_allclose(
            np.asarray(mixed.sampler_logprobs)[rows],
            np.asarray(got.sampler_logprobs),
            rtol=rtol,
            atol=1e-5,
        )


def test_full_forward_rows_equal_each_adapter_alone(model):
    """The uncached forward (stacked layers, scan): logits of row b with adapter ids[b] are
    those of the model with that adapter alone; a row with id 0 gets the base's exactly."""
    cfg, params, adapters = model
    prompts = make_prompts(LENGTHS)
    ids_bt, mask_bt = (jnp.asarray(prompts[k]) for k in ("input_ids", "attention_mask"))
    stacked = stack_adapters(adapters)
    lora = concat_adapters(stacked)
    scales = row_scales(IDS, jnp.full((2,), LORA.scale), LORA.r)
    mixed = forward(params, ids_bt, mask_bt, cfg=cfg, lora=lora, lora_scale=scales)
    base = forward(params, ids_bt, mask_bt, cfg=cfg)
    for a, adapter in enumerate(adapters, start=1):
        want = forward(params, ids_bt, mask_bt, cfg=cfg, lora=adapter, lora_scale=LORA.scale)
        rows = IDS == a
        np.testing.assert_allclose(mixed[rows], want[rows], rtol=1e-5, atol=1e-5)
        assert not np.allclose(want[rows], base[rows], atol=1e-2)  # the adapters do matter
    # id 0: every delta is an exact zero, x·W + 0 = x·W.
    np.testing.assert_array_equal(np.asarray(mixed[IDS == 0]), np.asarray(base[IDS == 0]))


def test_row_scales_hand_computed():
    """Ids (0, 2, 1) over 2 adapters of rank 2 with scales (0.5, 3): row 0 all zero (the
    base), row 1 adapter 2's columns 2..3 at 3, row 2 adapter 1's columns 0..1 at 0.5."""
    got = row_scales(jnp.array([0, 2, 1]), jnp.array([0.5, 3.0]), 2)
    want = [[0, 0, 0, 0], [0, 0, 3, 3], [0.5, 0.5, 0, 0]]
    np.testing.assert_array_equal(np.asarray(got), np.array(want, np.float32))


def test_concat_adapters_layout(model):
    """Columns k·r .. k·r + r − 1 of the concatenated factors are adapter k's."""
    _, _, adapters = model
    cat = concat_adapters(stack_adapters(adapters))["layers"]["q_proj"]
    for k, adapter in enumerate(adapters):
        cols = slice(k * LORA.r, (k + 1) * LORA.r)
        np.testing.assert_array_equal(
            cat["lora_A"][..., cols], adapter["layers"]["q_proj"]["lora_A"]
        )
        np.testing.assert_array_equal(cat["lora_B"][:, cols], adapter["layers"]["q_proj"]["lora_B"])


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_static_sampler_rows_equal_each_adapter_alone(model, temperature):
    cfg, params, adapters = model
    g = gen(temperature)
    prompts, key = make_prompts(LENGTHS), jax.random.PRNGKey(3)
    engine = sampler(cfg, g)
    mixed = engine(stack_adapters(adapters), params, prompts, key, adapter_ids=IDS)
    assert_rows_equal(mixed, alone(cfg, params, adapters, prompts, key, IDS, g))
    lengths = np.asarray(mixed.response_mask).sum(1)
    assert len(set(lengths.tolist())) > 2  # EOS stops and budget cuts both happen
    # The research API: a list of adapters, stacked for the call.
    again = generate_with_adapters(engine, adapters, params, prompts, key, IDS)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(mixed.tokens))


def test_merged_single_adapter_gives_the_same_tokens(model):
    """The default rollout path merges the adapter (W + s·A·B): other rounding, same tokens."""
    cfg, params, adapters = model
    prompts, key = make_prompts(LENGTHS), jax.random.PRNGKey(4)
    mixed = sampler(cfg, gen(0.0))(stack_adapters(adapters), params, prompts, key, adapter_ids=IDS)
    merged = sampler(cfg, gen(0.0, merge_adapter=True))
    for a in (1, 2):
        rows = np.flatnonzero(IDS == a)
        got = merged(adapters[a - 1], params, rows_of(prompts, rows), key, sequence_ids=rows)
        np.testing.assert_array_equal(np.asarray(mixed.tokens)[rows], np.asarray(got.tokens))


def test_static_compiles_once_per_shape_not_per_mix(model):
    cfg, params, adapters = model
    engine = sampler(cfg, gen())
    stacked = stack_adapters(adapters)
    prompts = make_prompts(LENGTHS)
    for i, ids in enumerate([IDS, np.zeros_like(IDS), np.full_like(IDS, 2), IDS[::-1].copy()]):
        engine(stacked, params, prompts, jax.random.PRNGKey(i), adapter_ids=ids)
    assert engine._generate.num_programs() == 1


def test_max_rank_padding_keeps_the_rollout(model):
    """`generation.max_rank=8` zero-pads the rank-4 stack (A·B unchanged): same tokens."""
    cfg, params, adapters = model
    prompts, key = make_prompts(LENGTHS), jax.random.PRNGKey(2)
    stacked = stack_adapters(adapters)
    want = sampler(cfg, gen(0.0))(stacked, params, prompts, key, adapter_ids=IDS)
    got = sampler(cfg, gen(0.0, max_rank=8))(stacked, params, prompts, key, adapter_ids=IDS)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


def test_adapter_ids_respect_prompt_repeats(model):
    """Groups of 2 copies share one prefill, so they share an adapter; the rows equal the
    adapters alone with the same prefix sharing."""
    cfg, params, adapters = model
    g = gen()
    prompts = {k: np.repeat(v, 2, axis=0) for k, v in make_prompts(LENGTHS[:5]).items()}
    ids = np.repeat(np.array([1, 0, 2, 2, 1], np.int32), 2)
    key = jax.random.PRNGKey(5)
    engine = sampler(cfg, g)
    mixed = engine(
        stack_adapters(adapters), params, prompts, key, adapter_ids=ids, prompt_repeats=2
    )
    for a in (0, 1, 2):
        rows = np.flatnonzero(ids == a)
        e, pol, fro = (
            (sampler(cfg, g, None), params, None) if a == 0 else (engine, adapters[a - 1], params)
        )
        got = e(pol, fro, rows_of(prompts, rows), key, sequence_ids=rows, prompt_repeats=2)
        np.testing.assert_array_equal(np.asarray(mixed.tokens)[rows], np.asarray(got.tokens))
    bad = ids.copy()
    bad[1] = 2
    with pytest.raises(ValueError, match="group"):
        engine(stack_adapters(adapters), params, prompts, key, adapter_ids=bad, prompt_repeats=2)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_continuous_engine_rows_equal_each_adapter_alone(model, temperature):
    """3 slots for 10 rows: slots are refilled with rows of other adapters, each slot's row
    carrying its own id; the rollout is the static mixed batch's and each adapter's alone."""
    cfg, params, adapters = model
    g = gen(temperature)
    prompts, key = make_prompts(LENGTHS), jax.random.PRNGKey(6)
    engine = ContinuousEngine(cfg, g, lora_cfg=LORA, eos_token_ids=EOS, pad_token_id=PAD, slots=3)
    stacked = stack_adapters(adapters)
    mixed = engine(stacked, params, prompts, key, adapter_ids=IDS)
    assert_rows_equal(mixed, alone(cfg, params, adapters, prompts, key, IDS, g))
    assert engine.last_metrics.prefills == len(IDS)
    for i, ids in enumerate([np.zeros_like(IDS), IDS[::-1].copy()]):
        engine(stacked, params, prompts, jax.random.PRNGKey(i), adapter_ids=ids)
    assert engine.num_programs() == 2  # prefill-a-slot and decode-until-free, for any mix


def test_continuous_prompt_repeats_clone_keeps_the_adapter(model):
    cfg, params, adapters = model
    g = gen()
    prompts = {k: np.repeat(v, 3, axis=0) for k, v in make_prompts(LENGTHS[:4]).items()}
    ids = np.repeat(np.array([2, 0, 1, 2], np.int32), 3)
    key = jax.random.PRNGKey(8)
    stacked = stack_adapters(adapters)
    want = sampler(cfg, g)(stacked, params, prompts, key, adapter_ids=ids, prompt_repeats=3)
    engine = ContinuousEngine(cfg, g, lora_cfg=LORA, eos_token_ids=EOS, pad_token_id=PAD, slots=2)
    got = engine(stacked, params, prompts, key, adapter_ids=ids, prompt_repeats=3)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    assert engine.last_metrics.prefills == 4


def test_bad_adapter_input_is_refused(model):
    cfg, params, adapters = model
    stacked = stack_adapters(adapters)
    prompts, key = make_prompts(LENGTHS), jax.random.PRNGKey(0)
    for engine in (
        sampler(cfg, gen()),
        ContinuousEngine(cfg, gen(), lora_cfg=LORA, eos_token_ids=EOS, pad_token_id=PAD, slots=3),
    ):
        with pytest.raises(ValueError, match=r"in \[0, 2\]"):
            engine(stacked, params, prompts, key, adapter_ids=IDS + 1)
        with pytest.raises(ValueError, match=r"adapter_ids must be \[10\]"):
            engine(stacked, params, prompts, key, adapter_ids=IDS[:4])
        with_head = {**stacked, "value": {"kernel": jnp.zeros((2, cfg.hidden_size, 1))}}
        with pytest.raises(ValueError, match="modules_to_save"):
            engine(with_head, params, prompts, key, adapter_ids=IDS)
    full = sampler(cfg, gen(), lora_cfg=None)
    with pytest.raises(ValueError, match="lora_cfg"):
        full(stacked, params, prompts, key, adapter_ids=IDS)


def test_on_a_mesh_equals_one_device(model):
    """data=2 x fsdp=2 x tensor=2, the base sharded by its logical axes, the prompts and ids
    over the batch axes, the stacked adapters replicated: the single-device mixed rollout."""
    from jaxrlhf.sharding import MeshConfig, make_mesh, put_tree, shard_batch

    cfg, params, adapters = model
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    prompts, key, ids = make_prompts(LENGTHS[:8]), jax.random.PRNGKey(9), IDS[:8]
    stacked = stack_adapters(adapters)
    want = sampler(cfg, gen())(stacked, params, prompts, key, adapter_ids=ids)
    on_mesh = Sampler(
        cfg,
        gen(),
        lora_cfg=LORA,
        eos_token_ids=EOS,
        pad_token_id=PAD,
        per_sequence_rng=True,
        mesh=mesh,
    )
    got = on_mesh(stacked, put_tree(params, mesh), shard_batch(prompts, mesh), key, adapter_ids=ids)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(
        np.asarray(got.sampler_logprobs), np.asarray(want.sampler_logprobs), atol=1e-5
    )


@pytest.mark.slow
def test_benchmark_smoke():
    """`benchmarks/multi_adapter.py` on a random 2M model: every variant samples the same
    sequences (all 16 rows equal to their adapter's separate run), one program for the
    mixed batch, and the LoRA-term alternatives agree (asserted inside)."""
    from benchmarks import multi_adapter

    result = multi_adapter.run(model_path=None, size="2M", repeats=1)
    assert result["rows_identical_to_separate_unmerged"] == 16
    assert result["programs_one_batch"] == 1
    assert len(result["variants"]) == 4
    assert "one batch (adapter_ids)" in multi_adapter.render(result)
