"""The host loop shared by every command: step -> log -> eval -> checkpoint, resumable.

A command supplies `train_step(state) -> (state, metrics)` (host code around its jitted
step, including fetching its own batch), `eval_fn(state) -> metrics` and `meta(state)` (the
JSON part of a checkpoint: data position etc.). SIGTERM (or Ctrl-C) finishes the current
step, saves a checkpoint and raises `TrainingInterrupted`; `--resume` picks it up.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from typing import Any

from jaxrlhf.config import RunConfig
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.metrics import MetricsLogger, progress_bar, to_python


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGTERM/SIGINT once the checkpoint of the current step is saved."""


class NonFiniteError(ValueError):
    """A step produced a non-finite loss, gradient or parameter (`run.on_nonfinite: stop`)."""


def nonfinite_metrics(metrics: dict[str, float]) -> list[str]:
    """The names of the metrics that are NaN or infinite."""
    return [k for k, v in metrics.items() if not math.isfinite(v)]


class _StopFlag:
    def __init__(self) -> None:
        self.stop = False
        self._old: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            self.stop = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_loop(
    *,
    state: Any,
    start_step: int,
    total_steps: int,
    train_step: Callable[[Any], tuple[Any, dict]],
    eval_fn: Callable[[Any], dict] | None,
    meta: Callable[[Any], dict],
    run: RunConfig,
    checkpointer: Checkpointer | None,
    logger: MetricsLogger,
    desc: str,
    bar_keys: tuple[str, ...] = ("loss",),
    on_log: Callable[[int, dict], None] | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
) -> Any:
    """Run steps start_step+1 .. total_steps. Returns the final state. `on_log`/`on_eval`
    receive each logged training/evaluation record (the last evaluation is of the final
    state: callers reuse it instead of evaluating again)."""
    bar = progress_bar(total_steps, initial=start_step, desc=desc, enabled=run.progress)
    step, last_saved, skipped = start_step, start_step, 0
    with _StopFlag() as flag:
        while step < total_steps:
            state, metrics = train_step(state)
            step += 1
            bar.update(1)
            host = to_python(metrics)  # every step: the guard reads the step's own metrics
            bad = nonfinite_metrics(host)
            if bad and run.on_nonfinite == "stop":
                bar.close()
                raise NonFiniteError(
                    f"step {step}: {', '.join(f'{k}={host[k]}' for k in bad[:4])} is not "
                    f"finite; the run stopped without saving this step (the newest checkpoint, "
                    f"step {last_saved}, is the last good one). Lower optim.learning_rate, set "
                    f"optim.max_grad_norm, or set run.on_nonfinite=skip_step to drop such updates"
                )
            if bad:  # skip_step: the optimizer dropped the update (optax.apply_if_finite)
                skipped += 1
            host["nonfinite_skipped"] = float(skipped)
            if step % run.log_every == 0 or step == total_steps:
                logger.log(step, host)
                if on_log is not None:
                    on_log(step, host)
                bar.set_postfix({k: f"{host[k]:.4g}" for k in bar_keys if k in host})
            if eval_fn is not None and (step % run.eval_every == 0 or step == total_steps):
                evaluated = eval_fn(state)
                logger.log(step, evaluated, split="eval")
                if on_eval is not None:
                    on_eval(step, evaluated)
            if checkpointer is not None and (
                step % run.save_every == 0 or flag.stop or step == total_steps
            ):
                checkpointer.save(step, state, meta(state), force=True)
                last_saved = step
            if flag.stop:
                bar.close()
                raise TrainingInterrupted(
                    f"interrupted at step {step}; checkpoint saved, continue with --resume"
                )
    bar.close()
    return state


def train_with_evals(
    cfg: Any,
    *,
    state: Any,
    start_step: int,
    total_steps: int,
    train_step: Callable[[Any], tuple[Any, dict]],
    evaluate: Callable[[Any], dict] | None,
    position: Callable[[], int],
    checkpointer: Checkpointer,
    desc: str,
    bar_keys: tuple[str, ...],
    on_log: Callable[[int, dict], None] | None = None,
) -> tuple[Any, dict, dict]:
    """`run_loop` between an evaluation before training (fresh runs) and one after: returns
    (final state, eval before, eval after). The loop's last evaluation is of the final state
    and is reused; a run resumed at its end evaluates once more. `position()` is the data
    position stored in each checkpoint, with the run's signature (`setup.run_signature`)."""
    from jaxrlhf.train.setup import run_signature

    run, signature = cfg.run, run_signature(cfg)
    logger = MetricsLogger(run.run_dir, tensorboard=run.tensorboard)
    initial = evaluate(state) if evaluate is not None and start_step == 0 else {}
    if initial:
        logger.log(0, initial, split="eval")
    last: dict = {}
    try:
        state = run_loop(
            state=state,
            start_step=start_step,
            total_steps=total_steps,
            train_step=train_step,
            eval_fn=evaluate,
            meta=lambda s: {"data_position": position(), "signature": signature},
            run=run,
            checkpointer=checkpointer,
            logger=logger,
            desc=desc,
            bar_keys=bar_keys,
            on_log=on_log,
            on_eval=lambda step, metrics: last.update(metrics),
        )
    finally:
        logger.close()
        checkpointer.close()
    final = last or (evaluate(state) if evaluate is not None else {})
    return state, initial, final
