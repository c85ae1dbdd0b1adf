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
    """Padded lengths; default: powers of two from 16 up to max_length."""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig:
    """`jaxrlhf rm`: a Bradley–Terry reward model, LoRA (SEQ_CLS) or full fine-tuning."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(task_type="SEQ_CLS", modules_to_save=("score",)))
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
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lora is not None and self.lora.task_type != "SEQ_CLS":
            raise ValueError("lora.task_type must be SEQ_CLS for a reward model (it is read "
                             "through the score head, as *ForSequenceClassification)")


# ----------------------------------------------------------------------------- loading


def _check_literal(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        section = type(obj).__name__
        raise ValueError(f"{section}.{name}={value!r} is not valid; choose from {', '.join(allowed)}")


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
            raise ValueError(f"{where} must be a mapping of {inner.__name__} options, got {value!r}")
        return from_dict(inner, value, where)
    origin = typing.get_origin(inner)
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(value)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def from_dict(cls: type, raw: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the list of valid ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"Unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid keys"
            f"{' of ' + where if where else ''}: {', '.join(sorted(fields))}")
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
        out.append((key.strip(), yaml.safe_load(text) if text != "" else None))
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """`cls` from a YAML file (optional) with `dotted.key=value` overrides applied on top."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p} must hold a mapping at the top level")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value, cls)
    return from_dict(cls, raw)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
