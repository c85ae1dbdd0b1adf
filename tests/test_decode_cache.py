"""The KV cache the decode loop carries: heads before slots, one array per layer.

`split_cache_layers` must change only where the keys live, not what a step computes: a
decode step over per-layer arrays gives the stacked cache's logits and writes the same
keys/values, bit for bit (the same products in the same order; only the slicing is gone).
Both engines' tokens against a full forward are covered in test_sampling/test_continuous."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.transformer import (
    init_cache,
    init_params,
    split_cache_layers,
    stack_cache_layers,
    unstack_layers,
)
from jaxrlhf.rollout.sampling import decode_step, prefill

# GQA (4 query heads on 2 kv heads), Qwen2's q/k/v biases and Qwen3's per-head q/k norms.
FAMILIES = {
    "llama": dict(),
    "qwen2": dict(attention_bias=True),
    "qwen3": dict(qk_norm="head"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_split_cache_decode_equals_stacked(family):
    cfg = tiny_config(num_heads=4, num_kv_heads=2, num_layers=3, **FAMILIES[family])
    params = init_params(jax.random.PRNGKey(0), cfg)
    params = {**params, "layers": unstack_layers(params["layers"])}
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 3, cfg.vocab_size)
    mask = jnp.ones_like(ids).at[0, :2].set(0)  # one left-padded row
    _, stacked = prefill(params, ids, mask, cfg=cfg, cache_length=9)
    split = split_cache_layers(stacked)
    assert split.k[0].shape == (3, cfg.num_kv_heads, 9, cfg.head_dim)
    step = jax.jit(lambda p, t, pos, c: decode_step(p, t, pos, c, cfg=cfg))
    tokens, positions = jnp.array([5, 6, 7]), mask.sum(-1)
    for i in range(3):
        want, stacked = step(params, tokens + i, positions + i, stacked)
        got, split = step(params, tokens + i, positions + i, split)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"step {i}")
    back = stack_cache_layers(split)
    for name in ("k", "v", "valid", "index"):
        np.testing.assert_array_equal(np.asarray(getattr(back, name)), getattr(stacked, name))


def test_cache_layout_is_heads_before_slots():
    cfg = tiny_config(num_heads=4, num_kv_heads=2, num_layers=3)
    cache = init_cache(cfg, batch=2, length=6)
    assert cache.k.shape == (3, 2, cfg.num_kv_heads, 6, cfg.head_dim)
    assert split_cache_layers(split_cache_layers(cache)).k[2].shape == cache.k.shape[1:]
