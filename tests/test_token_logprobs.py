"""Chunked token log-probs (no [B, T, V] log-softmax) against a plain full log-softmax:
values, entropies and gradients for the hidden states and the output kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.transformer import token_logprobs

B, T, D, V = 2, 11, 8, 37


def _inputs(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = jax.random.normal(k1, (B, T, D))
    kernel = jax.random.normal(k2, (D, V)) * 0.5
    targets = jax.random.randint(k3, (B, T), 0, V)
    return hidden, kernel, targets


def _plain(hidden, kernel, targets, temperature):
    logits = jnp.einsum("btd,dv->btv", hidden, kernel) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return picked, entropy


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 128])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_gradients_equal_a_full_log_softmax(chunk_size, temperature):
    hidden, kernel, targets = _inputs()
    weights = jax.random.normal(jax.random.PRNGKey(9), (B, T))

    def chunked(h, k, with_entropy=False):
        lp, ent = token_logprobs(
            {"embed": k.T, "lm_head": {"kernel": k}},
            h,
            targets,
            temperature=temperature,
            chunk_size=chunk_size,
            with_entropy=with_entropy,
        )
        return lp, ent

    lp, ent = chunked(hidden, kernel, with_entropy=True)
    ref_lp, ref_ent = _plain(hidden, kernel, targets, temperature)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_ent), atol=1e-5)
    no_ent, none = chunked(hidden, kernel)
    assert none is None
    np.testing.assert_allclose(np.asarray(no_ent), np.asarray(ref_lp), atol=1e-5)

    for with_entropy in (False, True):
        got = jax.grad(_loss, argnums=(0, 1))(
            hidden, kernel, weights, with_entropy, lambda h, k, e=with_entropy: chunked(h, k, e)
        )
        want = jax.grad(_loss, argnums=(0, 1))(
            hidden,
            kernel,
            weights,
            with_entropy,
            lambda h, k: _plain(h, k, targets, temperature),
        )
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
        # the kernel frozen (LoRA, the reference): the hidden states' gradient by the other rule
        got_h = jax.grad(_loss)(
            hidden, kernel, weights, with_entropy, lambda h, k, e=with_entropy: chunked(h, k, e)
        )
        np.testing.assert_allclose(np.asarray(got_h), np.asarray(want[0]), atol=1e-5, rtol=1e-5)


def _loss(h, k, weights, with_entropy, fn):
    lp, ent = fn(h, k)
    return jnp.sum(weights * lp) + (0.3 * jnp.sum(ent) if with_entropy else 0.0)


def _plain_capped(hidden, kernel, targets, temperature, cap):
    z = jnp.einsum("btd,dv->btv", hidden, kernel)
    return _plain_logits(cap * jnp.tanh(z / cap) / temperature, targets)


def _plain_logits(logits, targets):
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@pytest.mark.parametrize("cap", [None, 3.0])
def test_a_metric_entropy_has_the_values_and_no_gradient(cap):
    """`entropy_grad=False`: the same log-probs and entropy, and the gradient of a loss that
    adds the entropy is the gradient of the log-probs alone (the entropy is a logged metric),
    for a trained and a frozen kernel."""
    hidden, kernel, targets = _inputs(1)
    weights = jax.random.normal(jax.random.PRNGKey(4), (B, T))
    temperature = 0.8

    def plain(h, k):
        if cap is None:
            return _plain(h, k, targets, temperature)
        return _plain_capped(h, k, targets, temperature, cap)

    def metric(h, k):
        return token_logprobs(
            {"embed": k.T, "lm_head": {"kernel": k}},
            h,
            targets,
            temperature=temperature,
            chunk_size=4,
            with_entropy=True,
            entropy_grad=False,
            logit_softcap=cap,
        )

    lp, ent = metric(hidden, kernel)
    ref_lp, ref_ent = plain(hidden, kernel)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_ent), atol=1e-5)

    def stopped(h, k):
        lp, ent = plain(h, k)
        return lp, jax.lax.stop_gradient(ent)

    got = jax.grad(_loss, argnums=(0, 1))(hidden, kernel, weights, True, metric)
    want = jax.grad(_loss, argnums=(0, 1))(hidden, kernel, weights, True, stopped)
    with_ent = jax.grad(_loss, argnums=(0, 1))(hidden, kernel, weights, True, plain)
    for g, w, e in zip(got, want, with_ent, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
        assert np.abs(np.asarray(w) - np.asarray(e)).max() > 1e-3  # the entropy's part is real
    got_h = jax.grad(_loss)(hidden, kernel, weights, True, metric)  # the kernel frozen
    np.testing.assert_allclose(np.asarray(got_h), np.asarray(want[0]), atol=1e-5, rtol=1e-5)


def test_a_bf16_kernel_gives_the_float32_gradients_to_bf16_accuracy():
    """A bf16 base, its LM head frozen (LoRA) or trained: the log-probs and the gradients,
    whose vocabulary products take the probabilities (or the logits' cotangent) in bf16 with
    a float32 sum, follow the float32 computation on the same bf16-representable inputs."""
    hidden, kernel, targets = _inputs(2)
    hidden = hidden.astype(jnp.bfloat16)
    kernel = (kernel * 4).astype(jnp.bfloat16)  # peaked softmaxes: probabilities near 1 and 0
    weights = jax.random.normal(jax.random.PRNGKey(5), (B, T))

    def chunked(h, k):
        return token_logprobs(
            {"embed": k.T, "lm_head": {"kernel": k}}, h, targets, temperature=0.7, chunk_size=4
        )

    def plain(h, k):
        return _plain(h.astype(jnp.float32), k.astype(jnp.float32), targets, 0.7)

    lp, _ = chunked(hidden, kernel)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(plain(hidden, kernel)[0]), atol=2e-5)
    got = jax.grad(_loss)(hidden, kernel, weights, False, chunked)
    want = np.asarray(jax.grad(_loss)(hidden, kernel, weights, False, plain), np.float32)
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - want)
    assert err.max() <= 2.0**-7 * np.abs(want).max(), err.max() / np.abs(want).max()
    # a trained kernel (full fine-tuning): the cotangent of the logits in bf16, as PyTorch's
    got_hk = jax.grad(_loss, argnums=(0, 1))(hidden, kernel, weights, False, chunked)
    want_hk = jax.grad(_loss, argnums=(0, 1))(hidden, kernel, weights, False, plain)
    for g, w in zip(got_hk, want_hk, strict=True):
        assert g.dtype == jnp.bfloat16
        w = np.asarray(w, np.float32)
        err = np.abs(np.asarray(g, np.float32) - w)
        assert err.max() <= 2.0**-7 * np.abs(w).max(), err.max() / np.abs(w).max()
