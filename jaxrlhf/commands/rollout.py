"""Rollouts and scoring shared by `ppo` and `grpo`: prompts -> responses -> scores.

The policy adapter is merged into the frozen base once per rollout phase (the merged
kernels live only while sampling) or, with `generation.merge_adapter: false`, applied
unmerged at a fixed `max_rank` so adapters of any smaller rank reuse one program.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxrlhf import data as D
from jaxrlhf.algorithms.ppo import reward_model_scores
from jaxrlhf.config import GenerationConfig, ModelSection, PromptDataConfig, RewardModelSection
from jaxrlhf.lora import LoraConfig, merge, pad_rank
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import unstack_layers
from jaxrlhf.rewards import RewardFuncConfig, compute_rewards
from jaxrlhf.sampling import SamplingConfig, decode_responses, make_generate_fn
from jaxrlhf.sharding import put_tree, shard_batch, tree_shardings


@dataclasses.dataclass(frozen=True)
class PromptSplits:
    train: D.PromptData
    eval: D.PromptData | None
    buckets: tuple[int, ...]


def load_prompts(
    cfg: PromptDataConfig, tokenizer: Any, *, seed: int, source: Any = None
) -> PromptSplits:
    eval_source = None
    if isinstance(source, dict) and "train" in source:  # in-memory {"train": rows, "eval": rows}
        source, eval_source = source["train"], source.get("eval")
    rows = D.load_rows(source if source is not None else cfg.train)
    prompts, report = D.tokenize_prompts(
        rows,
        tokenizer,
        max_prompt_length=cfg.max_prompt_length,
        field=cfg.field,
        skip_bad_rows=cfg.skip_bad_rows,
    )
    if report.n_skipped:
        print(f"data: skipped {report.n_skipped} bad prompt rows of {report.n_rows}")
    eval_prompts = None
    if eval_source is not None or cfg.eval:
        eval_rows = D.load_rows(eval_source if eval_source is not None else cfg.eval)
        eval_prompts, _ = D.tokenize_prompts(
            eval_rows,
            tokenizer,
            max_prompt_length=cfg.max_prompt_length,
            field=cfg.field,
            skip_bad_rows=cfg.skip_bad_rows,
        )
    elif cfg.eval_size:
        tr, ev = D.train_eval_split(len(prompts), eval_size=cfg.eval_size, seed=seed)
        prompts, eval_prompts = prompts.select(tr), prompts.select(ev)
    buckets = tuple(cfg.length_buckets or D.default_buckets(cfg.max_prompt_length, midpoints=False))
    return PromptSplits(train=prompts, eval=eval_prompts, buckets=buckets)


def _per_block(params: Any) -> Any:
    """Merged params with their blocks as separate arrays: what the sampler's decode loop
    reads in place (`models.transformer.unstack_layers`), made by the merge itself so the
    rollout holds one merged copy, not a stacked one and a split one."""
    return {**params, "layers": unstack_layers(params["layers"])}


def host_view(x: Any) -> np.ndarray:
    """A global array on every process's host (all-gathered when there are several)."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


class Sampler:
    """Generates responses for a batch of prompts from the current policy.

    With `mesh` (the run's mesh) the sampler is compiled with explicit shardings: params by
    their logical axes, prompts and responses over ("data", "fsdp"), the KV cache rows over
    ("data", "fsdp") and its kv heads over "tensor" (see `sampling.make_generate_fn`); the
    merged policy comes out of the merge already in the params' shardings."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        gen: GenerationConfig,
        *,
        lora_cfg: LoraConfig | None,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int,
        mesh: Mesh | None = None,
    ):
        self.model_cfg, self.gen, self.lora_cfg, self.mesh = model_cfg, gen, lora_cfg, mesh
        self.sampling = SamplingConfig(
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
        )
        self.generate = make_generate_fn(model_cfg, self.sampling, mesh=mesh)
        lcfg = lora_cfg
        self._merge_fn = lambda base, lora: _per_block(merge(base, lora, lcfg, with_heads=False))
        self._merge = jax.jit(self._merge_fn) if mesh is None else None  # mesh: on first use
        self._join = jax.jit(
            lambda p_ids, p_mask, tokens, resp: (
                jnp.concatenate([p_ids, tokens], axis=1),
                jnp.concatenate([p_mask, resp], axis=1),
            )
        )

    def merged(self, frozen: Any, policy: Any) -> Any:
        """The base with the policy adapter folded in; on a mesh, in the base's shardings
        (`tree_shardings`), which is what the sampler is compiled for."""
        if self._merge is None:
            shapes = jax.eval_shape(self._merge_fn, frozen, policy)
            self._merge = jax.jit(self._merge_fn, out_shardings=tree_shardings(shapes, self.mesh))
        return self._merge(frozen, policy)

    def __call__(
        self, policy: Any, frozen: Any, prompts: dict, key: jax.Array, *, prompt_repeats: int = 1
    ) -> dict:
        """`policy`: the policy adapter tree (LoRA) or the full params (full fine-tuning).
        `prompt_repeats=k`: the rows are groups of k copies of a prompt (`prompt_batch(...,
        repeat=k)`); each prompt is prefilled once for its group."""
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        if self.lora_cfg is None:
            out = self.generate(policy, ids, mask, key, prompt_repeats=prompt_repeats)
        elif self.gen.merge_adapter:
            merged = self.merged(frozen, policy)
            out = self.generate(merged, ids, mask, key, prompt_repeats=prompt_repeats)
            del merged
        else:
            lora = policy if self.gen.max_rank is None else pad_rank(policy, self.gen.max_rank)
            out = self.generate(
                frozen,
                ids,
                mask,
                key,
                lora={"layers": lora["layers"]},
                lora_scale=self.lora_cfg.scale,
                prompt_repeats=prompt_repeats,
            )
        ids, mask = self._join(
            prompts["input_ids"], prompts["attention_mask"], out.tokens, out.response_mask
        )
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "response_mask": out.response_mask,
            "sampler_logprobs": out.logprobs,
            "finished": out.finished,
            "tokens": out.tokens,
        }


class Scorer:
    """Scores responses: a reward model (LoRA or full, on the policy's base or its own) and
    Python reward functions, weighted and summed, with the EOS penalty and clipping."""

    def __init__(
        self,
        *,
        model_cfg: ModelConfig,
        frozen: Any,
        mesh,
        section: RewardModelSection | None,
        funcs: tuple[RewardFuncConfig, ...],
        tokenizer: Any,
        missing_eos_penalty: float | None,
        score_clip: float | None,
        score_scaling: str = "none",
    ):
        self.funcs, self.tokenizer = funcs, tokenizer
        self.missing_eos_penalty, self.score_clip, self.score_scaling = (
            missing_eos_penalty,
            score_clip,
            score_scaling,
        )
        self.rm = None
        if section is not None:
            self.rm = load_reward_model(
                section, model_cfg=model_cfg, frozen=frozen, mesh=mesh, tokenizer=tokenizer
            )
            rm_cfg, rm_scale = self.rm["model_cfg"], self.rm["scale"]
            self._rm_fn = jax.jit(
                lambda p, lora, ids, mask: reward_model_scores(
                    p, lora, rm_scale, ids, mask, model_cfg=rm_cfg
                )
            )
            self.rm_weight = section.weight
            eos = tokenizer.eos_token_id if tokenizer is not None else None
            self.rm_eos = eos if section.append_eos else None

    def reward_model(self, input_ids, attention_mask, finished=None) -> jax.Array:
        """Scores [B]; with `finished` [B] (and `append_eos`), an unfinished row gets one EOS
        appended (a finished one already ends in its EOS) before the score is read."""
        if finished is not None and self.rm_eos is not None:
            input_ids, attention_mask = _append_eos(
                input_ids, attention_mask, finished, jnp.asarray(self.rm_eos, input_ids.dtype)
            )
        return self._rm_fn(self.rm["params"], self.rm["lora"], input_ids, attention_mask)

    def __call__(
        self, rollout: dict, prompts: list, columns: dict[str, list]
    ) -> tuple[np.ndarray, dict[str, float], list[str]]:
        """(scores [B], metrics, completion texts)."""
        completions = decode_responses(
            self.tokenizer, host_view(rollout["tokens"]), host_view(rollout["response_mask"])
        )
        total = np.zeros(len(completions), np.float32)
        metrics: dict[str, float] = {}
        if self.rm is not None:
            rm_scores = host_view(
                self.reward_model(
                    rollout["input_ids"], rollout["attention_mask"], rollout["finished"]
                )
            )
            total += self.rm_weight * rm_scores
            metrics["rewards/reward_model"] = float(rm_scores.mean())
        if self.funcs:
            fn_total, parts = compute_rewards(self.funcs, prompts, completions, columns)
            total += fn_total
            metrics.update({f"rewards/{k}": float(v.mean()) for k, v in parts.items()})
        finished = host_view(rollout["finished"]).astype(bool)
        if self.missing_eos_penalty is not None:
            total = total - self.missing_eos_penalty * (~finished)
        if self.score_clip is not None:
            total = np.clip(total, -self.score_clip, self.score_clip)
        if self.score_scaling == "batch":
            total = (total - total.mean()) / (total.std() + 1e-8)
        metrics["rewards/total"] = float(total.mean())
        return total.astype(np.float32), metrics, completions


@jax.jit
def _append_eos(input_ids, attention_mask, finished, eos):
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
) -> dict:
    """The reward model's params (the policy's frozen base, shared, when `base` is unset),
    its adapter tree and scale (None/1.0 for a full SEQ_CLS model). With `tokenizer` (the
    policy's), a reward model on another base must share its vocabulary."""
    from jaxrlhf.commands.common import load_base
    from jaxrlhf.models.loading import _folder_tokenizer, load_hf_folder
    from jaxrlhf.peft_format import load_peft

    path = Path(section.path)
    if not path.exists():
        raise FileNotFoundError(f"reward_model.path not found: {path}")
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
        return {
            "model_cfg": rm_cfg,
            "params": params,
            "lora": put_tree(lora, mesh),
            "scale": lora_cfg.scale,
            "lora_cfg": lora_cfg,
        }
    rm_cfg, params = load_hf_folder(path)
    has_tokenizer = (path / "tokenizer.json").is_file() or (
        path / "tokenizer_config.json"
    ).is_file()
    if tokenizer is not None and has_tokenizer:
        check_same_vocabulary(tokenizer, _folder_tokenizer(path), where="reward_model.path")
    if "score" not in params:
        raise ValueError(
            f"reward model {path} has no score head (expected a "
            f"*ForSequenceClassification checkpoint or a PEFT SEQ_CLS adapter)"
        )
    return {
        "model_cfg": rm_cfg.replace(dtype=model_cfg.dtype),
        "params": put_tree(params, mesh),
        "lora": None,
        "scale": 1.0,
        "lora_cfg": None,
    }


def prompt_batch(
    prompts: D.PromptData,
    idx: np.ndarray,
    *,
    pad_id: int,
    buckets: tuple[int, ...],
    mesh,
    repeat: int = 1,
) -> tuple[dict, list, dict]:
    """(device batch, prompt values, extra columns) for prompts `idx`, each repeated
    `repeat` times consecutively (GRPO's groups)."""
    idx = np.repeat(np.asarray(idx), repeat)
    # Each process feeds its slice of the global batch; texts are kept for the whole batch,
    # because completions are all-gathered for scoring (see `host_view`).
    local = D.process_slice(
        idx, process_index=jax.process_index(), process_count=jax.process_count()
    )
    bucket = D.bucket_length(max(len(prompts.prompt_ids[i]) for i in idx), buckets)
    batch = D.pad_prompt_batch(prompts, local, pad_id=pad_id, buckets=(bucket,))
    device = shard_batch(
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, mesh
    )
    values = [prompts.prompts[i] for i in idx]
    columns = {k: [v[i] for i in idx] for k, v in prompts.extras.items()}
    return device, values, columns
