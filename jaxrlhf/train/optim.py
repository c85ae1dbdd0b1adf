"""The optimizer: AdamW with warmup then cosine/linear/constant decay, and global-norm clipping.

Gradient accumulation is not an optimizer wrapper here: a train step scans over its
micro-batches and applies one update (see `accumulate_gradients`), so no accumulator state is
stored and every optimizer step is one compiled call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    total_steps = max(int(total_steps), 1)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    warmup = min(warmup, total_steps - 1) if total_steps > 1 else 0
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup]
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    chain = []
    if cfg.max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    )
    return optax.chain(*chain)


def accumulate_gradients(
    loss_fn: Callable, trainable: Any, micro_batches: Any, *extra: Any
) -> tuple[Any, dict]:
    """Mean gradient and metrics of `loss_fn(trainable, micro_batch, *extra) -> (loss, metrics)`
    over the leading axis of `micro_batches` (a scan, so memory is one micro-batch's)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n = jax.tree.leaves(micro_batches)[0].shape[0]
    if n == 1:
        (_, metrics), grads = grad_fn(
            trainable, jax.tree.map(lambda x: x[0], micro_batches), *extra
        )
        return grads, metrics

    def body(acc, mb):
        (_, metrics), grads = grad_fn(trainable, mb, *extra)
        return jax.tree.map(jnp.add, acc, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    grads, metrics = jax.lax.scan(body, zeros, micro_batches)
    return (
        jax.tree.map(lambda g: g / n, grads),
        jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics),
    )


def split_micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] for `accumulate_gradients`."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(
                f"batch of {x.shape[0]} is not divisible into {n} micro-batches "
                f"(optim.grad_accum_steps)"
            )
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, batch)
