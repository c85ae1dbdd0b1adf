"""One step / iteration of each newer algorithm, LoRA vs full fine-tuning, on SmolLM2-135M.

The model is `model.path=default` (the embedded SmolLM2-135M-Instruct GGUF, dequantized to
fp32), not random weights. Each algorithm is built and timed by the existing benchmarks'
own cases, both modes side by side in one process (`harness.run_cases`):

- preference (`benchmarks.dpo.build_case`, the batch of `dpo.dpo_batch`: 8 rows, prompt 32
  + completions 32, packed with the prompt once): KTO (its "rejected" row is the KL
  completion; the reference runs in the step, half the rows desirable), ORPO and CPO
  (reference-free: full fine-tuning keeps no frozen copy), SimPO (`cpo` with
  `loss_type: simpo, cpo_alpha: 0`);
- online (`benchmarks.grpo.build_case`: 4 prompts × G=4, prompt 32 + 32 sampled tokens):
  RLOO (TRL's β = 0.05: a reference pass in prepare) and REINFORCE++ (OpenRLHF's kl_coef
  0.01, the same), μ = 1, one optimizer step.

TRL's defaults otherwise (β = 0.1 for the preference losses).
"""

from __future__ import annotations

import numpy as np

from benchmarks import common as C
from benchmarks import dpo, grpo
from benchmarks.harness import render_phases, render_sizes, run_cases

PREFERENCE = {
    "kto": ("kto", {}),
    "orpo": ("orpo", {}),
    "cpo": ("cpo", {}),
    "simpo": ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0}),
}
ONLINE = {"rloo": ("rloo", {}), "reinforce_pp": ("reinforce_pp", {})}


def load_model(size: str):
    """(ModelConfig, host params): `default` loads `model.path=default` (fp32); a size of
    `common.SIZES` (the quick run's "2M") is a random model of that config."""
    if size != "default":
        cfg = C.model_config(size)
        return cfg, C.random_params(cfg)
    from jaxrlhf.config import ModelSection
    from jaxrlhf.models.base import load_base

    cfg, params, _ = load_base(ModelSection(path="default"), log=lambda *a: None)
    return cfg, params


def kto_labels(batch: dict) -> dict:
    """Half the rows desirable (margin 1), half not, as KTO's batch carries its labels."""
    import jax.numpy as jnp

    pairs = batch["pair_mask"].shape[-1]
    return {**batch, "margin": jnp.asarray(np.arange(pairs) % 2 == 0, jnp.float32)[None]}


def run(
    *, repeats: int, roofline: dict | None, size: str = "default", only: list[str] | None = None
) -> dict:
    cfg, params = load_model(size)
    result = {
        "benchmark": "algorithms",
        "model": {"path": size, **C.size_info(cfg)},
        "preference_batch": {
            "pairs": dpo.PAIRS,
            "prompt": dpo.PROMPT,
            "response": dpo.RESPONSE,
        },
        "online_batch": {
            "prompts": grpo.PROMPTS,
            "generations": grpo.GENERATIONS,
            "prompt": grpo.PROMPT_LEN,
            "new_tokens": grpo.NEW_TOKENS,
        },
        "sizes": [],
    }
    batch = dpo.dpo_batch(cfg)
    prompts = C.random_ids(
        np.random.default_rng(0), (grpo.PROMPTS, grpo.PROMPT_LEN), cfg.vocab_size
    )
    for name, (module, options) in {**PREFERENCE, **ONLINE}.items():
        if only and name not in only:
            continue
        print(f"[algorithms] {name}", flush=True)
        if name in PREFERENCE:
            b = kto_labels(batch) if module == "kto" else batch
            cases = [
                dpo.build_case(mode, cfg, params, b, algorithm=module, options=options)
                for mode in ("lora", "full")
            ]
        else:
            cases = [
                grpo.build_case(mode, cfg, params, prompts, algorithm=module, options=options)
                for mode in ("lora", "full")
            ]
        entry = {"size": name, "model": C.size_info(cfg)}
        entry.update(run_cases(cases, repeats=repeats, roofline=roofline))
        result["sizes"].append(entry)
        del cases
    return result


def render(result: dict) -> str:
    p, o = result["preference_batch"], result["online_batch"]
    table = render_sizes(result, what="step / iteration").replace(
        "| model |", "| algorithm (model) |", 1
    )
    return "\n".join(
        [
            (
                "SmolLM2-135M-Instruct's own weights (`model.path=default`, the embedded "
                "GGUF, fp32). "
                if result["model"]["path"] == "default"
                else f"A random {result['model']['path']} model. "
            )
            + "Preference algorithms: one optimizer step on "
            f"{p['pairs']} rows, prompt {p['prompt']} + completions {p['response']} tokens, "
            "packed with the prompt once (KTO: completion and KL completion; reference in the "
            "step; ORPO, CPO, SimPO: no reference, so full fine-tuning keeps no frozen copy). "
            f"Online: one iteration of {o['prompts']} prompts × G={o['generations']}, prompt "
            f"{o['prompt']} + {o['new_tokens']} sampled tokens, sample → score → prepare "
            "(the reference pass: RLOO β = 0.05, REINFORCE++ kl_coef 0.01) → one optimizer "
            "step. SimPO = `cpo` with `loss_type: simpo, cpo_alpha: 0`. LoRA r=16, α=32, 7 "
            "projections. FLOPs: XLA's for the steps, analytic for generation.",
            "",
            table,
            "",
            "Phases of an online iteration (median s, share):",
            "",
            render_phases(result),
            "",
            "Every timed repeat (s), min – max, to read the medians by:",
            "",
            render_ranges(result),
        ]
    )


def render_ranges(result: dict) -> str:
    """Each case's timed repeats: on a loaded machine the spread is the honest figure."""
    rows = []
    for entry in result["sizes"]:
        for mode in ("lora", "full"):
            t = entry[mode]["time"]
            rows.append(
                [
                    entry["size"],
                    mode,
                    f"{t['min_s']:.2f} – {t['max_s']:.2f}",
                    ", ".join(f"{x:.2f}" for x in t["times_s"]),
                ]
            )
    return C.table(["algorithm", "mode", "min – max, s", "repeats, s"], rows)
