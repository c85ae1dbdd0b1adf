"""Typed, frozen configs for every command, loaded from YAML with `dotted.key=value` overrides.

Each command has one top-level dataclass (`RMConfig`, `PPOConfig`, `GRPOConfig`, `DPOConfig`)
made of small sections (`model`, `lora`, `optim`, `mesh`, `data`, `run`). Unknown keys are
rejected with the list of valid ones; each section validates itself in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxrlhf.lora import LoraConfig
from jaxrlhf.rewards import RewardFuncConfig
from jaxrlhf.sharding import MeshConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    path: str = "default"
    """A local HF folder, a .gguf file, `default` (the embedded SmolLM2-135M-Instruct GGUF), or
    `tiny` (a small random model, for smoke tests; see `tiny`)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of activations."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the frozen base params (trainable params stay float32)."""
    remat: Literal["none", "block"] = "none"
    tiny: dict = dataclasses.field(default_factory=dict)
    """Overrides of `tiny_config` when path is `tiny` (e.g. {num_layers: 2, vocab_size: 256})."""
    adapter: str | None = None
    """A trained PEFT adapter (e.g. an SFT LoRA) merged into the base at load: the reference
    model is then base + this adapter, and new adapters start at zero on top of it."""

    def __post_init__(self) -> None:
        _check_literal(self, "dtype", ("float32", "bfloat16"))
        _check_literal(self, "param_dtype", ("float32", "bfloat16"))
        _check_literal(self, "remat", ("none", "block"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    learning_rate: float = 1e-4
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        _check_literal(self, "schedule", ("cosine", "linear", "constant"))
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    run_dir: str = "runs/run"
    seed: int = 0
    log_every: int = 1
    eval_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceDataConfig:
    train: str = ""
    """A local .json/.jsonl/.parquet/.csv file of preference pairs."""
    eval: str | None = None
    """A separate eval file; otherwise `eval_fraction` of `train` is held out."""
    eval_fraction: float = 0.1
    max_length: int = 512
    max_prompt_length: int | None = None
    skip_bad_rows: bool = False
    length_buckets: tuple[int, ...] | None = None
    """Padded lengths; default: powers of two from 16 and the 1.5x step between each two, up
    to max_length (`data.default_buckets`)."""
    add_eos: bool = True
    """End each response with EOS (unless its text already does). A reward model reads its
    score at the last token, so train it the way it will be scored: `false` when it will
    score policy rollouts cut at max_new_tokens, which mostly end without one."""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _check_buckets(self.length_buckets, self.max_length)


def _check_buckets(buckets: tuple[int, ...] | None, max_length: int) -> None:
    if buckets is None:
        return
    if (
        not buckets
        or any(b < 1 for b in buckets)
        or any(a >= b for a, b in zip(buckets, buckets[1:], strict=False))
    ):
        raise ValueError(
            f"data.length_buckets must be strictly increasing positive lengths, got {list(buckets)}"
        )
    if buckets[-1] < max_length:
        raise ValueError(
            f"data.length_buckets: the largest bucket ({buckets[-1]}) must be >= "
            f"the maximum length ({max_length})"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig:
    """`jaxrlhf rm`: a Bradley–Terry reward model, LoRA (SEQ_CLS) or full fine-tuning."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(task_type="SEQ_CLS", modules_to_save=("score",))
    )
    """`null` for full fine-tuning."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    batch_size: int = 8
    eval_batch_size: int = 16
    num_epochs: float = 1.0
    max_steps: int | None = None
    center_rewards_coefficient: float | None = None
    share_prompt: bool = True
    """Run the shared prompt of a chosen/rejected pair once (packed, block-masked)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(
                f"batch_size and eval_batch_size must be >= 1, got "
                f"{self.batch_size}, {self.eval_batch_size}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be null or >= 1, got {self.max_steps}")
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be > 0, got {self.num_epochs}")
        if self.batch_size % self.optim.grad_accum_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of "
                f"optim.grad_accum_steps ({self.optim.grad_accum_steps})"
            )
        if self.lora is not None and self.lora.task_type != "SEQ_CLS":
            raise ValueError(
                "lora.task_type must be SEQ_CLS for a reward model (it is read "
                "through the score head, as *ForSequenceClassification)"
            )


# ----------------------------------------------------------------------------- loading


def _check_literal(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        section = type(obj).__name__
        raise ValueError(
            f"{section}.{name}={value!r} is not valid; choose from {', '.join(allowed)}"
        )


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _convert(tp: Any, value: Any, where: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ValueError(f"{where} may not be null")
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"{where} must be a mapping of {inner.__name__} options, got {value!r}"
            )
        return from_dict(inner, value, where)
    origin = typing.get_origin(inner)
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(inner)
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, str):
        # YAML 1.1 reads `1e-2` (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if inner is int and isinstance(value, float) and value.is_integer():
        return int(value)
    _check_scalar(inner, value, where)
    return value


def _check_scalar(tp: Any, value: Any, where: str) -> None:
    """Refuse a value of the wrong kind, naming the key (YAML gives str/int/float/bool)."""
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if tp is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    if tp is dict and not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {value!r}")
    if typing.get_origin(tp) is tuple and not isinstance(value, list | tuple):
        raise ValueError(f"{where} must be a list, got {value!r}")


def from_dict(cls: type, raw: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the list of valid ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"Unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid keys"
            f"{' of ' + where if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in raw.items():
        sub = f"{where}.{name}" if where else name
        default = _field_default(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # A partial section overrides the command's own default section, key by key.
            value = {**to_dict(default), **value}
        kwargs[name] = _convert(hints[name], value, sub)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"Invalid config{' for ' + where if where else ''}: {e}") from e


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(x) for x in cfg]
    return cfg


def _set_dotted(tree: dict, key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ValueError(f"override {key!r}: {part!r} is not a section")
        node = node[part]
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like dotted.key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({e})") from None
        out.append((key.strip(), value))
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """`cls` from a YAML file (optional) with `dotted.key=value` overrides applied on top."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p} must hold a mapping at the top level")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value, cls)
    return from_dict(cls, raw)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- RL sections


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptDataConfig:
    train: str = ""
    """A local .json/.jsonl/.parquet/.csv file of prompts (plain strings or chat messages)."""
    field: str = "prompt"
    eval: str | None = None
    eval_size: int = 0
    """Held-out prompts taken from `train` when there is no `eval` file (0: no evaluation)."""
    max_prompt_length: int = 128
    skip_bad_rows: bool = False
    length_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.eval_size < 0:
            raise ValueError(f"data.eval_size must be >= 0, got {self.eval_size}")
        _check_buckets(self.length_buckets, self.max_prompt_length)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Rollout sampling (TRL's PPO defaults: response_length 53, temperature 0.7)."""

    max_new_tokens: int = 53
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    merge_adapter: bool = True
    """Fold the policy adapter into the weights once per rollout phase (sampling at base
    speed; a transient copy of the adapted kernels). False: apply it unmerged, no copy."""
    max_rank: int | None = None
    """Unmerged rollouts are compiled for this rank; smaller adapters are zero-padded."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(
                "generation.temperature must be > 0 for RL rollouts (the policy "
                f"log-probs are taken at this temperature), got {self.temperature}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelSection:
    path: str
    """A PEFT adapter folder written by `jaxrlhf rm` (SEQ_CLS), or a full HF SEQ_CLS folder."""
    base: str | None = None
    """The reward model's base when it is not the policy's (an HF folder, .gguf, default)."""
    weight: float = 1.0
    append_eos: bool = False
    """Score a response cut at max_new_tokens as if it ended with EOS (one EOS is appended
    before the reward model reads its score), as `jaxrlhf rm` trains (`data.add_eos`, on by
    default) and evaluates it. Off: read at the cut response's last sampled token."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """`jaxrlhf ppo`. Names and defaults follow TRL's PPOConfig where it has the option."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraConfig | None = dataclasses.field(default_factory=LoraConfig)
    """The policy adapter; `null` for full fine-tuning (with a real reference copy)."""
    value_lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(modules_to_save=("value",))
    )
    """The critic's adapter (value_model: separate); `null` for a fully trained critic."""
    value_model: Literal["separate", "shared"] = "separate"
    value_init_from_reward_model: bool = False
    """Start the critic from the reward model's adapter and score head (InstructGPT)."""
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(learning_rate=1e-5, schedule="constant")
    )
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: PromptDataConfig = dataclasses.field(default_factory=PromptDataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    reward_model: RewardModelSection | None = None
    reward_funcs: tuple[RewardFuncConfig, ...] = ()
    missing_eos_penalty: float | None = None
    score_clip: float | None = None
    score_scaling: Literal["none", "batch"] = "none"
    """`batch`: standardise the scores of each rollout batch."""
    num_iterations: int = 100
    rollout_batch_size: int = 64
    mini_batch_size: int = 16
    num_ppo_epochs: int = 4
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    target_kl: float | None = None
    """Stop the iteration's remaining PPO epochs once the mean approximate KL exceeds this."""
    eval_prompts_batch: int = 32

    def __post_init__(self) -> None:
        _check_literal(self, "value_model", ("separate", "shared"))
        _check_literal(self, "kl_estimator", ("k1", "k2", "k3"))
        _check_literal(self, "score_scaling", ("none", "batch"))
        if self.reward_model is None and not self.reward_funcs:
            raise ValueError("PPO needs a reward: set reward_model.path and/or reward_funcs")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple "
                f"of mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.optim.grad_accum_steps:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                f"optim.grad_accum_steps ({self.optim.grad_accum_steps})"
            )
        if self.lora is not None and self.lora.task_type != "CAUSAL_LM":
            raise ValueError("lora.task_type must be CAUSAL_LM for the policy")
        if (
            self.value_model == "shared"
            and self.lora is not None
            and "value" not in self.lora.modules_to_save
        ):
            raise ValueError(
                "value_model: shared puts the value head on the policy adapter; "
                "add 'value' to lora.modules_to_save"
            )
        if (
            self.value_model == "separate"
            and self.value_lora is not None
            and "value" not in self.value_lora.modules_to_save
        ):
            raise ValueError("value_lora.modules_to_save must include 'value'")
        if self.num_iterations < 1 or self.num_ppo_epochs < 1:
            raise ValueError("num_iterations and num_ppo_epochs must be >= 1")
        for name in ("lora", "value_lora"):
            adapter = getattr(self, name)
            if adapter is not None and adapter.dropout > 0:
                raise ValueError(
                    f"{name}.dropout must be 0 for PPO: dropout would make the "
                    f"trainer's log-probs differ from the rollout's"
                )


# ----------------------------------------------------------------------------- DPO

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """`jaxrlhf dpo`: direct preference optimisation of a causal LM, as TRL's DPOTrainer.

    LoRA (the default): the policy is the frozen base plus the adapter and the reference is
    the same base with the adapter off, so no second copy of the model exists. `lora: null`
    is full fine-tuning against a frozen reference copy (TRL uses lr 1e-6 there; set
    `optim.learning_rate` accordingly)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(task_type="CAUSAL_LM", r=16, alpha=32)
    )
    """`null` for full fine-tuning (with a frozen reference copy)."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    batch_size: int = 8
    eval_batch_size: int = 16
    num_epochs: float = 1.0
    max_steps: int | None = None
    beta: float = 0.1
    """Temperature of the implicit reward β·log(π/π_ref); smaller stays further from the
    reference's constraint."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """`sigmoid` (DPO), `ipo` (on length-averaged log-probs, as TRL) or `hinge` (SLiC)."""
    label_smoothing: float = 0.0
    """cDPO: the assumed share of flipped labels, in [0, 0.5) (`sigmoid` only)."""
    precompute_ref_logps: bool = False
    """Compute the reference log-probs once over the data before training (TRL's
    `precompute_ref_log_probs`); each step then runs the policy only. In full fine-tuning
    the reference copy is freed afterwards."""
    share_prompt: bool = True
    """Run the shared prompt of a chosen/rejected pair once (packed, block-masked)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.optim.grad_accum_steps:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of "
                f"optim.grad_accum_steps={self.optim.grad_accum_steps}"
            )
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be > 0, got {self.num_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        _check_literal(self, "loss_type", DPO_LOSS_TYPES)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(
                f"label_smoothing applies to loss_type 'sigmoid' only; got "
                f"loss_type={self.loss_type!r}; set label_smoothing=0"
            )
        if self.lora is not None:
            if self.lora.task_type != "CAUSAL_LM":
                raise ValueError(
                    "lora.task_type must be CAUSAL_LM for DPO (the policy is read "
                    "through the lm head)"
                )
            if self.lora.modules_to_save:
                raise ValueError(
                    f"lora.modules_to_save={list(self.lora.modules_to_save)}: DPO "
                    f"uses no score/value head; set it to []"
                )


# ----------------------------------------------------------------------------- GRPO

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "sequence-mean", "token-mean")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """`jaxrlhf grpo`: Group Relative Policy Optimization (Shao et al., 2024), as TRL's
    GRPOTrainer: no critic; each prompt is sampled `num_generations` times and a completion's
    advantage is its reward relative to its group's. Names and defaults follow TRL's
    GRPOConfig where it has the option.

    One iteration: `prompts_per_iteration` prompts × `num_generations` completions → rewards
    → group advantages → `num_iterations` (μ) passes of `mini_batch_size` optimizer steps."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraConfig | None = dataclasses.field(default_factory=lambda: LoraConfig(r=32, alpha=64))
    """The policy adapter (RL favours higher ranks than SFT); `null` for full fine-tuning
    (with a real frozen reference copy)."""
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(learning_rate=1e-5, schedule="constant")
    )
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: PromptDataConfig = dataclasses.field(default_factory=PromptDataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    generation: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(max_new_tokens=256, temperature=1.0)
    )
    """Rollout sampling; `max_new_tokens` is TRL's max_completion_length."""
    reward_model: RewardModelSection | None = None
    reward_funcs: tuple[RewardFuncConfig, ...] = ()
    """Python reward functions, each with its `weight` (TRL's reward_weights)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the reward of a completion that hit max_new_tokens without EOS."""
    num_generations: int = 8
    """G: completions per prompt (the group)."""
    prompts_per_iteration: int = 8
    """Distinct prompts per generation batch (batch = prompts_per_iteration × G)."""
    max_steps: int = 100
    """Iterations (generation batches) to run."""
    num_iterations: int = 1
    """μ: passes over each generation batch; the ratio is taken against the log-probs at
    rollout time (1: strictly on-policy, as TRL's default)."""
    mini_batch_size: int | None = None
    """Completions per optimizer step (null: the whole generation batch, one step per pass)."""
    beta: float = 0.0
    """KL coefficient (k3 estimator) against the reference; 0 skips the reference pass."""
    epsilon: float = 0.2
    epsilon_high: float | None = None
    """Upper clip bound (DAPO's clip-higher, e.g. 0.28); null: `epsilon`."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "sequence-mean", "token-mean"] = "dapo"
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (false: Dr. GRPO)."""
    log_entropy: bool = True
    """Compute the policy's mean token entropy in the update (one softmax over the vocabulary)."""
    share_prompt: bool = True
    """Run each prompt once for its group of completions in the log-prob passes (packed:
    the G completions attend to one copy of the prompt). Same numbers, fewer tokens;
    mini-batches and micro-batches then hold whole groups."""
    eval_prompts_batch: int = 32

    @property
    def generation_batch_size(self) -> int:
        return self.prompts_per_iteration * self.num_generations

    @property
    def effective_mini_batch_size(self) -> int:
        return self.mini_batch_size or self.generation_batch_size

    def __post_init__(self) -> None:
        _check_literal(self, "loss_type", GRPO_LOSS_TYPES)
        if self.reward_model is None and not self.reward_funcs:
            raise ValueError("GRPO needs a reward: set reward_model.path and/or reward_funcs")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (advantages are relative to the "
                f"group of a prompt's completions), got {self.num_generations}"
            )
        for name in ("prompts_per_iteration", "max_steps", "num_iterations", "eval_prompts_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        batch = self.generation_batch_size
        if self.mini_batch_size is not None:
            if self.mini_batch_size < 1 or batch % self.mini_batch_size:
                raise ValueError(
                    f"mini_batch_size ({self.mini_batch_size}) must divide the generation batch "
                    f"prompts_per_iteration × num_generations = {batch}"
                )
        if self.effective_mini_batch_size % self.optim.grad_accum_steps:
            raise ValueError(
                f"mini_batch_size ({self.effective_mini_batch_size}) must be a multiple of "
                f"optim.grad_accum_steps ({self.optim.grad_accum_steps})"
            )
        micro = self.effective_mini_batch_size // self.optim.grad_accum_steps
        if self.share_prompt and micro % self.num_generations:
            raise ValueError(
                f"share_prompt packs whole groups, so each micro-batch (mini_batch_size / "
                f"optim.grad_accum_steps = {micro}) must be a multiple of num_generations "
                f"({self.num_generations}); change them or set share_prompt: false"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ValueError(f"epsilon_high must be > 0 or null, got {self.epsilon_high}")
        if self.lora is not None:
            if self.lora.task_type != "CAUSAL_LM":
                raise ValueError("lora.task_type must be CAUSAL_LM for the policy")
            if self.lora.modules_to_save:
                raise ValueError(
                    f"lora.modules_to_save={list(self.lora.modules_to_save)}: GRPO "
                    f"has no critic or score head; set it to []"
                )
            if self.lora.dropout:
                raise ValueError(
                    "lora.dropout must be 0 for GRPO: the importance ratio compares "
                    "deterministic passes of the policy"
                )
            gen = self.generation
            if not gen.merge_adapter and gen.max_rank is not None and self.lora.r > gen.max_rank:
                raise ValueError(
                    f"lora.r={self.lora.r} exceeds generation.max_rank={gen.max_rank} (unmerged "
                    f"rollouts are compiled for that rank); raise max_rank or lower r"
                )
