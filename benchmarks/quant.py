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

    PYTHONPATH=. python -m benchmarks.quant [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import time

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
    gate_proj): how many weight-sized float32 buffers the optimized HLO creates (a
    dequantize fused into the dot would create none), and the time per call against the
    fp32 kernel at 1, 16 and 1024 tokens (interleaved)."""
    import re

    from jaxrlhf.models import quant as Q
    from jaxrlhf.models.transformer import linear

    w = (0.02 * np.random.default_rng(0).normal(size=(576, 1536))).astype(np.float32)
    kernels = {
        "fp32": jnp.asarray(w),
        "int8": Q.quantize_int8(w),
        "nf4": Q.quantize_nf4(w),
        "q4_1": Q.quantize_gguf(w, "Q4_1"),
        "q8_0": Q.quantize_gguf(w, "Q8_0"),
    }
    weight_sized = re.compile(r"= f32\[(576,1536|1536,576)\]\{[01],[01]\} (copy|transpose|fusion)")
    fn = jax.jit(lambda x, k: linear(x, {"kernel": k}, None, 1.0))
    out: dict = {}
    for tokens in (1, 16, 1024):
        x = jnp.ones((tokens, 576), jnp.float32)
        thunks = {}
        for name, k in kernels.items():
            hlo = fn.lower(x, k).compile().as_text()
            n = sum(bool(weight_sized.search(line)) for line in hlo.splitlines())
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hlo-only", action="store_true", help="only the one-kernel HLO check")
    args = ap.parse_args()
    machine = C.machine_info()
    if args.hlo_only:
        result = {"benchmark": "quant_hlo", "kernel": dequant_in_hlo(repeats=20 * args.repeats)}
        result["meta"] = {"command": "python -m benchmarks.quant --hlo-only", "machine": machine}
        print(f"wrote {C.save_result('quant_hlo', result)}")
        print(C.machine_line(machine))
        for k, v in result["kernel"].items():
            print(k, v)
        return
    result = run(repeats=args.repeats)
    result["meta"] = {
        "command": f"python -m benchmarks.quant --repeats {args.repeats}",
        "machine": machine,
    }
    print(f"wrote {C.save_result('quant', result)}")
    print(C.machine_line(machine))
    print(render(result))


if __name__ == "__main__":
    main()
