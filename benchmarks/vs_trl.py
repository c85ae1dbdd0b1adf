"""jaxrlhf vs TRL + PEFT (PyTorch) on the same model, weights, batch and LoRA settings.

The model is SmolLM2-135M's config with random weights, built once in jaxrlhf and copied
into a transformers model (`state_dict_from_params`), so both sides compute the same function.
LoRA: r=16, alpha=32, dropout 0, all seven projections (+ the score head for the reward model).
Both sides run fp32 on the CPU, no gradient checkpointing (jaxrlhf's default; TRL's
default is on, which recomputes activations), AdamW with clipping at 1.0. With
`dtype="bfloat16"` both hold and compute the frozen base in bf16 (jaxrlhf: `model.dtype` =
`model.param_dtype`; torch: the model cast with `.to(bfloat16)`, no autocast) and keep the
LoRA adapters and their optimizer in fp32 (PEFT upcasts adapters by default).

What is timed on the TRL side: `Trainer.train()` with a callback; one step is
`on_step_begin` → `on_step_end`, i.e. `training_step` (for GRPO: generation, reward, loss;
forward and backward) + gradient clipping + `optimizer.step()` + scheduler + `zero_grad`.
The batch is fetched and collated before `on_step_begin`. After each TRL step the callback
runs one jaxrlhf step (timed separately), so the two alternate in one process and share the
machine's load. The first `warmup` steps of each side are dropped.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks import common as C

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- torch side


def _torch():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 2)))
    return torch


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the model's whole vocabulary: token i is the word `t{i}`
    (0 <unk>, 1 <bos>, 2 <eos> = pad, as SmolLM2's pad is its EOS), so text built from ids
    tokenizes back to exactly those ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<eos>",
    )


def text(ids) -> str:
    return " ".join(f"t{int(i)}" for i in ids)


def hf_model(cfg, params: dict, *, seq_cls: bool, dtype: str = "float32"):
    """A transformers Llama (causal LM or sequence classifier) holding `params` (fp32) in
    `dtype`."""
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from jaxrlhf.models.config import to_hf_dict
    from jaxrlhf.models.hf_names import state_dict_from_params

    torch = _torch()
    raw = {
        k: v
        for k, v in to_hf_dict(cfg).items()
        if k not in ("architectures", "model_type", "torch_dtype")
    }
    if seq_cls:
        raw["num_labels"] = 1
    hf_cfg = AutoConfig.for_model("llama", **raw)
    model = (LlamaForSequenceClassification if seq_cls else LlamaForCausalLM)(hf_cfg)
    sd = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in state_dict_from_params(params, cfg).items()
    }
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = {"lm_head.weight"} if not seq_cls else set()
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.to(getattr(torch, dtype))


def peft_config(task: str):
    import peft

    return peft.LoraConfig(
        task_type=task, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS
    )


def common_args(out_dir: str, steps: int, batch: int) -> dict:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        bf16=False,
        fp16=False,
    )


def _alternating_callback(jax_step):
    from transformers import TrainerCallback

    class Alternate(TrainerCallback):
        """Times each TRL optimizer step, then runs and times one jaxrlhf step."""

        def __init__(self):
            self.trl: list[float] = []
            self.jax: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.trl.append(time.perf_counter() - self._t0)
            t0 = time.perf_counter()
            jax_step()
            self.jax.append(time.perf_counter() - t0)

    return Alternate()


def _train_alternating(trainer_fn, jax_run, *, steps: int, warmup: int) -> dict:
    cb = _alternating_callback(jax_run)
    trainer = trainer_fn(cb, warmup + steps)
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()
    return {
        "trl": C.summarize(cb.trl[warmup:]),
        "jaxrlhf": C.summarize(cb.jax[warmup:]),
        "trl_trainable_params": int(sum(p.numel() for p in trained)),
        "trl_trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trained}),
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
    }


def _entry(
    name: str,
    timed: dict,
    *,
    tokens: int,
    jax_trainable: int,
    what: str,
    trl_flops: float,
    jax_flops: float,
) -> dict:
    """`trl_flops`/`jax_flops`: analytic FLOPs (`common.forward_flops`) of the work each side
    does per step; TRL's counted as the unshared computation (every row with its prompt)."""
    t_trl, t_jax = timed["trl"]["median_s"], timed["jaxrlhf"]["median_s"]
    return {
        "name": name,
        "what": what,
        "tokens": tokens,
        **timed,
        "trl_flops": trl_flops,
        "jaxrlhf_flops": jax_flops,
        "trl_gflops_per_s": trl_flops / t_trl / 1e9,
        "jaxrlhf_gflops_per_s": jax_flops / t_jax / 1e9,
        "jax_trainable_params": jax_trainable,
        "trl_tokens_per_s": tokens / t_trl,
        "jaxrlhf_tokens_per_s": tokens / t_jax,
        "speedup_jaxrlhf_over_trl": t_trl / t_jax,
    }


# ----------------------------------------------------------------------------- the comparisons


def _dpo_unshared_flops(cfg, *, pairs: int, prompt: int, response: int) -> float:
    """Reference forward + policy forward/backward over chosen and rejected rows, each with its
    prompt, vocabulary logits on the response tokens only (a lower bound for TRL)."""
    rows, seq = 2 * pairs, prompt + response
    kw = dict(tokens=rows * seq, context=seq, lm_tokens=rows * response)
    return C.forward_flops(cfg, **kw) + C.train_flops(cfg, lora=True, **kw)


def _grpo_unshared_flops(cfg) -> float:
    """Generation with every row's prompt prefilled, then the update over every row with its
    prompt (logits on completion tokens)."""
    from benchmarks import grpo
    from benchmarks.rollout import decode_flops

    b, p, n = grpo.PROMPTS * grpo.GENERATIONS, grpo.PROMPT_LEN, grpo.NEW_TOKENS
    generate = decode_flops(cfg, batch=b, prompt=p, new_tokens=n)
    update = C.train_flops(cfg, lora=True, tokens=b * (p + n), context=p + n, lm_tokens=b * n)
    return generate + update


def compare_rm(
    cfg, params, tok, *, steps: int, warmup: int, out_dir: str, dtype: str = "float32"
) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from benchmarks import rm

    rng = np.random.default_rng(0)
    p = C.random_ids(rng, (rm.PAIRS, rm.PROMPT), cfg.vocab_size)
    c, r = (
        np.concatenate([p, C.random_ids(rng, (rm.PAIRS, rm.SEQ - rm.PROMPT), cfg.vocab_size)], 1)
        for _ in range(2)
    )
    case, parts = rm.build_case(
        "lora",
        *C.in_dtype(cfg, params, dtype),
        rm.pair_batch(cfg, chosen=c, rejected=r),
        flops=False,
    )
    case.run()
    score = {"score": {"kernel": np.asarray(parts["holder"]["state"].trainable["score"]["kernel"])}}
    model = hf_model(cfg, {**params, **score}, seq_cls=True, dtype=dtype)
    ds = Dataset.from_dict(
        {"chosen_ids": c.tolist() * (steps + warmup), "rejected_ids": r.tolist() * (steps + warmup)}
    )

    def trainer(cb, n):
        args = RewardConfig(**common_args(out_dir, n, rm.PAIRS), max_length=None)
        return RewardTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_config("SEQ_CLS"),
            callbacks=[cb],
        )

    timed = _train_alternating(trainer, case.run, steps=steps, warmup=warmup)
    return _entry(
        "reward model step",
        timed,
        tokens=case.tokens,
        jax_trainable=case.trainable_bytes // 4,
        trl_flops=C.train_flops(cfg, lora=True, tokens=2 * rm.PAIRS * rm.SEQ, context=rm.SEQ),
        jax_flops=case.flops_analytic,
        what="RewardTrainer vs reward_model.make_train_step; 8 pairs × 64 tokens "
        "(32-token prompt shared by chosen and rejected: packed by jaxrlhf, as `rm` does)",
    )


def compare_dpo(
    cfg, params, tok, *, steps: int, warmup: int, out_dir: str, dtype: str = "float32"
) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from benchmarks import dpo

    rng = np.random.default_rng(1)
    n, lp, lr = dpo.PAIRS, dpo.PROMPT, dpo.RESPONSE - 1  # TRL appends EOS to each response
    p = C.random_ids(rng, (n, lp), cfg.vocab_size)
    c = C.random_ids(rng, (n, lr), cfg.vocab_size)
    r = C.random_ids(rng, (n, lr), cfg.vocab_size)
    eos = np.full((n, 1), 2, np.int32)
    batch = dpo.dpo_batch(cfg, ids=(p, np.concatenate([c, eos], 1), np.concatenate([r, eos], 1)))
    case = dpo.build_case("lora", *C.in_dtype(cfg, params, dtype), batch, flops=False)
    model = hf_model(cfg, params, seq_cls=False, dtype=dtype)
    rows = {
        "prompt": [text(x) for x in p],
        "chosen": [" " + text(x) for x in c],
        "rejected": [" " + text(x) for x in r],
    }
    ds = Dataset.from_dict({k: v * (steps + warmup) for k, v in rows.items()})

    def trainer(cb, n_steps):
        args = DPOConfig(
            **common_args(out_dir, n_steps, n),
            beta=0.1,
            max_length=None,
            precompute_ref_log_probs=False,
        )
        return DPOTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_config("CAUSAL_LM"),
            callbacks=[cb],
        )

    timed = _train_alternating(trainer, case.run, steps=steps, warmup=warmup)
    return _entry(
        "DPO step",
        timed,
        tokens=case.tokens,
        jax_trainable=case.trainable_bytes // 4,
        trl_flops=_dpo_unshared_flops(cfg, pairs=n, prompt=lp, response=lr + 1),
        jax_flops=case.flops_analytic,
        what="DPOTrainer vs dpo.make_train_step; 8 pairs, prompt 32 + response 32 "
        "(31 + EOS), reference in the step; packed by jaxrlhf, as `dpo` does",
    )


def compare_grpo(
    cfg, params, tok, *, steps: int, warmup: int, out_dir: str, dtype: str = "float32"
) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks import grpo

    rng = np.random.default_rng(2)
    prompts = C.random_ids(rng, (grpo.PROMPTS, grpo.PROMPT_LEN), cfg.vocab_size)

    def jax_reward(tokens: np.ndarray) -> np.ndarray:
        # The same Python reward TRL gets: the length of each decoded completion.
        return np.asarray([len(s) for s in tok.batch_decode(tokens.tolist())], np.float32)

    case = grpo.build_case(
        "lora", *C.in_dtype(cfg, params, dtype), prompts, reward=jax_reward, flops=False
    )
    model = hf_model(cfg, params, seq_cls=False, dtype=dtype)
    ds = Dataset.from_dict({"prompt": [text(x) for x in prompts] * (steps + warmup)})

    def reward_len(completions, **kwargs):
        return [float(len(s)) for s in completions]

    b = grpo.PROMPTS * grpo.GENERATIONS

    def trainer(cb, n_steps):
        args = GRPOConfig(
            **common_args(out_dir, n_steps, b),
            num_generations=grpo.GENERATIONS,
            max_completion_length=grpo.NEW_TOKENS,
            temperature=1.0,
            beta=0.0,
            loss_type="dapo",
            num_iterations=1,
            log_completions=False,
        )
        return GRPOTrainer(
            model=model,
            reward_funcs=reward_len,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_config("CAUSAL_LM"),
            callbacks=[cb],
        )

    timed = _train_alternating(trainer, case.run, steps=steps, warmup=warmup)
    return _entry(
        "GRPO iteration",
        timed,
        tokens=case.tokens,
        jax_trainable=case.trainable_bytes // 4,
        trl_flops=_grpo_unshared_flops(cfg),
        jax_flops=case.flops_analytic,
        what="GRPOTrainer (transformers generate) vs a jaxrlhf GRPO iteration; 4 "
        "prompts × 4 completions, prompt 32 + 32 new tokens, β = 0",
    )


def run(
    *,
    size: str = "135M",
    steps: int,
    warmup: int = 2,
    only: tuple[str, ...] = ("rm", "dpo", "grpo"),
    dtype: str = "float32",
) -> dict:
    """`dtype`: of the frozen base on both sides (float32 or bfloat16)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import peft  # noqa: F401
        import trl
    except ImportError as e:
        return {"benchmark": "trl", "skipped": f"TRL/PEFT not importable: {e}"}
    torch = _torch()
    cfg = C.model_config(size)
    params = C.random_params(cfg)
    tok = word_tokenizer(cfg.vocab_size)
    result = {
        "benchmark": "trl",
        "size": size,
        "model": C.size_info(cfg),
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "trl_version": trl.__version__,
        "dtype": dtype,
        "rows": [],
    }
    fns = {"rm": compare_rm, "dpo": compare_dpo, "grpo": compare_grpo}
    with tempfile.TemporaryDirectory() as out_dir:
        for name in only:
            print(f"[trl] {name} ({size})", flush=True)
            try:
                result["rows"].append(
                    fns[name](
                        cfg, params, tok, steps=steps, warmup=warmup, out_dir=out_dir, dtype=dtype
                    )
                )
            except Exception as e:  # noqa: BLE001 - report, keep the other comparisons
                import traceback

                traceback.print_exc()
                result["rows"].append({"name": name, "error": f"{type(e).__name__}: {e}"})
    has_ppo = hasattr(trl, "PPOTrainer")
    if not has_ppo:
        try:
            import trl.experimental as tx

            has_ppo = hasattr(tx, "PPOTrainer") or _has_module(tx, "ppo")
        except ImportError:
            pass
    result["ppo"] = (
        "TRL has a PPOTrainer (not benchmarked here)"
        if has_ppo
        else f"TRL {trl.__version__} has no PPOTrainer (neither trl nor trl.experimental)"
    )
    return result


def _model_name(size: str) -> str:
    return "SmolLM2-135M's config" if size == "135M" else f"the {size} benchmark config"


def _has_module(pkg, name: str) -> bool:
    import pkgutil

    return any(m.name == name for m in pkgutil.iter_modules(pkg.__path__))


def _gflop(row: dict, side: str) -> str:
    return C.fmt(row[f"{side}_flops"] / 1e9, 0) if f"{side}_flops" in row else "–"


def _share(row: dict, side: str, roof: float | None) -> str:
    if not roof or f"{side}_gflops_per_s" not in row:
        return "–"
    return f"{100 * row[f'{side}_gflops_per_s'] / roof:.0f}%"


def _precision(result: dict) -> str:
    dtype = result.get("dtype", "float32")
    if dtype == "float32":
        return "fp32 on both sides"
    peft = ", ".join(
        f"{r['name']} {'+'.join(r['trl_trainable_dtypes'])}"
        for r in result["rows"]
        if r.get("trl_trainable_dtypes")
    )
    return (
        f"the frozen base in {dtype} on both sides; trained parameters fp32 in jaxrlhf, in "
        f"PEFT: {peft or '?'}"
    )


def render(result: dict) -> str:
    if result.get("skipped"):
        return f"Skipped: {result['skipped']}"
    roof = (result.get("roofline_used") or {}).get("matmul_fp32_gflops")
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["name"], "error: " + r["error"], "", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                r["name"],
                f"{r['trl']['median_s']:.3f} (n={r['trl']['n']})",
                f"{r['jaxrlhf']['median_s']:.3f} (n={r['jaxrlhf']['n']})",
                C.fmt(r["trl_tokens_per_s"], 0),
                C.fmt(r["jaxrlhf_tokens_per_s"], 0),
                f"**{r['speedup_jaxrlhf_over_trl']:.2f}×**",
                f"{_gflop(r, 'trl')} / {_gflop(r, 'jaxrlhf')}",
                f"{_share(r, 'trl', roof)} / {_share(r, 'jaxrlhf', roof)}",
                f"{r['trl_trainable_params']:,} / "
                + (f"{r['jax_trainable_params']:,}" if r.get("jax_trainable_params") else "–"),
            ]
        )
    rows.append(["PPO iteration", "n/a", "see the PPO table", "", "", "", "", "", ""])
    m = result["model"]
    return "\n".join(
        [
            f"Model: {_model_name(result['size'])}, random weights ({m['params'] / 1e6:.0f}M params), the "
            f"same weights in both; {_precision(result)}; torch threads "
            f"{result['torch_threads']}; TRL "
            f"{result['trl_version']}. {result['steps']} timed steps per side after "
            f"{result['warmup']} warm-up, alternating TRL and jaxrlhf steps in one process. "
            f"PPO: {result['ppo']}.",
            "",
            C.table(
                [
                    "step",
                    "TRL + PEFT, s (median)",
                    "jaxrlhf, s (median)",
                    "TRL tokens/s",
                    "jaxrlhf tokens/s",
                    "jaxrlhf / TRL throughput",
                    "GFLOP / step TRL / jaxrlhf",
                    "% fp32 matmul roofline TRL / jaxrlhf",
                    "trainable params TRL / jaxrlhf",
                ],
                rows,
            ),
            "",
            "\n".join(f"- {r['name']}: {r['what']}." for r in result["rows"] if "what" in r),
            "",
            "FLOPs are analytic (`benchmarks/common.py: forward_flops`), the same formula on both "
            "sides: for TRL the unshared computation (every chosen, rejected or sampled row with "
            "its own prompt; vocabulary logits on response tokens only, a lower bound), for "
            "jaxrlhf the work it schedules (prompt once, response-only logits). The roofline "
            "share is achieved GFLOP/s over the fp32 matmul rate measured in the same run: how "
            "close each side runs to the machine, apart from how much work it chose to do.",
        ]
    )
