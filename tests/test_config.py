"""Config loading: YAML + `dotted.key=value` overrides, unknown keys, validation, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxrlhf.algorithms.reward_model import RMConfig
from jaxrlhf.config import (
    OptimConfig,
    PreferenceDataConfig,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from jaxrlhf.lora import LoraConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rm_tiny.yaml"


def rm(*overrides: str, path=CONFIG) -> RMConfig:
    return load_config(RMConfig, path, list(overrides))


def write_yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- loading


def test_yaml_file_with_overrides():
    cfg = rm(
        "optim.learning_rate=1e-3",  # YAML 1.1 reads 1e-3 as a string
        "num_epochs=3",  # int -> float field
        "batch_size=4",
        "data.length_buckets=[16, 32, 64]",  # a list -> tuple
        "lora.target_modules=[q_proj, v_proj]",
        "model.tiny.num_layers=1",  # a key inside a dict-valued option
        "share_prompt=false",
        "run.run_dir=/tmp/somewhere",
    )
    assert cfg.optim.learning_rate == 1e-3 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.num_epochs == 3.0 and isinstance(cfg.num_epochs, float)
    assert cfg.batch_size == 4
    assert cfg.data.length_buckets == (16, 32, 64)
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.model.tiny == {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 1,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
    }
    assert cfg.share_prompt is False
    assert cfg.run.run_dir == "/tmp/somewhere"
    # Untouched values come from the file, the rest from the dataclass defaults.
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16.0 and cfg.optim.schedule == "constant"
    assert cfg.data.eval_fraction == 0.2 and cfg.data.max_length == 64
    assert cfg.run.keep_checkpoints == 2 and cfg.optim.b2 == 0.999


def test_later_override_wins_and_types_are_converted():
    cfg = rm("max_steps=5", "max_steps=7", "optim.max_grad_norm=null", "batch_size=4.0")
    assert cfg.max_steps == 7 and cfg.optim.max_grad_norm is None
    assert cfg.batch_size == 4 and isinstance(cfg.batch_size, int)


def test_no_file_gives_the_command_defaults():
    assert load_config(RMConfig) == RMConfig()
    assert rm(path=None) == RMConfig()


@pytest.mark.parametrize("override", ["lora=null", "lora=~", "lora="])
def test_lora_null_means_full_finetuning(override):
    assert rm(override).lora is None


def test_lora_null_in_the_file(tmp_path):
    path = write_yaml(tmp_path, "lora: null\nbatch_size: 2\n")
    assert rm(path=path).lora is None
    # ...and a later `lora.x=` override brings the command's default adapter back.
    assert rm("lora.r=4", path=path).lora == LoraConfig(
        r=4, task_type="SEQ_CLS", modules_to_save=("score",)
    )


def test_partial_section_keeps_the_commands_defaults(tmp_path):
    # RMConfig's own lora default is a SEQ_CLS adapter with the score head saved; setting one
    # key must not fall back to LoraConfig's generic CAUSAL_LM defaults.
    for cfg in (rm("lora.r=4", path=None), rm(path=write_yaml(tmp_path, "lora:\n  r: 4\n"))):
        assert cfg.lora.r == 4
        assert cfg.lora.task_type == "SEQ_CLS"
        assert cfg.lora.modules_to_save == ("score",)
        assert cfg.lora.alpha == LoraConfig().alpha
    assert rm("optim.warmup_steps=3", path=None).optim == OptimConfig(warmup_steps=3)


def test_nested_partial_section_keeps_the_commands_defaults(tmp_path):
    # The demo's PPO section sets generation to 20 tokens at temperature 1; one key two levels
    # down must keep the others (it used to rebuild generation from GenerationConfig's own
    # defaults, 53 tokens at 0.7), from an override and from a YAML file alike.
    from jaxrlhf.commands.demo import DemoConfig

    text = "ppo:\n  generation:\n    top_k: 5\n"
    for cfg in (
        load_config(DemoConfig, None, ["ppo.generation.top_k=5"]),
        load_config(DemoConfig, write_yaml(tmp_path, text)),
    ):
        assert cfg.ppo.generation.top_k == 5
        assert cfg.ppo.generation.max_new_tokens == 20
        assert cfg.ppo.generation.temperature == 1.0
        assert cfg.ppo.kl_budget == 10.0
        assert cfg.ppo.reward_model.ensemble == "mean_minus_std"


def test_saved_config_loads_back(tmp_path):
    cfg = rm(
        "lora.target_modules=[q_proj, o_proj]",
        "data.length_buckets=[16, 64]",
        "max_steps=9",
        "center_rewards_coefficient=0.01",
    )
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(RMConfig, tmp_path / "config.yaml") == cfg
    full = rm("lora=null")
    save_config(full, tmp_path / "full.yaml")
    assert load_config(RMConfig, tmp_path / "full.yaml") == full
    assert to_dict(full)["lora"] is None


# ----------------------------------------------------------------------------- errors


def test_unknown_top_level_key_lists_the_valid_keys():
    with pytest.raises(ValueError, match="Unknown config key") as err:
        rm("batch_sise=4")
    msg = str(err.value)
    assert "batch_sise" in msg
    for key in ("batch_size", "eval_batch_size", "lora", "optim", "share_prompt", "max_steps"):
        assert key in msg


def test_unknown_nested_key_lists_the_sections_keys():
    with pytest.raises(ValueError, match=r"optim\.lr\b") as err:
        rm("optim.lr=1.0e-3")
    msg = str(err.value)
    assert "valid keys of optim" in msg
    for key in ("learning_rate", "schedule", "warmup_steps", "grad_accum_steps"):
        assert key in msg
    with pytest.raises(ValueError, match=r"lora\.foo.*valid keys of lora: .*target_modules"):
        rm("lora.foo.bar=1")


def test_unknown_key_in_the_file(tmp_path):
    path = write_yaml(tmp_path, "run:\n  save_evry: 3\n")
    with pytest.raises(ValueError, match=r"run\.save_evry.*valid keys of run: .*save_every"):
        rm(path=path)


@pytest.mark.parametrize(
    "override, match",
    [
        (
            "optim.schedule=foo",
            r"schedule='foo' is not valid; choose from cosine, linear, constant",
        ),
        ("model.dtype=float16", r"dtype='float16' is not valid; choose from float32, bfloat16"),
        ("model.remat=full", r"remat='full' is not valid"),
        ("lora.init=xavier", r"init must be 'kaiming' or 'gaussian'"),
        ("lora.task_type=CAUSAL_LM", r"task_type must be SEQ_CLS for a reward model"),
    ],
)
def test_literal_values_are_checked(override, match):
    with pytest.raises(ValueError, match=match):
        rm(override)


@pytest.mark.parametrize(
    "override, match",
    [
        ("batch_size=0", r"batch_size must be >= 1"),
        ("optim.learning_rate=-1.0", r"learning_rate must be > 0"),
        ("optim.grad_accum_steps=0", r"grad_accum_steps must be >= 1"),
        ("optim.warmup_ratio=1.0", r"warmup_ratio must be in \[0, 1\)"),
        ("data.eval_fraction=1.5", r"eval_fraction must be in \[0, 1\)"),
        ("data.max_length=1", r"max_length must be >= 2"),
        ("run.save_every=0", r"run\.save_every must be >= 1"),
        ("mesh.data=0", r"mesh\.data must be >= 1 or -1"),
        ("lora.r=0", r"r must be an integer >= 1"),
        ("lora.modules_to_save=[]", r"SEQ_CLS adapter must list 'score' in modules_to_save"),
        ("lora.modules_to_save=[lm_head]", r"unknown module 'lm_head'"),
    ],
)
def test_values_are_checked(override, match):
    with pytest.raises(ValueError, match=match):
        rm(override)


@pytest.mark.parametrize(
    "override, match",
    [
        ("batch_size", r"override 'batch_size' must look like dotted\.key=value"),
        ("batch_size.x=1", r"'batch_size' is not a section"),
        ("optim=3", r"optim must be a mapping of OptimConfig options"),
        ("batch_size=", r"batch_size may not be null"),
        ("model.tiny=null", r"model\.tiny may not be null"),
        ("optim.learning_rate=fast", r"optim\.learning_rate must be a number, got 'fast'"),
    ],
)
def test_bad_override_syntax(override, match):
    with pytest.raises(ValueError, match=match):
        rm(override)


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["a.b=1", "c=[1, 2]", "d=null", "e=", "f=x=y", "g=true"]) == [
        ("a.b", 1),
        ("c", [1, 2]),
        ("d", None),
        ("e", None),
        ("f", "x=y"),
        ("g", True),
    ]


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        rm(path=tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="must hold a mapping"):
        rm(path=write_yaml(tmp_path, "- a\n- b\n"))


# Desired behaviour that the loader does not have yet (see the report that came with these
# tests); strict, so each turns into a failure to delete once the loader is fixed.


def test_malformed_yaml_value_is_a_value_error():
    with pytest.raises(ValueError, match=r"data\.length_buckets"):
        rm("data.length_buckets=[16")


@pytest.mark.parametrize(
    "override",
    ["max_steps=ten", "run.tensorboard=maybe", "batch_size=abc", "data.length_buckets=16"],
)
def test_wrong_scalar_type_names_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        rm(override)


def test_buckets_must_cover_max_length():
    with pytest.raises(ValueError, match="length_buckets"):
        PreferenceDataConfig(max_length=64, length_buckets=(16, 32))


@pytest.mark.parametrize(
    "override, match",
    [
        ("eval_batch_size=0", "eval_batch_size"),
        ("max_steps=0", "max_steps"),
        ("num_epochs=0", "num_epochs"),
        ("optim.grad_accum_steps=3", "grad_accum_steps"),  # rm_tiny's batch_size is 16
    ],
)
def test_rm_options_are_checked_up_front(override, match):
    with pytest.raises(ValueError, match=match):
        rm(override)
