"""The optimizer: AdamW with warmup then cosine/linear/constant decay, and global-norm clipping.

Gradient accumulation is not an optimizer wrapper here: a train step scans over its
micro-batches and applies one update (`algorithms.common.accumulate_gradients`), so no
accumulator state is stored and every optimizer step is one compiled call.
"""

from __future__ import annotations

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


def make_optimizer(
    cfg: OptimConfig, total_steps: int, *, skip_nonfinite: bool = False
) -> optax.GradientTransformation:
    """AdamW (clipped) on `learning_rate_schedule`. `skip_nonfinite`: an update whose
    gradients are not finite is dropped (params and Adam moments unchanged)."""
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
    optimizer = optax.chain(*chain)
    if skip_nonfinite:
        # Never let NaNs through, however many steps in a row are skipped.
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=2**31 - 1)
    return optimizer
