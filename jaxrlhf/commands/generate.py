"""`jaxrlhf generate` (print completions) and `jaxrlhf export` (PEFT adapter / merged model)."""

from __future__ import annotations

import argparse

import jax
import numpy as np
from jax.sharding import Mesh

from jaxrlhf import data as D
from jaxrlhf.config import ModelSection
from jaxrlhf.models.base import load_base
from jaxrlhf.rollout import SamplingConfig, decode_text, make_generate_fn

DEFAULT_PROMPT = "What is the capital of France?"


def generate_texts(
    model: str,
    prompts: list[str],
    *,
    adapter: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> list[str]:
    """Completions of `prompts` by `model` (with `adapter` merged when given). With `mesh`,
    the params are split by their logical axes and the prompts and KV cache by rows / kv
    heads (`make_generate_fn(..., mesh=mesh)`); without, one device runs it."""
    cfg, params, tokenizer = load_base(ModelSection(path=model, adapter=adapter))
    rows = [{"prompt": [{"role": "user", "content": p}] if chat else p} for p in prompts]
    data, _ = D.tokenize_prompts(rows, tokenizer, max_prompt_length=1024)
    batch = D.pad_prompt_batch(
        data,
        np.arange(len(data)),
        pad_id=tokenizer.pad_token_id,
        buckets=D.default_buckets(1024, midpoints=False),
    )
    sampling = SamplingConfig.for_model(
        cfg,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        pad_token_id=tokenizer.pad_token_id,
    )
    fn = make_generate_fn(cfg, sampling, mesh=mesh)
    out = fn(params, batch["input_ids"], batch["attention_mask"], jax.random.PRNGKey(seed))
    return decode_text(tokenizer, out)


def run_generate(args: argparse.Namespace) -> None:
    prompts = args.prompts or [DEFAULT_PROMPT]
    texts = generate_texts(
        args.model,
        prompts,
        adapter=args.adapter,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    for prompt, text in zip(prompts, texts, strict=True):
        print(f">>> {prompt}\n{text}\n")


def run_export(args: argparse.Namespace) -> None:
    """Re-export a run's adapter (normalised PEFT folder) and/or the merged model."""
    from jaxrlhf.peft_format import export_merged, export_peft, load_peft

    if not (args.peft or args.merged):
        raise ValueError("give --peft OUT and/or --merged OUT")
    cfg, params, tokenizer = load_base(ModelSection(path=args.model))
    lora, lora_cfg = load_peft(args.adapter, cfg)
    if args.peft:
        export_peft(lora, lora_cfg, cfg, args.peft, base_model_name_or_path=args.model)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.peft)
        print(f"adapter -> {args.peft}")
    if args.merged:
        export_merged(params, lora, lora_cfg, cfg, args.merged, tokenizer=tokenizer)
        print(f"merged model -> {args.merged}")
