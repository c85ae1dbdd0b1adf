"""A quantized frozen base (`jaxrlhf.models.quant`) on the embedded SmolLM2-135M: quality,
resident bytes, decode throughput and a LoRA reward-model step, per kind, in one process.

The reference is `load_model("default")`: the shipped Q4_1/Q8_0 GGUF dequantized to fp32.
Kinds: `gguf` keeps the file's own blocks (the same values as the reference, so its KL is
0 up to float reassociation); `int8` and `nf4` re-quantize the reference's fp32 weights
(NF4 with and without double quantization, and with the embedding kept in fp32; GGUF
Q4_0 made the same way, for scale).

- quality: mean KL(reference ‖ kind) of the next-token distributions and the perplexity of
  each on a fixed text (`TEXT`);
- bytes: resident bytes of the base (packed codes + scales) over its fp32 bytes;
- decode: `generate` compiled for N and for 1 new tokens, step time = their difference over
  N − 1 (as benchmarks/decode.py), at batch 1 and 16, with an unmerged LoRA adapter (the
  quantized base is never merged into);
- rm step: forward + backward of a Bradley–Terry loss w.r.t. a LoRA adapter + score head
  (8 pairs of 64 tokens), the base closed over.
Decode and rm programs of every kind are timed interleaved round by round (common.py), so
the ratios to fp32 share the machine's load.

Two more parts, each with its own results file:
- memory (`quant_memory.json`): per kind, the base's load alone and a short real
  `jaxrlhf rm` (also with `model.remat=block`) and `jaxrlhf grpo` run (also with
  `generation.dequantize_base=true`), each in a fresh process: its peak resident set
  (`os.wait4`, `common.run_child`), wall time and the frozen base's bytes as the run reports them;
- dense (`quant_dense.json`): one whole rollout call (`rollout.engine.Sampler`) on the fp32
  base (adapter merged), on the kept GGUF base unmerged (packed, the default) and from the
  dense copy that `generation.dequantize_base=true` makes per call (its time included), at
  batch 1 and 16, 16 and 32 new tokens; and `merged_rollout_weights` alone: time and bytes.

    PYTHONPATH=. python -m benchmarks.quant [--repeats 3] [--only quality,hlo,memory,dense]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press into a "
    "system that could produce books far faster than scribes. Within fifty years, presses "
    "were operating in more than two hundred cities across Europe, and millions of volumes "
    "had been printed. The spread of printed material changed how people learned, argued "
    "and worshipped: scientific results could be shared and checked, pamphlets carried "
    "political ideas to ordinary readers, and standard spellings slowly emerged as printers "
    "chose one form over another. Historians still debate how quickly literacy rose, but "
    "few doubt that the press helped make the modern world.\n\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])\n"
)
PROMPT_LEN, NEW_TOKENS, BATCHES = 32, 16, (1, 16)
PAIRS, SEQ = 8, 64
TIMED = ("fp32", "gguf", "int8", "nf4")  # the kinds whose decode and rm step are timed


def variants(ref: dict) -> dict[str, dict]:
    from jaxrlhf.models import loading
    from jaxrlhf.models import quant as Q

    _, kept, _ = loading.load_gguf(loading.default_model_path(), keep_quantized=True)
    return {
        "fp32": ref,
        "gguf": kept,
        "int8": Q.quantize_params(ref, Q.QuantConfig(kind="int8")),
        "nf4": Q.quantize_params(ref, Q.QuantConfig(kind="nf4")),
        "nf4 (no double quant)": Q.quantize_params(
            ref, Q.QuantConfig(kind="nf4", double_quant=False)
        ),
        "nf4 (fp32 embedding)": Q.quantize_params(ref, Q.QuantConfig(kind="nf4", skip=("embed",))),
        # For scale: llama.cpp's own 4-bit format applied the same way (re-quantizing fp32).
        "Q4_0 (re-quantized)": Q.quantize_params(
            ref, "none", quantizer=functools.partial(Q.quantize_gguf, type_name="Q4_0")
        ),
    }


def quality(cfg, params: dict[str, dict], tokenizer) -> dict[str, dict]:
    from jaxrlhf.models.transformer import forward

    ids = jnp.asarray(tokenizer([TEXT], return_tensors="np")["input_ids"], jnp.int32)
    mask = jnp.ones_like(ids)
    fwd = jax.jit(lambda p: jax.nn.log_softmax(forward(p, ids, mask, cfg=cfg)[0, :-1], -1))
    targets = ids[0, 1:]
    ref_lp = fwd(params["fp32"])
    out = {}
    for name, p in params.items():
        lp = fwd(p)
        kl = jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp), -1)
        nll = -jnp.take_along_axis(lp, targets[:, None], -1)[:, 0]
        out[name] = {
            "mean_kl": float(jnp.mean(kl)),
            "max_kl": float(jnp.max(kl)),
            "perplexity": float(jnp.exp(jnp.mean(nll))),
            "top1_agreement": float(jnp.mean(jnp.argmax(lp, -1) == jnp.argmax(ref_lp, -1))),
        }
    out["_tokens"] = int(targets.shape[0])
    return out


def _generate(gen, params, ids, mask, key, lora, scale) -> None:
    C.block(gen(params, ids, mask, key, lora=lora, lora_scale=scale))


def decode_thunks(cfg, params: dict[str, dict], lora, lora_cfg, batch: int) -> dict:
    from jaxrlhf.rollout.sampling import SamplingConfig, make_generate_fn

    thunks = {}
    key = jax.random.PRNGKey(0)
    ids = jnp.asarray(
        C.random_ids(np.random.default_rng(batch), (batch, PROMPT_LEN), cfg.vocab_size)
    )
    mask = jnp.ones_like(ids)
    for n in (NEW_TOKENS, 1):
        # No EOS: every row runs all n steps.
        gen = make_generate_fn(
            cfg, SamplingConfig(max_new_tokens=n, eos_token_ids=(), pad_token_id=0, greedy=True)
        )
        for name, p in params.items():
            thunks[f"{name}/{n}"] = functools.partial(
                _generate, gen, p, ids, mask, key, lora, lora_cfg.scale
            )
    return thunks


def _release() -> None:
    """Drop compiled programs: two dozen unrolled 30-block decoders in one process exceed
    the kernel's limit on memory mappings (LLVM: "Unable to allocate section memory")."""
    import gc

    gc.collect()
    jax.clear_caches()


def rm_thunks(cfg, params: dict[str, dict], lora, lora_cfg) -> dict:
    from jaxrlhf.models.transformer import forward

    rng = np.random.default_rng(0)
    chosen = jnp.asarray(C.random_ids(rng, (PAIRS, SEQ), cfg.vocab_size))
    rejected = jnp.asarray(C.random_ids(rng, (PAIRS, SEQ), cfg.vocab_size))
    mask = jnp.ones_like(chosen)

    def loss(lora, base):
        both = jnp.concatenate([chosen, rejected])
        r = forward(
            base,
            both,
            jnp.concatenate([mask, mask]),
            cfg=cfg,
            head="score",
            lora=lora,
            lora_scale=lora_cfg.scale,
        )
        return -jnp.mean(jax.nn.log_sigmoid(r[:PAIRS] - r[PAIRS:]))

    step = jax.jit(jax.value_and_grad(loss))
    return {
        name: functools.partial(lambda p: C.block(step(lora, p)), p) for name, p in params.items()
    }


def dequant_in_hlo(*, repeats: int) -> dict:
    """What XLA:CPU makes of `linear` on one quantized [576, 1536] kernel (SmolLM2's
    gate_proj): how many weight-sized float32 buffers the optimized HLO's entry computation
    creates (a dequantize fused into the dot creates none), and the time per call against
    the fp32 kernel at 1, 16 and 1024 tokens (interleaved)."""
    from jaxrlhf.models import quant as Q
    from jaxrlhf.models.transformer import linear

    w = (0.02 * np.random.default_rng(0).normal(size=(576, 1536))).astype(np.float32)
    kernels = {
        "fp32": jnp.asarray(w),
        "int8": Q.quantize_int8(w),
        "nf4": Q.quantize_nf4(w),
        "q4_0": Q.quantize_gguf(w, "Q4_0"),
        "q4_1": Q.quantize_gguf(w, "Q4_1"),
        "q8_0": Q.quantize_gguf(w, "Q8_0"),
    }
    fn = jax.jit(lambda x, k: linear(x, {"kernel": k}, None, 1.0))
    out: dict = {}
    for tokens in (1, 16, 1024):
        x = jnp.ones((tokens, 576), jnp.float32)
        thunks = {}
        for name, k in kernels.items():
            hlo = fn.lower(x, k).compile().as_text()
            n = len(C.entry_float_buffers(hlo, w.shape))
            out[f"{name}/t{tokens}"] = {"weight_sized_f32_buffers": n}
            thunks[name] = functools.partial(lambda x, k: C.block(fn(x, k)), x, k)
        timed = C.interleaved(thunks, repeats=repeats, warmup=2)
        for name, t in timed.items():
            out[f"{name}/t{tokens}"]["call_s"] = t["median_s"]
    return out


def run(*, repeats: int) -> dict:
    from jaxrlhf.lora import init_lora, tree_bytes
    from jaxrlhf.models import loading
    from jaxrlhf.models import quant as Q
    from jaxrlhf.models.transformer import init_head

    t0 = time.perf_counter()
    cfg, ref, tok = loading.load_model("default")
    params = variants(ref)
    params = {k: jax.tree.map(jnp.asarray, v) for k, v in params.items()}
    print(f"[quant] loaded and quantized in {time.perf_counter() - t0:.0f} s", flush=True)
    fp32 = Q.float32_bytes({k: v for k, v in ref.items() if k not in ("score", "value")})
    result: dict = {"benchmark": "quant", "bytes": {}, "quality": quality(cfg, params, tok)}
    for name, p in params.items():
        result["bytes"][name] = {
            "resident": tree_bytes(p),
            "fp32": fp32,
            "ratio": tree_bytes(p) / fp32,
        }
    print(f"[quant] quality {result['quality']}", flush=True)
    _release()

    lora_cfg = C.lora_config("SEQ_CLS", ("score",))
    base_with_head = {**ref, "score": init_head(jax.random.PRNGKey(3), cfg, "score")}
    lora = init_lora(jax.random.PRNGKey(1), base_with_head, lora_cfg, cfg)
    timed: dict = {"decode": {}, "rm": {}}
    timed_kinds = {k: params[k] for k in TIMED}
    for b in BATCHES:
        t = C.interleaved(
            decode_thunks(cfg, timed_kinds, lora, lora_cfg, b), repeats=repeats, warmup=1
        )
        for name in TIMED:
            long, short = t[f"{name}/{NEW_TOKENS}"], t[f"{name}/1"]
            step = (long["median_s"] - short["median_s"]) / (NEW_TOKENS - 1)
            timed["decode"][f"{name}/b{b}"] = {"step_s": step, "tokens_per_s": b / step}
        print(f"[quant] decode b={b} {timed['decode']}", flush=True)
        _release()
    rm = C.interleaved(rm_thunks(cfg, timed_kinds, lora, lora_cfg), repeats=repeats, warmup=1)
    timed["rm"] = {name: {"step_s": r["median_s"]} for name, r in rm.items()}
    result.update(timed)
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def render(result: dict) -> str:
    q, by, dec, rm = result["quality"], result["bytes"], result["decode"], result["rm"]
    rows = []
    for name in by:
        timed = name in rm
        d1, d16 = (dec[f"{name}/b1"], dec[f"{name}/b16"]) if timed else ({}, {})

        def rate(d, b):
            if not d:
                return "–"
            return f"{d['tokens_per_s']:.1f} ({d['tokens_per_s'] / dec[f'fp32/b{b}']['tokens_per_s']:.2f}x)"

        step = (
            f"{rm[name]['step_s']:.2f} s ({rm[name]['step_s'] / rm['fp32']['step_s']:.2f}x)"
            if timed
            else "–"
        )
        rows.append(
            [
                name,
                C.fmt_bytes(by[name]["resident"]),
                f"{by[name]['ratio']:.3f}",
                f"{q[name]['mean_kl']:.4f}",
                f"{q[name]['perplexity']:.2f}",
                f"{100 * q[name]['top1_agreement']:.1f}%",
                rate(d1, 1),
                rate(d16, 16),
                step,
            ]
        )
    headers = [
        "base",
        "resident",
        "/ fp32",
        "mean KL",
        "ppl",
        "top-1 = fp32",
        "decode tok/s b=1",
        "decode tok/s b=16",
        "LoRA RM fwd+bwd",
    ]
    return C.table(headers, rows) + f"\n\n({q['_tokens']} tokens of text for KL/perplexity)"


# ----------------------------------------------------------------------------- whole runs

RUN_KINDS = ("none", "int8", "nf4", "gguf")
RM_PAIRS, RM_STEPS = 48, 4  # the demo's reward-model batch (16) and max_length (48)
GRPO_STEPS, GRPO_NEW_TOKENS = 2, 16
COMMON_OVERRIDES = ("model.path=default", "mesh.data=1", "run.progress=false")


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` pairs of `configs/data/case_pairs.jsonl`'s kind: an upper-case reply is chosen
    over the same reply in lower case."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    rows = []
    for _ in range(n):
        words = [
            "".join(rng.choice(letters, rng.integers(2, 6))) for _ in range(rng.integers(2, 4))
        ]
        reply = " " + " ".join(words)
        rows.append(
            {"prompt": f"say: {words[0]}", "chosen": reply.upper(), "rejected": reply.lower()}
        )
    return rows


# The load alone, as a run does it: `models.base.load_base` (host arrays), then on the device.
_LOAD_SCRIPT = (
    "import sys, jax, jax.numpy as jnp\n"
    "from jaxrlhf.config import ModelSection\n"
    "from jaxrlhf.models.base import load_base\n"
    "from jaxrlhf.models.quant import QuantConfig\n"
    "_, base, _ = load_base(ModelSection(path='default', quant=QuantConfig(kind=sys.argv[1])))\n"
    "jax.block_until_ready(jax.tree.map(jnp.asarray, base))\n"
    "from jaxrlhf.lora import tree_bytes\n"
    "print(f'|| frozen: {tree_bytes(base) / 2**20:.2f} MiB')\n"  # as `frozen_mib` reads it
)


def load_command(kind: str) -> list[str]:
    return ["-c", _LOAD_SCRIPT, kind]


def rm_command(kind: str, pairs: Path, run_dir: Path, *, remat: str = "none") -> list[str]:
    """A LoRA SEQ_CLS reward model on SmolLM2-135M (`configs/rm_tiny.yaml`'s adapter, r 8)."""
    return [
        *("-m", "jaxrlhf.cli", "rm", "--config", str(C.ROOT / "configs/rm_tiny.yaml")),
        *COMMON_OVERRIDES,
        f"model.quant={kind}",
        f"model.remat={remat}",
        f"data.train={pairs}",
        "data.max_length=48",
        "batch_size=16",
        f"max_steps={RM_STEPS}",
        f"run.run_dir={run_dir}",
        "run.eval_every=1000",
        "run.save_every=1000",
    ]


def grpo_command(kind: str, run_dir: Path, *, dequantize_base: bool = False) -> list[str]:
    """GRPO on SmolLM2-135M with `configs/grpo_tiny.yaml`'s prompts and Python reward
    (share of lowercase letters): 4 prompts × 4 completions of 16 tokens per step."""
    return [
        *("-m", "jaxrlhf.cli", "grpo", "--config", str(C.ROOT / "configs/grpo_tiny.yaml")),
        *COMMON_OVERRIDES,
        f"model.quant={kind}",
        f"generation.dequantize_base={str(dequantize_base).lower()}",
        f"generation.max_new_tokens={GRPO_NEW_TOKENS}",
        "num_generations=4",
        "prompts_per_iteration=4",
        f"max_steps={GRPO_STEPS}",
        f"run.run_dir={run_dir}",
    ]


_FROZEN = re.compile(r"\|\| frozen: ([0-9.]+) MiB")


def frozen_mib(log_text: str) -> float | None:
    """The frozen base's resident MiB from a run's log (`lora.TrainableSummary`'s line, i.e.
    `tree_bytes` of the base the run holds: packed codes + scales when quantized)."""
    found = _FROZEN.search(log_text)
    return float(found.group(1)) if found else None


def whole_runs(out_dir: Path) -> dict:
    """Per command and kind: wall time, peak RSS, resident frozen base (one run each; the
    peak does not depend on the machine's load, the wall time does)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = out_dir / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(RM_PAIRS)))
    cases = {f"load/{k}": load_command(k) for k in RUN_KINDS}
    cases |= {f"rm/{k}": rm_command(k, pairs, out_dir / f"rm_{k}") for k in RUN_KINDS}
    # What is left besides the base: the backward's saved activations, which block
    # rematerialisation trades for a second forward.
    for k in ("none", "gguf"):
        cases[f"rm/{k}+remat"] = rm_command(k, pairs, out_dir / f"rm_{k}_remat", remat="block")
    cases |= {f"grpo/{k}": grpo_command(k, out_dir / f"grpo_{k}") for k in RUN_KINDS}
    cases["grpo/gguf+dense"] = grpo_command(
        "gguf", out_dir / "grpo_gguf_dense", dequantize_base=True
    )
    result = {}
    for name, args in cases.items():
        log_path = out_dir / (name.replace("/", "_").replace("+", "_") + ".log")
        r = C.run_child(args, log_path)
        r["frozen_mib"] = frozen_mib(log_path.read_text())
        r["loadavg_after"] = C.load_average()
        result[name] = r
        print(f"[quant] {name}: {r}", flush=True)
    return result


def render_memory(runs: dict) -> str:
    rows = []
    for name, r in runs.items():
        command, kind = name.split("/")
        base = runs[f"{command}/none"]
        rows.append(
            [
                command,
                kind.replace("none", "fp32"),
                C.fmt(r["frozen_mib"], 1),
                f"{r['peak_rss'] / C.MIB:.0f} ({r['peak_rss'] / base['peak_rss']:.2f}x)",
                f"{r['wall_s']:.0f} ({r['wall_s'] / base['wall_s']:.2f}x)",
            ]
        )
    headers = ["command", "kind", "resident base (MiB)", "whole-run peak RSS (MiB)", "wall s"]
    return C.table(headers, rows)


# ----------------------------------------------------------------------------- dense copy

DENSE_NEW_TOKENS = (16, 32)


def _rollout(sampler, lora, base, prompts, key) -> tuple[int, ...]:
    out = sampler.generate(lora, base, prompts, key)
    C.block((out.tokens, out.sampler_logprobs))
    return tuple(int(n) for n in out.response_mask.sum(-1))  # tokens each row decoded


def rollout_thunks(cfg, ref, kept, lora, lora_cfg, batch: int, new_tokens: int) -> dict:
    """One whole rollout call per arm. `fp32` and `gguf dense` share one sampler (merge
    per call, then the float decode program); `gguf packed` decodes on the kept blocks
    with the adapter unmerged (`generation.dequantize_base=false`, the default)."""
    from jaxrlhf.config import GenerationConfig
    from jaxrlhf.rollout.engine import Sampler

    ids = jnp.asarray(
        C.random_ids(np.random.default_rng(batch), (batch, PROMPT_LEN), cfg.vocab_size)
    )
    prompts = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    key = jax.random.PRNGKey(0)

    def sampler(merge: bool):
        # No EOS: every row runs all `new_tokens` steps.
        gen = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, merge_adapter=merge)
        return Sampler(cfg, gen, lora_cfg=lora_cfg, eos_token_ids=(), pad_token_id=0)

    merged, unmerged = sampler(True), sampler(False)
    arms = {"fp32": (merged, ref), "gguf packed": (unmerged, kept), "gguf dense": (merged, kept)}
    return {
        name: functools.partial(_rollout, s, lora, base, prompts, key)
        for name, (s, base) in arms.items()
    }


def dense_copy(ref, kept, lora, lora_cfg, *, repeats: int) -> dict:
    """`merged_rollout_weights` alone (jitted, as the sampler calls it) on the fp32 and on
    the kept GGUF base: time per call, the copy's bytes and the program's working set."""
    from jaxrlhf.rollout.engine import merged_rollout_weights

    def merge(base, lora):
        return merged_rollout_weights(base, lora, lora_cfg)

    out, thunks = {}, {}
    for name, base in (("fp32", ref), ("gguf", kept)):
        compiled, stats = C.compile_program(merge, base, lora)
        copy = compiled(base, lora)
        out[name] = {"copy_bytes": C.tree_bytes(copy), "base_bytes": C.tree_bytes(base), **stats}
        del copy
        thunks[name] = functools.partial(lambda c, b: C.block(c(b, lora)), compiled, base)
    for name, t in C.interleaved(thunks, repeats=3 * repeats, warmup=1).items():
        out[name]["call_s"] = t["median_s"]
    return out


def dense_rollouts(*, repeats: int) -> dict:
    from jaxrlhf.lora import init_lora
    from jaxrlhf.models import loading

    cfg, ref, _ = loading.load_model("default")
    _, kept, _ = loading.load_gguf(loading.default_model_path(), keep_quantized=True)
    ref, kept = (jax.tree.map(jnp.asarray, p) for p in (ref, kept))
    lora_cfg = C.lora_config()
    lora = init_lora(jax.random.PRNGKey(1), ref, lora_cfg, cfg)
    result: dict = {"merge": dense_copy(ref, kept, lora, lora_cfg, repeats=repeats), "rollout": {}}
    print(f"[quant] dense copy {result['merge']}", flush=True)
    for b in BATCHES:
        for n in DENSE_NEW_TOKENS:
            thunks = rollout_thunks(cfg, ref, kept, lora, lora_cfg, b, n)
            timed = C.interleaved(thunks, repeats=repeats, warmup=1)
            for name, thunk in thunks.items():  # every row ran all n steps (no EOS)
                if thunk() != (n,) * b:
                    raise RuntimeError(f"{name}, batch {b}: rows decoded {thunk()}, not {n}")
            for name, t in timed.items():
                result["rollout"][f"{name}/b{b}/n{n}"] = {"call_s": t["median_s"], **t}
            print(f"[quant] rollout b={b} n={n} {timed}", flush=True)
            del thunks
            _release()
    return result


def render_dense(result: dict) -> str:
    ro, merge = result["rollout"], result["merge"]
    rows = []
    for b in BATCHES:
        for n in DENSE_NEW_TOKENS:
            fp32 = ro[f"fp32/b{b}/n{n}"]["call_s"]
            row = [f"{b}", f"{n}"]
            for arm in ("fp32", "gguf packed", "gguf dense"):
                s = ro[f"{arm}/b{b}/n{n}"]["call_s"]
                row.append(f"{s:.2f} s ({s / fp32:.2f}x)")
            rows.append(row)
    headers = ["batch", "new tokens", "fp32 (merged)", "gguf packed (unmerged)", "gguf dense copy"]
    lines = [C.table(headers, rows), ""]
    for name, m in merge.items():
        lines.append(
            f"merged_rollout_weights on {name}: {1000 * m['call_s']:.0f} ms per call; "
            f"base {C.fmt_bytes(m['base_bytes'])} -> copy {C.fmt_bytes(m['copy_bytes'])} "
            f"(program working set {C.fmt_bytes(m.get('footprint_bytes'))}, "
            f"temp {C.fmt_bytes(m.get('temp_bytes'))})"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

PARTS = ("quality", "hlo", "memory", "dense")


def parse_parts(text: str) -> tuple[str, ...]:
    """`--only quality,memory` -> ("quality", "memory"); an unknown part is refused."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {unknown or [text]}; choose from {', '.join(PARTS)}"
        )
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--only",
        type=parse_parts,
        default=("quality",),
        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: quality, the "
        "quality/bytes/decode/rm table)",
    )
    ap.add_argument("--hlo-only", action="store_true", help="the same as --only hlo")
    args = ap.parse_args()
    parts = ("hlo",) if args.hlo_only else args.only
    machine = C.machine_info()
    command = f"python -m benchmarks.quant --repeats {args.repeats} --only {','.join(parts)}"
    meta = {"command": command, "machine": machine}
    if "hlo" in parts:
        result = {"benchmark": "quant_hlo", "kernel": dequant_in_hlo(repeats=20 * args.repeats)}
        result["meta"] = meta
        print(f"wrote {C.save_result('quant_hlo', result)}")
        print(C.machine_line(machine))
        for k, v in result["kernel"].items():
            print(k, v)
    if "memory" in parts:
        with tempfile.TemporaryDirectory(prefix="quant_memory_") as tmp:
            runs = whole_runs(Path(tmp))
        result = {"benchmark": "quant_memory", "runs": runs}
        result["meta"] = {**meta, "loadavg_end": C.load_average()}
        print(f"wrote {C.save_result('quant_memory', result)}")
        print(C.machine_line(machine))
        print(render_memory(runs))
    if "dense" in parts:
        t0 = time.perf_counter()
        result = {"benchmark": "quant_dense", **dense_rollouts(repeats=args.repeats)}
        result["elapsed_s"] = time.perf_counter() - t0
        result["meta"] = {**meta, "loadavg_end": C.load_average()}
        print(f"wrote {C.save_result('quant_dense', result)}")
        print(C.machine_line(machine))
        print(render_dense(result))
    if "quality" in parts:
        result = run(repeats=args.repeats)
        result["meta"] = meta
        print(f"wrote {C.save_result('quant', result)}")
        print(C.machine_line(machine))
        print(render(result))


if __name__ == "__main__":
    main()
