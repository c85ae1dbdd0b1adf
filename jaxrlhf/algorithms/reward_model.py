"""Bradley–Terry reward models: training as jit-compiled pure steps, and scoring.

    loss = −log σ(r(x, y_chosen) − r(x, y_rejected) − margin)  [+ c·(r_c + r_r)²]

r is the `score` head read at the last real token (a sequence classifier, never a causal
LM). Only the reward adapter and its `score` copy (or, in full fine-tuning, all params)
get gradients. With `share_prompt` the pair is packed so the prompt runs once
(`jaxrlhf.data.packing`); the rewards equal the unshared computation.

Scoring (PPO/GRPO): `load_reward_model` reads a PEFT SEQ_CLS adapter on the policy's own
frozen base (or its own base) or a full `*ForSequenceClassification` folder, and
`reward_model_scores` reads the score of each prompt+response.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.algorithms.common import (
    add_router_aux_loss,
    dropout_args,
    float_metrics,
    hidden_and_aux,
    make_batch_step,
    model_views,
    packed_hidden,
)
from jaxrlhf.algorithms.spec import PreferenceAlgorithm
from jaxrlhf.config import ModelSection, PreferenceTraining, RewardModelSection
from jaxrlhf.lora import LoraConfig
from jaxrlhf.losses import bradley_terry_loss
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import backbone, head_weights, score_head
from jaxrlhf.sharding import put_tree


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig(PreferenceTraining):
    """`jaxrlhf rm`: a Bradley–Terry reward model, LoRA (SEQ_CLS) or full fine-tuning."""

    lora: LoraConfig | None = dataclasses.field(
        default_factory=lambda: LoraConfig(task_type="SEQ_CLS", modules_to_save=("score",))
    )
    """`null` for full fine-tuning."""
    center_rewards_coefficient: float | None = None
    """TRL's reward centering: + c·(r_c + r_r)² keeps the rewards near zero."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora is not None and self.lora.task_type != "SEQ_CLS":
            raise ValueError(
                "lora.task_type must be SEQ_CLS for a reward model (it is read "
                "through the score head, as *ForSequenceClassification)"
            )


def pair_rewards(
    trainable: Any,
    frozen: Any,
    batch: dict,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    rng: jax.Array | None = None,
    with_aux_loss: bool = False,
) -> tuple[jax.Array, ...]:
    """(r_chosen, r_rejected) [B] for a pair batch, packed (`packed_*` keys) or not; with
    `with_aux_loss` a third entry, the MoE router's aux loss of this forward (or None, see
    `common.hidden_and_aux`)."""
    params, lora, scale = model_views(trainable, frozen, lora_cfg)
    extra = dropout_args(lora_cfg, rng) if rng is not None else {}
    if "packed_input_ids" in batch:
        hidden, aux = packed_hidden(
            params,
            batch,
            model_cfg=model_cfg,
            lora=lora,
            lora_scale=scale,
            with_aux_loss=True,
            **extra,
        )
        w = head_weights(params, lora, "score")["kernel"].astype(hidden.dtype)

        def read(idx):
            h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
            return jnp.einsum("bd,dl->bl", h, w, preferred_element_type=jnp.float32)[:, 0]

        rewards = read(batch["chosen_last"]), read(batch["rejected_last"])
    else:
        ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        hidden, aux = hidden_and_aux(
            params, ids, mask, model_cfg=model_cfg, lora=lora, lora_scale=scale, **extra
        )
        scores = score_head(params, hidden, mask, lora)
        n = batch["chosen_input_ids"].shape[0]
        rewards = scores[:n], scores[n:]
    return (*rewards, aux) if with_aux_loss else rewards


def reward_loss(
    trainable: Any,
    batch: dict,
    frozen: Any,
    rng: jax.Array,
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    center_rewards_coefficient: float | None,
) -> tuple[jax.Array, dict]:
    """Bradley–Terry loss of one batch (+ the MoE router's aux term, `add_router_aux_loss`)."""
    r_c, r_r, aux = pair_rewards(
        trainable,
        frozen,
        batch,
        model_cfg=model_cfg,
        lora_cfg=lora_cfg,
        rng=rng,
        with_aux_loss=True,
    )
    loss, metrics = bradley_terry_loss(
        r_c,
        r_r,
        margin=batch.get("margin"),
        center_rewards_coefficient=center_rewards_coefficient,
        weights=batch.get("pair_mask"),
    )
    return add_router_aux_loss(loss, metrics, aux, model_cfg=model_cfg)


def make_train_step(
    cfg: RMConfig, *, model_cfg: ModelConfig, optimizer: optax.GradientTransformation
):
    """`step(state, frozen, micro_batches) -> (state, metrics)`; micro_batches: [n, B, ...]."""

    def loss_fn(trainable, batch, frozen, rng):
        return reward_loss(
            trainable,
            batch,
            frozen,
            rng,
            model_cfg=model_cfg,
            lora_cfg=cfg.lora,
            center_rewards_coefficient=cfg.center_rewards_coefficient,
        )

    return make_batch_step(loss_fn, optimizer)


def make_eval_step(cfg: RMConfig, *, model_cfg: ModelConfig):
    """`eval(trainable, frozen, batch) -> (r_chosen, r_rejected)`; metrics are computed over
    the whole eval set on the host (`eval_metrics`)."""

    def step(trainable, frozen, batch):
        return pair_rewards(trainable, frozen, batch, model_cfg=model_cfg, lora_cfg=cfg.lora)

    return step


def eval_metrics(cfg: Any, outputs: tuple, pair_mask, margin=None) -> dict[str, float]:
    """TRL's reward metrics (`loss`, `accuracy`, `margin`, ...) over all real pairs."""
    r_chosen, r_rejected = outputs
    _, metrics = bradley_terry_loss(
        jnp.asarray(r_chosen),
        jnp.asarray(r_rejected),
        margin=None if margin is None else jnp.asarray(margin),
        weights=jnp.asarray(pair_mask),
    )
    return float_metrics(metrics)


ALGORITHM = PreferenceAlgorithm(
    name="rm",
    help="train a reward model (Bradley–Terry, LoRA SEQ_CLS or full)",
    config=RMConfig,
    task="SEQ_CLS",
    heads=("score",),
    make_train_step=make_train_step,
    make_eval_step=make_eval_step,
    eval_metrics=eval_metrics,
    summary_keys=("accuracy", "loss"),
    bar_keys=("loss", "accuracy"),
)


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A loaded reward model: its params (the policy's frozen base, shared, when it has no
    base of its own), its adapter (None for a full SEQ_CLS model) and the adapter's config."""

    model_cfg: ModelConfig
    params: Any
    lora: Any
    lora_cfg: LoraConfig | None
    members: int = 1
    """K > 1: `lora` is K stacked adapters (an ensemble), scored in one pass."""

    @property
    def scale(self) -> float:
        return 1.0 if self.lora_cfg is None else self.lora_cfg.scale


def combine_ensemble(scores: jax.Array, *, rule: str, coef: float = 1.0) -> jax.Array:
    """One reward [B] from K members' scores [K, B]:

    mean            mean_k r_k
    mean_minus_std  mean_k r_k − coef · std_k r_k   (population std)
    min             min_k r_k
    """
    if rule == "mean":
        return scores.mean(axis=0)
    if rule == "mean_minus_std":
        return scores.mean(axis=0) - coef * scores.std(axis=0)
    if rule == "min":
        return scores.min(axis=0)
    raise ValueError(f"reward_model.ensemble={rule!r}; choose from mean, mean_minus_std, min")


def reward_model_scores(
    rm_params: Any,
    rm_lora: Any,
    rm_scale: float,
    input_ids,
    attention_mask,
    *,
    model_cfg: ModelConfig,
) -> jax.Array:
    """The reward model's score [B] of each prompt+response (read at its last real token);
    no vocabulary logits are computed."""
    hidden, _ = backbone(
        rm_params, input_ids, attention_mask, cfg=model_cfg, lora=rm_lora, lora_scale=rm_scale
    )
    return score_head(rm_params, hidden, attention_mask, rm_lora)


@jax.jit
def append_eos(input_ids, attention_mask, finished, eos):
    """One more column: EOS (real) for unfinished rows, padding (masked) for finished ones.
    An unfinished row's response fills all its columns, so the EOS lands right after it."""
    finished = finished.astype(bool)[:, None]
    col = jnp.where(finished, jnp.zeros_like(eos), eos).astype(input_ids.dtype)
    return (
        jnp.concatenate([input_ids, col], axis=1),
        jnp.concatenate([attention_mask, (~finished).astype(attention_mask.dtype)], axis=1),
    )


def check_same_vocabulary(policy_tokenizer: Any, rm_tokenizer: Any, *, where: str) -> None:
    """The reward model reads the policy's token ids as they are: a reward model on another
    tokenizer would score different text without any error, so that is refused here."""
    if policy_tokenizer is None or rm_tokenizer is None:
        return
    policy_vocab, rm_vocab = policy_tokenizer.get_vocab(), rm_tokenizer.get_vocab()
    if policy_vocab != rm_vocab:
        differ = sorted(
            t
            for t in policy_vocab.keys() | rm_vocab.keys()
            if policy_vocab.get(t) != rm_vocab.get(t)
        )
        raise ValueError(
            f"{where}: the reward model's tokenizer differs from the policy's "
            f"({len(differ)} tokens differ, e.g. {differ[:3]}); it would score the policy's "
            f"token ids as other text. Use a reward model trained on the policy's tokenizer."
        )


def load_reward_model(
    section: RewardModelSection,
    *,
    model_cfg: ModelConfig,
    frozen: Any,
    mesh,
    tokenizer: Any = None,
) -> RewardModel:
    """The reward model of `section`, on the mesh. With `tokenizer` (the policy's), a reward
    model on another base must share its vocabulary."""
    from jaxrlhf.models.base import load_base
    from jaxrlhf.models.loading import folder_tokenizer, load_hf_folder
    from jaxrlhf.peft_format import load_peft

    path = Path(section.path)
    if not path.exists():
        raise FileNotFoundError(f"reward_model.path not found: {path}")
    if (path / "ensemble.json").is_file():
        return _load_ensemble(
            section, path, model_cfg=model_cfg, frozen=frozen, mesh=mesh, tokenizer=tokenizer
        )
    if (path / "adapter_config.json").is_file():
        rm_cfg, params = model_cfg, frozen
        if section.base is not None:
            rm_cfg, base, rm_tokenizer = load_base(
                ModelSection(path=section.base, dtype=model_cfg.dtype)
            )
            check_same_vocabulary(tokenizer, rm_tokenizer, where="reward_model.base")
            params = put_tree(base, mesh)
        lora, lora_cfg = load_peft(path, rm_cfg)
        if "score" not in lora:
            raise ValueError(
                f"reward model adapter {path} has no trained score head "
                f"(modules_to_save must include 'score')"
            )
        return RewardModel(
            model_cfg=rm_cfg, params=params, lora=put_tree(lora, mesh), lora_cfg=lora_cfg
        )
    rm_cfg, params = load_hf_folder(path)
    has_tokenizer = (path / "tokenizer.json").is_file() or (
        path / "tokenizer_config.json"
    ).is_file()
    if tokenizer is not None and has_tokenizer:
        check_same_vocabulary(tokenizer, folder_tokenizer(path), where="reward_model.path")
    if "score" not in params:
        raise ValueError(
            f"reward model {path} has no score head (expected a "
            f"*ForSequenceClassification checkpoint or a PEFT SEQ_CLS adapter)"
        )
    return RewardModel(
        model_cfg=rm_cfg.replace(dtype=model_cfg.dtype),
        params=put_tree(params, mesh),
        lora=None,
        lora_cfg=None,
    )


def _load_ensemble(section: RewardModelSection, path: Path, **where: Any) -> RewardModel:
    """The members named in `path/ensemble.json` (PEFT adapters of one shape on one base),
    stacked into one [K, ...] adapter tree."""
    import json

    from jaxrlhf.lora import stack_adapters

    names = json.loads((path / "ensemble.json").read_text()).get("members") or []
    if not names:
        raise ValueError(f"{path / 'ensemble.json'} lists no members")
    models = [
        load_reward_model(dataclasses.replace(section, path=str(path / n)), **where) for n in names
    ]
    if any(m.lora is None for m in models) or len({m.lora_cfg for m in models}) != 1:
        raise ValueError(
            f"{path}: an ensemble's members must be LoRA adapters of one shape on one base"
        )
    lora = stack_adapters([jax.device_get(m.lora) for m in models])
    first = models[0]
    return dataclasses.replace(first, lora=put_tree(lora, where["mesh"]), members=len(models))
