"""Typed, frozen configs: the shared sections and the loader (YAML + `dotted.key=value`).

Each command has one top-level dataclass made of small sections (`model`, `lora`, `optim`,
`mesh`, `data`, `run`, ...) and its algorithm's own options. The shared sections live here,
with the two bases every algorithm config extends: `PreferenceTraining` (training on a
preference dataset: `rm`, `dpo`) and `OnlineTraining` (online RL: `ppo`, `grpo`). Each
algorithm's config lives with the algorithm (`jaxrlhf.algorithms.*`) and is, at once, its
command's config and the static hyperparameters of its compiled steps. Unknown keys are
rejected with the list of valid ones; each section validates itself in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from jaxrlhf.data.buckets import check_buckets
from jaxrlhf.lora import LoraConfig
from jaxrlhf.models.quant import QuantConfig
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
    layer_loop: Literal["auto", "scan", "unroll"] = "auto"
    """The training forward's loop over the blocks: `scan` (compile time flat in depth),
    `unroll`, or `auto` (scan; unrolled for bfloat16 on the CPU, where XLA's scan copies its
    stacked bf16 residuals at every block: docs/speed.md)."""
    tiny: dict = dataclasses.field(default_factory=dict)
    """Overrides of `tiny_config` when path is `tiny` (e.g. {num_layers: 2, vocab_size: 256})."""
    adapter: str | None = None
    """A trained PEFT adapter (e.g. an SFT LoRA) merged into the base at load: the reference
    model is then base + this adapter, and new adapters start at zero on top of it."""
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    """How the frozen base is stored (QLoRA-style): `none`, `int8`, `nf4` or `gguf` (a .gguf
    file's own Q4_0/Q4_1/Q8_0 blocks); `model.quant=nf4` is short for `model.quant.kind=nf4`.
    Adapters and heads stay float32; see docs/quantization.md."""
    router_aux_loss_coef: float | None = None
    """Mixture of experts: the weight of the router's load-balancing loss added to every
    training loss (logged as `aux_loss`), as TRL's option of this name. None: the
    checkpoint's `router_aux_loss_coef`; 0 turns it off. Refused on a dense model."""

    def __post_init__(self) -> None:
        check_literal(self, "dtype", ("float32", "bfloat16"))
        check_literal(self, "param_dtype", ("float32", "bfloat16"))
        check_literal(self, "remat", ("none", "block"))
        check_literal(self, "layer_loop", ("auto", "scan", "unroll"))
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError(
                f"model.router_aux_loss_coef must be >= 0 (0 turns the MoE aux loss off), "
                f"got {self.router_aux_loss_coef}"
            )


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
        check_literal(self, "schedule", ("cosine", "linear", "constant"))
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
    resume_from: int | None = None
    """With `--resume`: the newest checkpoint at or before this step (null: the newest that
    restores). `--resume-from STEP` on the command line sets it."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """A non-finite loss, gradient or parameter: `stop` the run at that step (its state is
    never saved, the newest checkpoint stays the last good one) or `skip_step` (the update
    is dropped, `optax.apply_if_finite`, and counted as `nonfinite_skipped`)."""

    def __post_init__(self) -> None:
        check_literal(self, "on_nonfinite", ("stop", "skip_step"))
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceDataConfig:
    train: str | None = None
    """Preference pairs: a .json/.jsonl/.parquet/.csv file, a `save_to_disk` folder, a folder
    of data files, or a dataset id (`datasets.load_dataset`; offline: its cache)."""
    eval: str | None = None
    """A separate eval source (same forms); otherwise `eval_split` of `train` if set, else
    `eval_fraction` of `train` is held out."""
    config: str | None = None
    """The dataset's configuration name (TRL's `dataset_config`)."""
    split: str | None = None
    """The split of `train` (TRL's `dataset_train_split`; default "train"; may slice, e.g.
    "train[:1000]", where `datasets.load_dataset` reads)."""
    eval_split: str | None = None
    """The split of `eval`, or of `train` when `eval` is not set (TRL's `dataset_test_split`)."""
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
        _check_length_buckets(self.length_buckets, self.max_length)
        _check_splits(self)


def _check_splits(data: Any) -> None:
    for name in ("config", "split", "eval_split"):
        value = getattr(data, name)
        if value is not None and not value.strip():
            raise ValueError(f"data.{name} must be a non-empty string or null, got {value!r}")


def _check_length_buckets(buckets: tuple[int, ...] | None, max_length: int) -> None:
    if buckets is None:
        return
    try:
        check_buckets(buckets)
    except ValueError:
        raise ValueError(
            f"data.length_buckets must be strictly increasing positive lengths, got {list(buckets)}"
        ) from None
    if buckets[-1] < max_length:
        raise ValueError(
            f"data.length_buckets: the largest bucket ({buckets[-1]}) must be >= "
            f"the maximum length ({max_length})"
        )


# ----------------------------------------------------------------------------- loading


def check_literal(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
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
        if isinstance(value, str) and "kind" in {f.name for f in dataclasses.fields(inner)}:
            value = {"kind": value}  # a section with a `kind` given by it alone: quant=nf4
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
            # A partial section overrides the command's own default section, key by key,
            # at every depth (`ppo.generation.top_k` keeps the demo's other generation keys).
            value = _merge_sections(to_dict(default), value)
        kwargs[name] = _convert(hints[name], value, sub)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"Invalid config{' for ' + where if where else ''}: {e}") from e
    except ValueError as e:
        # A section's own check names its class ("LoraConfig.r ..."); say the option
        # the user wrote instead ("lora.r ...", "value_lora.r ...").
        prefix = f"{cls.__name__}."
        if where and str(e).startswith(prefix):
            raise ValueError(f"{where}.{str(e)[len(prefix) :]}") from e
        raise


def _merge_sections(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys on top, sub-mappings merged key by key rather than replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_sections(out[key], value)
        else:
            out[key] = value
    return out


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


# ----------------------------------------------------------------------------- online RL sections


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptDataConfig:
    train: str | None = None
    """Prompts (plain strings or chat messages): a .json/.jsonl/.parquet/.csv file, a
    `save_to_disk` folder, a folder of data files, or a dataset id."""
    field: str = "prompt"
    eval: str | None = None
    """A separate eval source; otherwise `eval_split` of `train` if set, else `eval_size`."""
    config: str | None = None
    """The dataset's configuration name (TRL's `dataset_config`)."""
    split: str | None = None
    """The split of `train` (TRL's `dataset_train_split`; default "train")."""
    eval_split: str | None = None
    """The split of `eval`, or of `train` when `eval` is not set (TRL's `dataset_test_split`)."""
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
        _check_length_buckets(self.length_buckets, self.max_prompt_length)
        _check_splits(self)


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
    engine: Literal["static", "continuous"] = "static"
    """`static`: the KV-cache sampler decodes the whole batch until its last row stops.
    `continuous`: `slots` rows decode at once and a finished row's slot is refilled by the
    next prompt (`rollout.ContinuousEngine`; see docs/rollout_engine.md)."""
    slots: int = 16
    """Continuous batching: rows decoded at once."""
    dequantize_base: bool = False
    """On a quantized base (`model.quant`): sample from a dense copy of the base, dequantized
    with the adapter merged in once per rollout call and freed after it — the float base's
    decode program, for the dense base's bytes during the call. False: decode on the quantized
    kernels with the adapter unmerged (no dense copy ever; on XLA:CPU each weight is then
    dequantized at every decode step). Ignored on a float base."""

    def __post_init__(self) -> None:
        check_literal(self, "engine", ("static", "continuous"))
        if self.slots < 1:
            raise ValueError(f"generation.slots must be >= 1, got {self.slots}")
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
    ensemble: Literal["mean", "mean_minus_std", "min"] = "mean"
    """With an ensemble (`jaxrlhf rm ensemble_size=K`: `path` holds ensemble.json), how the K
    scores make one: their mean, mean − ensemble_coef·std (uncertainty-penalised), or min
    (the most pessimistic member) — conservative rewards against over-optimisation."""
    ensemble_coef: float = 1.0
    append_eos: bool = False
    """Score a response cut at max_new_tokens as if it ended with EOS (one EOS is appended
    before the reward model reads its score), as `jaxrlhf rm` trains (`data.add_eos`, on by
    default) and evaluates it. Off: read at the cut response's last sampled token."""

    def __post_init__(self) -> None:
        check_literal(self, "ensemble", ("mean", "mean_minus_std", "min"))
        if self.ensemble_coef < 0:
            raise ValueError(f"reward_model.ensemble_coef must be >= 0, got {self.ensemble_coef}")


# ----------------------------------------------------------------------------- training bases


def _check_quantized_base(cfg: Any) -> None:
    """A quantized base is frozen: what trains must be adapters on it."""
    if cfg.model.quant.kind == "none":
        return
    if cfg.lora is None or getattr(cfg, "value_lora", True) is None:
        raise ValueError(
            f"model.quant.kind={cfg.model.quant.kind}: a quantized base is frozen, so full "
            "fine-tuning (lora: null, or value_lora: null) cannot train it; use LoRA or "
            "model.quant.kind=none"
        )
    if cfg.model.adapter:
        raise ValueError(
            "model.adapter is merged into the base at load, which a quantized base cannot "
            "hold; merge it into an HF folder first (`jaxrlhf export --merged`) and quantize that"
        )


def _check_min(cfg: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceTraining:
    """What every algorithm trained on a preference dataset shares (`jaxrlhf rm`, `dpo`):
    the sections, the batch schedule and prefix sharing."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraConfig | None = dataclasses.field(default_factory=LoraConfig)
    """`null` for full fine-tuning."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    batch_size: int = 8
    eval_batch_size: int = 16
    num_epochs: float = 1.0
    max_steps: int | None = None
    share_prompt: bool = True
    """Run the shared prompt of a chosen/rejected pair once (packed, block-masked)."""
    ensemble_size: int = 1
    """K > 1: K adapters (and heads) stacked and trained at once in one compiled step on the
    one frozen base (`jax.vmap` over the adapter axis), each with its own initialisation
    (seed run.seed + k) and data order; exported one PEFT folder each plus the stack."""

    def __post_init__(self) -> None:
        _check_quantized_base(self)
        _check_min(self, ("batch_size", "eval_batch_size", "max_steps", "ensemble_size"))
        if self.ensemble_size > 1 and self.lora is None:
            raise ValueError(
                "ensemble_size > 1 stacks LoRA adapters on one frozen base; it needs lora "
                "(K full copies of the model are what it avoids)"
            )
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be > 0, got {self.num_epochs}")
        if self.batch_size % self.optim.grad_accum_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of "
                f"optim.grad_accum_steps ({self.optim.grad_accum_steps})"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineTraining:
    """What every online RL algorithm shares (`jaxrlhf ppo`, `grpo`): the sections, the
    rollout sampling, the reward (a reward model and/or reward functions) and evaluation."""

    command: ClassVar[str] = "online RL"

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraConfig | None = dataclasses.field(default_factory=LoraConfig)
    """The policy adapter; `null` for full fine-tuning (with a real frozen reference copy)."""
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(learning_rate=1e-5, schedule="constant")
    )
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: PromptDataConfig = dataclasses.field(default_factory=PromptDataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    reward_model: RewardModelSection | None = None
    reward_funcs: tuple[RewardFuncConfig, ...] = ()
    """Python reward functions, each with its `weight` (TRL's reward_weights)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the reward of a completion that hit max_new_tokens without EOS."""
    eval_prompts_batch: int = 32
    kl_budget: float | None = None
    """Nats per sequence: the KL coefficient (PPO's kl_coef, GRPO's beta) is steered by the
    adaptive controller so the rollouts' KL to the reference stays at this budget; each
    iteration (and evaluation) reports `kl_budget_exceeded`. null: a fixed coefficient."""

    def __post_init__(self) -> None:
        _check_quantized_base(self)
        if self.kl_budget is not None and self.kl_budget <= 0:
            raise ValueError(
                f"kl_budget must be > 0 nats per sequence or null, got {self.kl_budget}"
            )
        if self.reward_model is None and not self.reward_funcs:
            raise ValueError(
                f"{self.command.upper()} needs a reward: set reward_model.path and/or reward_funcs"
            )
        _check_min(self, ("eval_prompts_batch",))
        if self.lora is not None:
            if self.lora.task_type != "CAUSAL_LM":
                raise ValueError("lora.task_type must be CAUSAL_LM for the policy")
            gen = self.generation
            if not gen.merge_adapter and gen.max_rank is not None and self.lora.r > gen.max_rank:
                raise ValueError(
                    f"lora.r={self.lora.r} exceeds generation.max_rank={gen.max_rank} (unmerged "
                    f"rollouts are compiled for that rank); raise max_rank or lower r"
                )
