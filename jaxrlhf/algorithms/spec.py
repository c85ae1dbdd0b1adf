"""What an algorithm hands its driver: one small frozen record of functions per algorithm.

A preference algorithm (`reward_model`, `dpo`, `kto`, `orpo`, `cpo`) is run by
`jaxrlhf.train.preference`; an online one (`ppo`, `grpo`, `rloo`, `reinforce_pp`) by
`jaxrlhf.train.online`. The record names only what is the
algorithm's own — its config class (which is also the static hyperparameters of its steps),
its trainable layout, its compiled steps and its metrics; the driver does the rest (data,
mesh, batches, loop, evaluation, checkpoints, export). Adding an algorithm is one module
that defines its config, its steps and one of these records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceAlgorithm:
    """An algorithm trained on a preference (or unpaired-feedback) dataset."""

    name: str
    """The command: `jaxrlhf NAME`."""
    help: str = ""
    """One line for `jaxrlhf --help`."""
    config: type
    """Its config class (a `config.PreferenceTraining`)."""
    task: Literal["CAUSAL_LM", "SEQ_CLS"]
    """What is exported: a policy (lm head) or a sequence classifier (score head)."""
    heads: tuple[str, ...]
    """Heads the trainable tree adds to the base (e.g. the reward model's `score`)."""
    make_train_step: Callable[..., Callable]
    """`(cfg, *, model_cfg, optimizer) -> step(state, frozen, micro_batches)`."""
    make_eval_step: Callable[..., Callable]
    """`(cfg, *, model_cfg) -> eval(trainable, frozen, batch) -> tuple of [B] arrays`."""
    eval_metrics: Callable[..., dict[str, float]]
    """`(cfg, outputs, pair_mask, margin) -> metrics` over the whole eval set (host)."""
    needs_reference: Callable[[Any], bool] = lambda cfg: False
    """Keep the frozen base in full fine-tuning too, as the reference model."""
    make_reference_step: Callable[..., Callable] | None = None
    """`(cfg, *, model_cfg) -> ref(frozen, batch) -> dict of [B] arrays`, run once over the
    data before training when `precompute_reference(cfg)`; the arrays ride along in every
    batch (by pair index)."""
    precompute_reference: Callable[[Any], bool] = lambda cfg: False
    prepare_rows: Callable[[Any, list], list] | None = None
    """`(cfg, rows) -> rows`: rewrites the loaded rows (train and eval) into preference
    pairs before tokenization (KTO: unpaired feedback → (completion, completion) pairs,
    the second rotated into the KL completion by `prepare_data`)."""
    prepare_data: Callable[[Any, Any], Any] | None = None
    """`(cfg, PreferenceData) -> PreferenceData`: rewrites each tokenized split (train and
    eval, after the split) before training (KTO: each row's KL completion)."""
    block_batches: Callable[[Any], bool] = lambda cfg: False
    """Batches are fixed blocks of consecutive pairs, visited in a shuffled block order
    (`data.block_batch_indices`), instead of the length-grouped order (KTO: the KL
    completions of a batch are its own completions)."""
    summary_keys: tuple[str, ...] = ("loss",)
    """Eval metrics printed before and after training."""
    bar_keys: tuple[str, ...] = ("loss",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterationPlan:
    """How one online iteration is cut into optimizer steps."""

    prompts: int
    """Distinct prompts sampled per iteration."""
    group: int
    """Completions per prompt (consecutive rows)."""
    epochs: int
    """Passes over the iteration's batch."""
    mini_batch: int
    """Rows per optimizer step."""
    iterations: int
    """Iterations in the run."""
    whole_groups: bool = False
    """Shuffle whole groups, so every minibatch holds complete groups."""
    generation_rounds: int = 1
    """Most generation rounds an iteration may run to fill its batch with groups the
    algorithm keeps (`OnlineAlgorithm.keep_groups`: DAPO's dynamic sampling); round r > 1
    samples the next `prompts` of the data order."""

    @property
    def batch(self) -> int:
        return self.prompts * self.group

    @property
    def mini_batches(self) -> int:
        return self.batch // self.mini_batch

    @property
    def optimizer_steps(self) -> int:
        return self.iterations * self.epochs * self.mini_batches


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLControlSettings:
    """The KL penalty's coefficient: fixed, or steered by the adaptive controller (Ziegler et
    al., 2019) towards `target` nats per sequence of the iteration metric `metric`."""

    initial: float
    adaptive: bool = False
    target: float = 6.0
    horizon: float = 10000.0
    metric: str = "objective/kl"
    budget: float | None = None
    """Hold the metric at or under this (`advantages.update_kl_budget`), instead of the
    proportional controller."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineAlgorithm:
    """An online RL algorithm: sample → score → prepare → update."""

    name: str
    """The command: `jaxrlhf NAME`."""
    help: str = ""
    """One line for `jaxrlhf --help`."""
    config: type
    """Its config class (a `config.OnlineTraining`)."""
    plan: Callable[[Any], IterationPlan]
    init_trainable: Callable[..., tuple[Any, Any]]
    """`(cfg, *, key, base, model_cfg, scorer) -> (trainable, adapters)`: the trainable
    tree (with the policy inside) and the adapter configs `make_prepare`/`make_update` need."""
    policy: Callable[[Any], Any]
    """The policy (adapter, or params in full fine-tuning) inside the trainable tree."""
    make_prepare: Callable[..., Callable]
    """`(cfg, *, model_cfg, adapters, prompt_len) -> prepare(trainable, frozen, rollout,
    scores, kl_coef) -> (batch, metrics)`: the constants of the update (old/ref log-probs,
    values, advantages)."""
    make_update: Callable[..., Callable]
    """`(cfg, *, model_cfg, adapters, optimizer, prompt_len) -> update(state, frozen, batch,
    indices) -> (state, metrics)`: one optimizer step on a minibatch."""
    stop_epochs: Callable[[Any, list[dict]], bool] = lambda cfg, epoch_metrics: False
    """After an epoch: skip the iteration's remaining epochs (PPO's target_kl)."""
    kl_control: Callable[[Any], KLControlSettings]
    """The KL coefficient handed to `prepare` and, when adaptive, how it is steered."""
    epochs_metric: str | None = None
    """The name under which the epochs actually run are reported (PPO: `ppo_epochs_run`)."""
    score_options: Callable[[Any], dict] = lambda cfg: {}
    """Extra keyword options of the driver's `Scorer` (PPO's score_clip, score_scaling)."""
    bar_keys: tuple[str, ...] = ()
    drop_metrics: tuple[str, ...] = ()
    """Scorer metrics this algorithm does not report."""
    keep_groups: Callable[[Any, Any, Any], Any] = lambda cfg, scores, rollout: None
    """`(cfg, scores [B] numpy, rollout) -> keep [B / group] bool numpy, or None (keep
    all)`: which groups of a generation round may train. When fewer than `plan.prompts`
    are kept, the driver samples further rounds (at most `plan.generation_rounds`) and
    trains on the first `plan.prompts` kept groups (`train.dynamic_sampling`)."""
