"""Several adapters in one rollout batch against the same rows sampled adapter by adapter.

    python -m benchmarks.multi_adapter                      # SmolLM2-135M (model.path=default)
    python -m benchmarks.multi_adapter --size 2M --repeats 1   # a quick smoke run (random 2M)

Workload: 16 prompts of 32 random tokens; 6 rows with no adapter (the reference), 5 with
adapter 1, 5 with adapter 2 (two random "trained" LoRA adapters, r=16, alpha=32, all seven
projections; B nonzero); 32 new tokens per row, sampled at temperature 1 with per-sequence
streams, no EOS (every row emits all 32, so each variant does the same 512 tokens of work):

- one batch: `Sampler.generate(stacked, base, prompts, key, adapter_ids=ids)` — the two
  adapters unmerged as one of rank 32 with per-row column scales (`lora.concat_adapters`);
- one after another, merged: the reference rows on the bare base, then each adapter's rows
  with the adapter merged into the base (the default rollout path, merge included);
- one after another, unmerged: the same with each adapter applied unmerged;
- for scale, one adapter merged on all 16 rows (what one policy's batch of 16 costs).

Each row draws from the stream it has in the mixed batch (`sequence_ids`), so the variants
sample the same sequences. `alternatives` times the LoRA term of one projection at SmolLM2's
shapes (576 → 1536, r=16, 2 adapters, 16 rows) four ways: one adapter (`lora_delta`), the
concatenated adapter with per-row scales (what the engine runs), a per-row gather of the
factors (`A[ids]`, batched einsum), and `jax.lax.ragged_dot` over rows sorted by adapter.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: import the library from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C

ROWS, PROMPT_LEN, NEW_TOKENS = 16, 32, 32
IDS = np.array([0, 1, 2] * 5 + [0], np.int32)  # 6 reference rows, 5 + 5 adapter rows


def _trained(adapter, seed: int):
    """B nonzero (a fresh adapter is the base exactly), at a scale that changes samples."""
    paths, tree = jax.tree_util.tree_flatten_with_path(adapter)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(paths))
    leaves = [
        x + 0.02 * jax.random.normal(k, x.shape) if p[-1].key == "lora_B" else x
        for (p, x), k in zip(paths, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)


def _model(model_path: str | None, size: str):
    if model_path is not None:
        from jaxrlhf.models.loading import load_model

        cfg, params, _ = load_model(model_path)
        return cfg, params, "SmolLM2-135M" if model_path == "default" else model_path
    cfg = C.model_config(size)
    return cfg, jax.tree.map(jnp.asarray, C.random_params(cfg)), f"random {size}"


def run(
    *,
    model_path: str | None = "default",
    size: str = "135M",
    repeats: int = 3,
    new_tokens: int = NEW_TOKENS,
) -> dict:
    from jaxrlhf.lora import init_lora, stack_adapters
    from jaxrlhf.rollout.engine import Sampler

    cfg, params, name = _model(model_path, size)
    lora_cfg = C.lora_config()
    adapters = [
        _trained(init_lora(jax.random.PRNGKey(1 + i), params, lora_cfg, cfg), seed=10 + i)
        for i in range(2)
    ]
    stacked = stack_adapters([{"layers": a["layers"]} for a in adapters])
    ids_bt = C.random_ids(np.random.default_rng(0), (ROWS, PROMPT_LEN), cfg.vocab_size)
    prompts = {"input_ids": ids_bt, "attention_mask": np.ones_like(ids_bt)}
    key = jax.random.PRNGKey(0)

    def engine(lcfg, merge):
        g = SimpleNamespace(
            max_new_tokens=new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            merge_adapter=merge,
            max_rank=None,
        )
        return Sampler(
            cfg, g, lora_cfg=lcfg, eos_token_ids=(), pad_token_id=0, per_sequence_rng=True
        )

    mixed, base = engine(lora_cfg, False), engine(None, True)
    merged, unmerged = engine(lora_cfg, True), engine(lora_cfg, False)
    groups = [np.flatnonzero(IDS == a) for a in range(3)]

    def part(rows):
        return {k: v[rows] for k, v in prompts.items()}

    def one_batch():
        return mixed(stacked, params, prompts, key, adapter_ids=IDS).tokens

    def one_after_another(policy_engine):
        out = [base(params, None, part(groups[0]), key, sequence_ids=groups[0]).tokens]
        for a, adapter in enumerate(adapters, start=1):
            rows = groups[a]
            out.append(policy_engine(adapter, params, part(rows), key, sequence_ids=rows).tokens)
        return out

    thunks = {
        "one batch (adapter_ids)": lambda: C.block(one_batch()),
        "one after another, merged": lambda: C.block(one_after_another(merged)),
        "one after another, unmerged": lambda: C.block(one_after_another(unmerged)),
        "one adapter, 16 rows, merged": lambda: C.block(
            merged(adapters[0], params, prompts, key).tokens
        ),
    }
    timed = C.interleaved(thunks, repeats=repeats, warmup=1)

    # The same sequences either way: rows that match the mixed batch token for token.
    together = np.asarray(one_batch())
    apart = one_after_another(unmerged)
    same = sum(
        int((together[rows] == np.asarray(t)).all(axis=1).sum())
        for rows, t in zip(groups, apart, strict=True)
    )
    tokens = ROWS * new_tokens
    first = timed["one batch (adapter_ids)"]["median_s"]
    rows_out = []
    for variant, t in timed.items():
        rows_out.append(
            {
                "variant": variant,
                "seconds": t["median_s"],
                "min_s": t["min_s"],
                "max_s": t["max_s"],
                "tokens_per_s": tokens / t["median_s"],
                "tokens_per_s_range": [tokens / t["max_s"], tokens / t["min_s"]],
                "time_over_one_batch": t["median_s"] / first,
                "timing": t,
            }
        )
    return {
        "benchmark": "multi_adapter",
        "model": name,
        "params": int(cfg.num_params()),
        "rows": ROWS,
        "adapter_rows": [int(len(g)) for g in groups],
        "prompt_len": PROMPT_LEN,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "rows_identical_to_separate_unmerged": same,
        "programs_one_batch": mixed._generate.num_programs(),
        "variants": rows_out,
        "alternatives": alternatives(repeats=max(repeats, 3)),
    }


def alternatives(*, repeats: int = 5, rows: int = ROWS, adapters: int = 2) -> dict:
    """µs per call of one projection's LoRA term at SmolLM2's MLP shape, four ways."""
    from jaxrlhf.models.transformer import lora_delta, row_lora_delta

    d_in, d_out, r, s = 576, 1536, 16, 2.0
    key = jax.random.PRNGKey(0)
    a = 0.05 * jax.random.normal(jax.random.fold_in(key, 1), (adapters, d_in, r))
    b = 0.05 * jax.random.normal(jax.random.fold_in(key, 2), (adapters, r, d_out))
    a0 = jnp.concatenate([jnp.zeros_like(a[:1]), a])  # slot 0: the all-zero "no adapter"
    b0 = jnp.concatenate([jnp.zeros_like(b[:1]), b])
    a_cat = jnp.moveaxis(a, 0, 1).reshape(d_in, adapters * r)
    b_cat = b.reshape(adapters * r, d_out)
    ids = jnp.asarray(np.resize(np.arange(adapters + 1), rows), jnp.int32)

    def one(x):
        return lora_delta(x, a[0], b[0], jnp.float32(s))

    def concatenated(x):
        scales = jnp.repeat(jax.nn.one_hot(ids - 1, adapters) * s, r, axis=-1)
        return row_lora_delta(x, a_cat, b_cat, scales)

    def gathered(x):
        xa = jnp.einsum("bti,bir->btr", x, a0[ids])
        return jnp.einsum("btr,bro->bto", xa, b0[ids]) * s

    def ragged(x):
        bsz, t, _ = x.shape
        order = jnp.argsort(ids, stable=True)
        sizes = jnp.bincount(ids, length=adapters + 1) * t
        xs = x[order].reshape(bsz * t, d_in)
        out = jax.lax.ragged_dot(jax.lax.ragged_dot(xs, a0, sizes), b0, sizes) * s
        return jnp.zeros((bsz, t, d_out)).at[order].set(out.reshape(bsz, t, d_out))

    result = {"shape": f"{d_in}->{d_out}, r={r}, {adapters} adapters + none, {rows} rows"}
    for t in (1, 32):
        x = jax.random.normal(key, (rows, t, d_in))
        want = np.asarray(jax.jit(concatenated)(x))
        entry = {}
        for fname, f in (
            ("one adapter", one),
            ("concatenated + row scales", concatenated),
            ("gather A[ids]", gathered),
            ("ragged_dot", ragged),
        ):
            jf = jax.jit(f)
            y = jf(x).block_until_ready()
            if fname in ("gather A[ids]", "ragged_dot"):
                np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
            calls = 200 if t == 1 else 20
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(calls):
                    y = jf(x)
                y.block_until_ready()
                times.append((time.perf_counter() - t0) / calls * 1e6)
            entry[fname] = {
                "median_us": float(np.median(times)),
                "min_us": min(times),
                "max_us": max(times),
            }
        result[f"tokens_per_row_{t}"] = entry
    return result


def render(result: dict) -> str:
    rows = [
        [
            v["variant"],
            f"{C.fmt(v['seconds'], 2)} ({C.fmt(v['min_s'], 2)}–{C.fmt(v['max_s'], 2)})",
            f"{C.fmt(v['tokens_per_s'], 0)} ({C.fmt(v['tokens_per_s_range'][0], 0)}–"
            f"{C.fmt(v['tokens_per_s_range'][1], 0)})",
            C.fmt(v["time_over_one_batch"], 2) + "×",
        ]
        for v in result["variants"]
    ]
    ref, a1, a2 = result["adapter_rows"]
    alt = result["alternatives"]
    alt_rows = []
    for fname in alt["tokens_per_row_1"]:
        cells = [fname]
        for t in (1, 32):
            e = alt[f"tokens_per_row_{t}"][fname]
            cells.append(f"{e['median_us']:.0f} ({e['min_us']:.0f}–{e['max_us']:.0f})")
        alt_rows.append(cells)
    return "\n".join(
        [
            f"{result['model']} ({result['params'] / 1e6:.0f}M params, fp32): {result['rows']} "
            f"prompts of {result['prompt_len']} tokens, {ref} rows with no adapter (the "
            f"reference), {a1} + {a2} with two LoRA adapters (r=16, α=32, all seven "
            f"projections); {result['new_tokens']} sampled tokens per row, no EOS (the same "
            f"{result['rows'] * result['new_tokens']} tokens in every variant); median of "
            f"{result['repeats']} interleaved repeats (range). The one-batch rollout compiled "
            f"{result['programs_one_batch']} program; "
            f"{result['rows_identical_to_separate_unmerged']} of {result['rows']} rows drew "
            "exactly the tokens they draw when their adapter samples them alone (unmerged, "
            "same sequence streams); a row that differs diverges at one draw where the float32 "
            "rounding of a differently shaped batch moves a sampling boundary, as the bare "
            "base does at 16 vs 6 rows (docs/rollout_engine.md).",
            "",
            C.table(["variant", "seconds", "tokens/s", "time / one batch"], rows),
            "",
            f"The LoRA term alone ({alt['shape']}), µs per call, median (range):",
            "",
            C.table(["formulation", "decode (1 token/row)", "prefill (32 tokens/row)"], alt_rows),
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="model path (default: SmolLM2-135M)")
    ap.add_argument("--size", default=None, help="a random config instead (e.g. 2M)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    machine = C.machine_info()
    result = run(
        model_path=None if args.size else args.model,
        size=args.size or "135M",
        repeats=args.repeats,
        new_tokens=args.new_tokens,
    )
    result["meta"] = {
        "command": "python -m benchmarks.multi_adapter " + " ".join(argv or sys.argv[1:]),
        "machine": machine,
        "elapsed_s": time.perf_counter() - start,
    }
    path = C.save_result("multi_adapter" if not args.size else f"multi_adapter_{args.size}", result)
    print(render(result))
    print(f"\n{C.machine_line(machine)}\nresults: {path}")
    return result


if __name__ == "__main__":
    main()
