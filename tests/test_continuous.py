"""The continuous-batching engine against the static `Sampler` with per-sequence streams."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.lora import LoraConfig, init_lora
from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.transformer import init_params
from jaxrlhf.rollout.continuous import ContinuousEngine, static_slot_occupancy
from jaxrlhf.rollout.engine import Sampler

PAD = 0
# Many stop ids make lengths vary: each sampled token stops a row with probability ~ 18/256.
EOS = tuple(range(2, 20))
N = 12
SLOTS = 3
LENGTHS = (7, 3, 5, 1, 6, 2, 7, 4, 3, 5)
LORA = LoraConfig(r=4, alpha=8.0)


def gen(temperature=1.0, **kw):
    fields = dict(max_new_tokens=N, temperature=temperature, top_k=0, top_p=1.0)
    fields.update(merge_adapter=True, max_rank=None)
    fields.update(kw)
    return SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    params = init_params(jax.random.PRNGKey(0), cfg)
    # A sharper head: clear greedy margins and sampled rows that differ from one another.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 8.0
    return cfg, params


def make_prompts(lengths, width=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.integers(20, 256, n)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def engines(cfg, g, lora_cfg=None, slots=SLOTS, **kw):
    common = dict(lora_cfg=lora_cfg, eos_token_ids=EOS, pad_token_id=PAD)
    static = Sampler(cfg, g, per_sequence_rng=True, **common)
    return static, ContinuousEngine(cfg, g, slots=slots, **common, **kw)


def assert_same_rollout(a, b):
    for name in ("input_ids", "attention_mask", "response_mask", "tokens", "finished"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    # Same math over different batch shapes (B rows vs one slot): float32 rounding only.
    np.testing.assert_allclose(
        np.asarray(a.sampler_logprobs), np.asarray(b.sampler_logprobs), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_same_tokens_as_static_sampler(model, temperature):
    cfg, params = model
    static, engine = engines(cfg, gen(temperature))
    prompts, key = make_prompts(LENGTHS), jax.random.PRNGKey(3)
    want = static(params, None, prompts, key)
    got = engine(params, None, prompts, key)
    assert_same_rollout(want, got)
    lengths = np.asarray(got.response_mask).sum(1)
    # The workload really mixes EOS stops and rows cut at the budget.
    assert np.asarray(got.finished).any() and not np.asarray(got.finished).all()
    assert len(set(lengths.tolist())) > 2
    m = engine.last_metrics
    assert m.sequences == len(LENGTHS) and m.response_tokens == lengths.sum()
    assert m.prefills == len(LENGTHS) and engine.num_programs() == 2
    assert m.truncation_rate == pytest.approx(np.mean(~np.asarray(got.finished)))


@pytest.mark.parametrize("refill_at", [1, 3])
def test_batched_prefill_gives_the_same_rollout(model, refill_at):
    """`prefill_batch=3`: the first fill of the 3 slots runs as one prefill of 3 prompts;
    with `refill_at=3` the decode loop waits for 3 free slots and every refill is one call of
    3 (the last ones one by one). Same rollout, one program more."""
    cfg, params = model
    static, engine = engines(cfg, gen(), prefill_batch=3, refill_at=refill_at)
    prompts, key = make_prompts(LENGTHS * 2, seed=2), jax.random.PRNGKey(3)
    got = engine(params, None, prompts, key)
    assert_same_rollout(static(params, None, prompts, key), got)
    assert engine.num_programs() == 3 and engine.last_metrics.prefills == 2 * len(LENGTHS)
    m, lengths = engine.last_metrics, np.asarray(got.response_mask).sum(1)
    assert round(m.slot_occupancy * SLOTS * m.decode_steps) == np.sum(lengths - 1)


def test_static_per_sequence_streams_do_not_depend_on_the_batch(model):
    """Row b draws from fold_in(key, b): the first 4 rows sample the same alone as in 10."""
    cfg, params = model
    static, _ = engines(cfg, gen())
    prompts, key = make_prompts(LENGTHS), jax.random.PRNGKey(5)
    full = static(params, None, prompts, key)
    part = static(params, None, {k: v[:4] for k, v in prompts.items()}, key)
    np.testing.assert_array_equal(np.asarray(full.tokens)[:4], np.asarray(part.tokens))


def test_budgets_cut_rows_as_the_static_sampler_would(model):
    """Row b with budget n_b: the static row's first n_b tokens, nothing after; finished only
    if an EOS came within them."""
    cfg, params = model
    static, engine = engines(cfg, gen())
    prompts, key = make_prompts(LENGTHS), jax.random.PRNGKey(4)
    budgets = np.array([1, 12, 3, 7, 2, 12, 5, 1, 9, 4])
    want = static(params, None, prompts, key)
    got = engine(params, None, prompts, key, budgets=budgets)
    keep = np.arange(N)[None, :] < budgets[:, None]
    want_mask = np.asarray(want.response_mask) * keep
    np.testing.assert_array_equal(np.asarray(got.response_mask), want_mask)
    np.testing.assert_array_equal(
        np.asarray(got.tokens), np.where(want_mask == 1, np.asarray(want.tokens), PAD)
    )
    eos_within = (np.isin(np.asarray(want.tokens), EOS) & (want_mask == 1)).any(1)
    np.testing.assert_array_equal(np.asarray(got.finished), eos_within)
    assert engine.last_metrics.truncation_rate == pytest.approx(np.mean(~eos_within))


def test_compiles_once_per_slots_and_cache_length(model):
    cfg, params = model
    _, engine = engines(cfg, gen(), prompt_length=8)
    for i, lengths in enumerate([LENGTHS, (2, 5, 1), (4,) * 7]):
        width = max(lengths) + i % 2  # batches of different widths, left-padded to 8
        engine(params, None, make_prompts(lengths, width, seed=i), jax.random.PRNGKey(i))
    assert engine.num_programs() == 2  # prefill-a-slot and decode-until-free
    other = ContinuousEngine(
        cfg, gen(), lora_cfg=None, eos_token_ids=EOS, pad_token_id=PAD, slots=SLOTS + 1
    )
    other(params, None, make_prompts(LENGTHS), jax.random.PRNGKey(0))
    assert other.num_programs() == 2


def test_refilled_slots_beat_static_occupancy(model):
    """Slot-steps that advanced a live row: each emits one token after the prefill's token 0,
    so occupancy x slots x decode steps = sum(length - 1) exactly."""
    cfg, params = model
    static, engine = engines(cfg, gen())
    prompts, key = make_prompts(LENGTHS * 3, seed=1), jax.random.PRNGKey(6)
    got = engine(params, None, prompts, key)
    lengths = np.asarray(got.response_mask).sum(1)
    m = engine.last_metrics
    assert round(m.slot_occupancy * SLOTS * m.decode_steps) == np.sum(lengths - 1)
    # A static batch of SLOTS rows at a time steps each group until its longest row stops.
    groups = [lengths[i : i + SLOTS] for i in range(0, len(lengths), SLOTS)]
    static_steps = sum(int(g.max()) - 1 for g in groups)
    static_occ = np.sum(lengths - 1) / (SLOTS * static_steps)
    assert m.slot_occupancy > static_occ
    assert m.decode_steps < static_steps
    whole = static(params, None, prompts, key)
    assert m.slot_occupancy > static_slot_occupancy(whole.response_mask)
    assert 0.0 < m.prefill_share < 1.0 and m.tokens_per_second > 0


@pytest.mark.parametrize("merge_adapter", [True, False], ids=["merged", "unmerged"])
def test_lora_policy_matches_static(model, merge_adapter):
    cfg, params = model
    lora = init_lora(jax.random.PRNGKey(1), params, LORA, cfg)
    # A trained-looking adapter: B nonzero, so the policy differs from the base.
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.3 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
            if getattr(p[-1], "key", None) == "lora_B"
            else x
        ),
        lora,
    )
    g = gen(merge_adapter=merge_adapter, max_rank=None if merge_adapter else 8)
    static, engine = engines(cfg, g, lora_cfg=LORA)
    prompts, key = make_prompts(LENGTHS), jax.random.PRNGKey(7)
    want = static(lora, params, prompts, key)
    assert_same_rollout(want, engine(lora, params, prompts, key))
    base = engines(cfg, gen())[0](params, None, prompts, key)
    assert not np.array_equal(np.asarray(base.tokens), np.asarray(want.tokens))


@pytest.mark.parametrize("slots", [1, 3, 4])
def test_prompt_repeats_prefill_each_prompt_once(model, slots):
    """Groups of 3 copies: each prompt runs through the model once and its cache is copied to
    the other copies' slots, also after the first copy's row has stopped (1 slot); the
    rollout is the static sampler's with its own prefix sharing."""
    cfg, params = model
    static, engine = engines(cfg, gen(), slots=slots)
    prompts = make_prompts(LENGTHS[:4])
    prompts = {k: np.repeat(v, 3, axis=0) for k, v in prompts.items()}
    key = jax.random.PRNGKey(8)
    want = static(params, None, prompts, key, prompt_repeats=3)
    got = engine(params, None, prompts, key, prompt_repeats=3)
    assert_same_rollout(want, got)
    assert engine.last_metrics.prefills == 4
    assert engine.num_programs() == 3  # prefill, decode, copy a prompt's cache
    # Copies of a prompt sample independently.
    assert not np.array_equal(np.asarray(got.tokens)[0], np.asarray(got.tokens)[1])
    with pytest.raises(ValueError, match="prompt_repeats"):
        engine(params, None, make_prompts(LENGTHS[:6]), key, prompt_repeats=3)


def test_bad_input_names_the_option(model):
    cfg, params = model
    with pytest.raises(ValueError, match="slots"):
        ContinuousEngine(cfg, gen(), lora_cfg=None, eos_token_ids=EOS, pad_token_id=PAD, slots=0)
    with pytest.raises(ValueError, match="prefill_batch"):
        engines(cfg, gen(), prefill_batch=SLOTS + 1)
    with pytest.raises(ValueError, match="refill_at"):
        engines(cfg, gen(), refill_at=0)
    _, engine = engines(cfg, gen(), prompt_length=4)
    with pytest.raises(ValueError, match="prompt_length"):
        engine(params, None, make_prompts(LENGTHS), jax.random.PRNGKey(0))
    _, engine = engines(cfg, gen())
    with pytest.raises(ValueError, match="budgets"):
        engine(params, None, make_prompts((2, 3)), jax.random.PRNGKey(0), budgets=[0, 3])
    with pytest.raises(ValueError, match="left-padded"):
        bad = make_prompts((2, 3))
        bad["attention_mask"][:, -1] = 0
        engine(params, None, bad, jax.random.PRNGKey(0))


def test_jnp_prompts_and_rollout_types(model):
    cfg, params = model
    _, engine = engines(cfg, gen())
    prompts = {k: jnp.asarray(v) for k, v in make_prompts(LENGTHS[:4]).items()}
    out = engine(params, None, prompts, jax.random.PRNGKey(0))
    assert out.input_ids.shape == (4, 7 + N) and out.input_ids.dtype == jnp.int32
    assert out.sampler_logprobs.dtype == jnp.float32 and out.finished.dtype == bool


def test_on_a_mesh_matches_static_sampler_on_the_mesh(model):
    """Params sharded by their logical axes, prompts over the batch axes, as the online driver
    places them: both engines on a data=2 x fsdp=2 x tensor=2 mesh give the same rollout."""
    from jaxrlhf.sharding import MeshConfig, make_mesh, put_tree, shard_batch

    cfg, params = model
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = put_tree(params, mesh)
    prompts = shard_batch(make_prompts(LENGTHS[:8]), mesh)
    common = dict(lora_cfg=None, eos_token_ids=EOS, pad_token_id=PAD, mesh=mesh)
    static = Sampler(cfg, gen(), per_sequence_rng=True, **common)
    engine = ContinuousEngine(cfg, gen(), slots=SLOTS, **common)
    key = jax.random.PRNGKey(9)
    got = engine(sharded, None, prompts, key)
    assert_same_rollout(static(sharded, None, prompts, key), got)
    assert got.tokens.sharding.is_equivalent_to(prompts["input_ids"].sharding, 2)


@pytest.mark.slow
def test_device_script_cpu_smoke():
    """`benchmarks/device.sh --cpu-smoke` runs the accelerator script's benchmark end to end on
    the CPU (2M config, bf16) and writes its results and tables."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    env["XLA_FLAGS"] = ""  # one CPU device, as the benchmarks run
    done = subprocess.run(
        [str(root / "benchmarks" / "device.sh"), "--cpu-smoke"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((root / "benchmarks/results/quick/device_2M.json").read_text())
    assert result["dtype"] == "bfloat16"
    engines = [(r["engine"], r["slots"]) for r in result["rows"]]
    assert engines == [("static", 16), ("continuous", 4), ("continuous", 8)]
    assert all(r["programs"] == 3 for r in result["rows"][1:])  # + the batched prefill
    assert "| continuous | 4 |" in (root / "benchmarks/results/quick/device.md").read_text()
