"""Dense dispatch vs `jax.lax.ragged_dot` for a mixture-of-experts MLP, forward + backward.

    PYTHONPATH=. python benchmarks/moe_dispatch.py [--tokens 2048] [--dtype bfloat16]

One MoE block (`jaxrlhf.models.transformer.moe_mlp`) at a small-model size (D=512, expert
F=768, E=8 experts, top-2) with LoRA on the experts, timed as the LoRA gradient step of a
training pass would run it: value_and_grad with respect to the expert adapter. Both variants
are compiled first, then timed interleaved round by round; the median is printed.
`--dtype bfloat16` casts the block's weights and inputs (the adapter stays float32, as in
training).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxrlhf.models.config import tiny_config
from jaxrlhf.models.transformer import moe_mlp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    d, f, e, r = 512, 768, args.experts, 16
    cfg = tiny_config(
        hidden_size=d,
        intermediate_size=f,
        num_experts=e,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
    )
    keys = iter(jax.random.split(jax.random.key(0), 16))

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape)

    layer = {
        "router": {"kernel": normal(d, e)},
        "experts": {
            "gate_proj": {"kernel": normal(e, d, f)},
            "up_proj": {"kernel": normal(e, d, f)},
            "down_proj": {"kernel": normal(e, f, d)},
        },
    }
    lora = {
        n: {"lora_A": normal(e, i, r), "lora_B": normal(e, r, o)}
        for n, (i, o) in {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}.items()
    }
    x = jax.random.normal(next(keys), (1, args.tokens, d))
    layer, x = jax.tree.map(lambda a: a.astype(args.dtype), (layer, x))

    def step_for(dispatch):
        c = cfg.replace(moe_dispatch=dispatch)

        def loss(lo, layer, x):  # weights and inputs as arguments: nothing to constant-fold
            y, _ = moe_mlp(x, layer, lo, 2.0, cfg=c)
            return jnp.mean(y * y)

        return jax.jit(jax.value_and_grad(loss))

    steps = {name: step_for(name) for name in ("dense", "ragged")}
    for step in steps.values():
        jax.block_until_ready(step(lora, layer, x))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(lora, layer, x))
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(
            f"{name:6s} median {1e3 * statistics.median(ts):8.1f} ms  ({jax.devices()[0].platform})"
        )


if __name__ == "__main__":
    main()
