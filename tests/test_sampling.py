"""The KV-cache sampler against transformers' greedy `generate` and a full forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jaxrlhf.models.config import config_from_hf
from jaxrlhf.models.hf_names import params_from_state_dict
from jaxrlhf.models.transformer import PROJECTIONS, backbone, lm_logits, token_logprobs
from jaxrlhf.rollout import sampling as sampling_mod
from jaxrlhf.rollout.sampling import (
    SampleOutput,
    SamplingConfig,
    choose_tokens,
    decode_step,
    decode_text,
    filter_logits,
    make_generate_fn,
    prefill,
    sample_categorical,
)

PAD, BOS, EOS = 0, 1, 2
P, N = 7, 10
PROMPT_LENGTHS = (7, 4, 2, 5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A wide init makes the random model's logits peaked, so greedy choices have clear margins.
    hf_config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.2,
        attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_config).eval()
    cfg = config_from_hf(hf_config)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = jax.tree.map(jnp.asarray, params_from_state_dict(sd, cfg))
    return hf, cfg, params


@pytest.fixture(scope="module")
def prompts():
    """Left-padded prompts of different lengths (token ids >= 3: no pad/bos/eos inside)."""
    rng = np.random.default_rng(0)
    ids = np.full((len(PROMPT_LENGTHS), P), PAD, np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        ids[row, P - length :] = rng.integers(3, 128, length)
        mask[row, P - length :] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnames="cfg")
def full_forward(
    params,
    cfg,
    prompt_ids,
    prompt_mask,
    out: SampleOutput,
    *,
    temperature=1.0,
    lora=None,
    lora_scale=1.0,
):
    """Logits [B, N, V] predicting each response token and its log-prob [B, N] from one pass
    over [prompt, response] without a cache."""
    ids = jnp.concatenate([prompt_ids, out.tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, out.response_mask], axis=1)
    hidden, _ = backbone(params, ids, mask, cfg=cfg, lora=lora, lora_scale=lora_scale)
    hidden = hidden[:, P - 1 : -1]
    lp, _ = token_logprobs(params, hidden, out.tokens, temperature=temperature)
    return lm_logits(params, hidden), lp


def assert_well_formed(out: SampleOutput, eos_ids, pad):
    """Masks are a prefix of ones ending at the EOS of finished rows; pad and 0 after."""
    tokens, mask = np.asarray(out.tokens), np.asarray(out.response_mask)
    logprobs, finished = np.asarray(out.logprobs), np.asarray(out.finished)
    for row in range(tokens.shape[0]):
        n = int(mask[row].sum())
        assert n >= 1
        np.testing.assert_array_equal(mask[row], np.arange(tokens.shape[1]) < n)
        assert not np.isin(tokens[row, : n - 1], eos_ids).any()
        assert finished[row] == (tokens[row, n - 1] in eos_ids)
        assert finished[row] or n == tokens.shape[1]
        assert (tokens[row, n:] == pad).all()
        assert (logprobs[row, n:] == 0).all()
        assert (logprobs[row, :n] <= 0).all()


def hf_greedy(hf, ids, mask, eos):
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=N,
            eos_token_id=eos,
            pad_token_id=PAD,
        ).numpy()[:, P:]
    return np.pad(ref, ((0, 0), (0, N - ref.shape[1])), constant_values=PAD)  # HF stops early


@pytest.fixture(scope="module")
def greedy(model, prompts):
    """Greedy output with an EOS that row 0 emits mid-way, and transformers' tokens for it."""
    hf, cfg, params = model
    ids, mask = prompts
    free_run = hf_greedy(hf, ids, mask, eos=None)
    eos = int(free_run[0, 3])
    assert eos not in free_run[0, :3]
    sampling = SamplingConfig(max_new_tokens=N, eos_token_ids=(eos,), pad_token_id=PAD, greedy=True)
    out = make_generate_fn(cfg, sampling)(params, ids, mask, jax.random.key(0))
    return eos, out, hf_greedy(hf, ids, mask, eos=eos)


def test_greedy_matches_transformers_generate(model, prompts, greedy):
    _, cfg, params = model
    ids, mask = prompts
    eos, out, ref = greedy
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert bool(out.finished[0]) and int(out.response_mask[0].sum()) == 4
    assert int(out.tokens[0, 3]) == eos and (np.asarray(out.tokens[0, 4:]) == PAD).all()
    assert_well_formed(out, (eos,), PAD)
    # Greedy log-probs are temperature-1 log-probs of the chosen tokens.
    _, lp = full_forward(params, cfg, ids, mask, out)
    m = np.asarray(out.response_mask, bool)
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], np.asarray(lp)[m], atol=1e-5)


@pytest.fixture(scope="module")
def sampled(model, prompts):
    _, cfg, params = model
    ids, mask = prompts
    sampling = SamplingConfig(
        max_new_tokens=N,
        eos_token_ids=(EOS, 5, 6, 7),
        pad_token_id=PAD,
        temperature=1.3,
        top_k=50,
        top_p=0.95,
    )
    fn = make_generate_fn(cfg, sampling)
    return sampling, fn, fn(params, ids, mask, jax.random.key(3))


def test_sampled_logprobs_match_full_forward(model, prompts, sampled):
    _, cfg, params = model
    ids, mask = prompts
    sampling, _, out = sampled
    assert_well_formed(out, sampling.eos_token_ids, PAD)
    _, lp = full_forward(params, cfg, ids, mask, out, temperature=sampling.temperature)
    m = np.asarray(out.response_mask, bool)
    assert m.sum() > 2 * len(PROMPT_LENGTHS)
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], np.asarray(lp)[m], atol=1e-5)


def test_cached_step_logits_match_full_forward(model, prompts, sampled):
    _, cfg, params = model
    ids, mask = prompts
    _, _, out = sampled
    full_logits, _ = full_forward(params, cfg, ids, mask, out)
    running = np.asarray(out.response_mask, bool)

    logits, cache = prefill(params, ids, mask, cfg=cfg, cache_length=P + N)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full_logits[:, 0]), atol=1e-5)
    step = jax.jit(functools.partial(decode_step, cfg=cfg))
    n_prompt = mask.sum(-1)
    for i in range(1, N):
        logits, cache = step(params, out.tokens[:, i - 1], jnp.asarray(n_prompt + i - 1), cache)
        rows = running[:, i]
        np.testing.assert_allclose(
            np.asarray(logits)[rows],
            np.asarray(full_logits[:, i])[rows],
            atol=1e-5,
            err_msg=f"step {i}",
        )


def test_sampling_depends_on_key_only(model, prompts, sampled):
    _, cfg, params = model
    ids, mask = prompts
    _, fn, out = sampled
    again = fn(params, ids, mask, jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, out, again)
    other = fn(params, ids, mask, jax.random.key(4))
    assert not np.array_equal(np.asarray(out.tokens), np.asarray(other.tokens))


def test_top_k_one_generates_greedy(model, prompts, greedy):
    _, cfg, params = model
    ids, mask = prompts
    eos, greedy_out, _ = greedy
    sampling = SamplingConfig(max_new_tokens=N, eos_token_ids=(eos,), pad_token_id=PAD, top_k=1)
    out = make_generate_fn(cfg, sampling)(params, ids, mask, jax.random.key(5))
    # At temperature 1 the (unfiltered) log-probs are the greedy ones too.
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), out, greedy_out)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)])
def test_tight_filters_choose_the_argmax(filters, temperature):
    logits = 3.0 * jax.random.normal(jax.random.key(0), (256, 128))
    sampling = SamplingConfig(
        max_new_tokens=1, eos_token_ids=(), pad_token_id=0, temperature=temperature, **filters
    )
    tokens, logp = choose_tokens(logits, jax.random.key(1), sampling)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(logits, -1)))
    expected = jnp.max(jax.nn.log_softmax(logits / temperature), axis=-1)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(expected), atol=1e-6)


@pytest.mark.parametrize("sampling", [dict(greedy=True, temperature=0.7), dict(temperature=0.0)])
def test_greedy_choice_uses_temperature_one(sampling):
    logits = jax.random.normal(jax.random.key(0), (16, 128))
    sampling = SamplingConfig(max_new_tokens=1, eos_token_ids=(), pad_token_id=0, **sampling)
    assert sampling.is_greedy
    tokens, logp = choose_tokens(logits, jax.random.key(1), sampling)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(logits, -1)))
    np.testing.assert_allclose(
        np.asarray(logp), np.asarray(jnp.max(jax.nn.log_softmax(logits), -1)), atol=1e-6
    )


def test_early_stop_compiles_once(model, prompts, monkeypatch):
    """With half the vocabulary as EOS every row stops within a few steps; new values of the
    same shapes reuse the compiled program."""
    _, cfg, params = model
    ids, mask = prompts
    traces = []
    real_generate = sampling_mod.generate

    def counting_generate(*args, **kwargs):
        traces.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sampling_mod, "generate", counting_generate)
    eos_ids = tuple(range(2, 128, 2))
    sampling = SamplingConfig(max_new_tokens=N, eos_token_ids=eos_ids, pad_token_id=PAD)
    fn = make_generate_fn(cfg, sampling)
    first = fn(params, ids, mask, jax.random.key(0))
    new_params = jax.tree.map(lambda x: x * 1.01, params)
    second = fn(new_params, ids[::-1].copy(), mask[::-1].copy(), jax.random.key(1), None, 1.0)
    assert len(traces) == 1 and fn.jitted._cache_size() == 1
    for out in (first, second):
        assert bool(out.finished.all())
        assert int(out.response_mask.sum(-1).max()) < N
        assert_well_formed(out, eos_ids, PAD)


def random_lora(cfg, key, rank=4):
    """A LoRA tree over every projection with random (non-zero) A and B."""
    layers = {}
    shapes = {
        "q_proj": (cfg.hidden_size, cfg.q_size),
        "k_proj": (cfg.hidden_size, cfg.kv_size),
        "v_proj": (cfg.hidden_size, cfg.kv_size),
        "o_proj": (cfg.q_size, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }
    for name, key_ in zip(PROJECTIONS, jax.random.split(key, len(PROJECTIONS)), strict=True):
        d_in, d_out = shapes[name]
        ka, kb = jax.random.split(key_)
        layers[name] = {
            "lora_A": 0.1 * jax.random.normal(ka, (cfg.num_layers, d_in, rank)),
            "lora_B": 0.1 * jax.random.normal(kb, (cfg.num_layers, rank, d_out)),
        }
    return {"layers": layers}


def test_lora_is_applied_when_sampling(model, prompts):
    _, cfg, params = model
    ids, mask = prompts
    lora, scale = random_lora(cfg, jax.random.key(7)), 2.0
    sampling = SamplingConfig(
        max_new_tokens=N, eos_token_ids=(EOS,), pad_token_id=PAD, temperature=0.9
    )
    fn = make_generate_fn(cfg, sampling)
    out = fn(params, ids, mask, jax.random.key(2), lora, scale)
    m = np.asarray(out.response_mask, bool)
    _, lp = full_forward(params, cfg, ids, mask, out, temperature=0.9, lora=lora, lora_scale=scale)
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], np.asarray(lp)[m], atol=1e-5)
    _, base_lp = full_forward(params, cfg, ids, mask, out, temperature=0.9)
    assert np.abs(np.asarray(base_lp)[m] - np.asarray(out.logprobs)[m]).max() > 1e-2
    # Another adapter with another alpha/r reuses the program: lora_scale is traced.
    fn(params, ids, mask, jax.random.key(2), jax.tree.map(lambda x: -x, lora), jnp.float32(0.5))
    assert fn.jitted._cache_size() == 1


def test_right_padded_prompts_are_refused(model, prompts):
    _, cfg, params = model
    ids, mask = prompts
    fn = make_generate_fn(cfg, SamplingConfig(max_new_tokens=2, eos_token_ids=(), pad_token_id=0))
    with pytest.raises(ValueError, match=r"left-padded.*rows \[1, 2, 3\]"):
        fn(params, ids[:, ::-1], mask[:, ::-1], jax.random.key(0))


def test_filter_logits_hand_computed():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))[0].tolist()
    assert kept(top_p=0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert kept(top_p=0.7) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert kept(top_p=0.9) == [False, True, True, True]  # 0.95 needed
    assert kept(top_k=2) == [False, True, False, True]
    assert kept(top_k=3, top_p=0.4) == [False, True, False, False]
    assert kept(top_k=0, top_p=1.0) == [True] * 4


def test_decode_text_cuts_at_response_mask():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "again": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    out = SampleOutput(
        tokens=np.array([[3, 4, 2, 0], [5, 3, 4, 5]]),
        response_mask=np.array([[1, 1, 1, 0], [1, 1, 1, 0]]),
        logprobs=np.zeros((2, 4)),
        finished=np.array([True, False]),
    )
    assert decode_text(tokenizer, out) == ["hello world", "again hello world"]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(eos_token_ids=("</s>",)), "eos_token_ids"),
        (dict(eos_token_ids=(-2,)), "eos_token_ids"),
        (dict(pad_token_id=None), "pad_token_id"),
        (dict(greedy="yes"), "greedy"),
    ],
)
def test_sampling_config_validation(bad, match):
    fields = dict(max_new_tokens=4, eos_token_ids=(EOS,), pad_token_id=PAD) | bad
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**fields)


def test_sampling_config_normalises_and_reads_model_config(model):
    _, cfg, _ = model
    s = SamplingConfig(max_new_tokens=3, eos_token_ids=[2, 3], pad_token_id=0, temperature=1)
    assert s.eos_token_ids == (2, 3) and isinstance(s.temperature, float) and not s.is_greedy
    s = SamplingConfig.for_model(cfg.replace(pad_token_id=None), max_new_tokens=3)
    assert s.eos_token_ids == (EOS,) and s.pad_token_id == EOS


def test_sample_categorical_draws_from_the_softmax():
    """Inverse-CDF sampling: frequencies over 40k draws per row match softmax(logits) (a
    4-sigma binomial bound per token), and a token filtered to -inf is never drawn."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 0.9, 0.1, 0.0]]))
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_categorical(k, logits)))(keys))
    assert draws.shape == (n, 2)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for row in range(2):
        freq = np.bincount(draws[:, row], minlength=5) / n
        bound = 4 * np.sqrt(probs[row] * (1 - probs[row]) / n) + 1e-12
        np.testing.assert_array_less(np.abs(freq - probs[row]), bound)
        assert np.all(freq[probs[row] == 0] == 0)


def test_two_level_inversion_picks_the_token_of_the_full_cdf():
    """Blocks of 64 over a 1000-token vocabulary (16 blocks, the last one partial): for 4,000
    uniforms per row the token is the float64 inverse CDF's, `searchsorted(cdf, u·total)`,
    wherever u is not within rounding of a boundary; filtered (-inf) tokens are never drawn,
    even at u = 1 (where rounding at the top lands) with the whole last block filtered."""
    rng = np.random.default_rng(0)
    v, rows, n = 1000, 3, 4000
    logits = rng.normal(0, 3, (rows, v)).astype(np.float32)
    logits[1, rng.random(v) < 0.5] = -np.inf  # half the vocabulary filtered
    logits[2, 960:] = -np.inf  # the whole last (partial) block and more
    uniforms = np.concatenate([rng.random(n - 1), [1.0]]).astype(np.float32)
    draw = jax.jit(jax.vmap(lambda u: sample_categorical(None, jnp.asarray(logits), u, block=64)))
    got = np.asarray(draw(jnp.broadcast_to(jnp.asarray(uniforms)[:, None], (n, rows))))
    for r in range(rows):
        w = np.exp(logits[r].astype(np.float64) - logits[r].max())
        cdf = np.cumsum(w)
        target = uniforms.astype(np.float64) * cdf[-1]
        want = np.searchsorted(cdf, target, side="right")
        near = np.min(np.abs(cdf[None, :] - target[:, None]), axis=1) < 2e-6 * cdf[-1]
        assert (~near).sum() > 0.99 * n
        np.testing.assert_array_equal(got[~near, r], want[~near])
        assert np.all(w[got[:, r]] > 0)


def test_two_level_inversion_draws_from_the_softmax():
    """The two-level path (blocks of 2 over 7 tokens, the last block partial): frequencies over
    40k draws match softmax(logits) within a 4-sigma binomial bound; zero-probability tokens
    (one mid-block, one alone in the last block) are never drawn."""
    probs = np.asarray([0.3, 0.0, 0.1, 0.25, 0.05, 0.3, 0.0])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    n = 40_000
    keys = jax.random.split(jax.random.key(1), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_categorical(k, logits, block=2)))(keys))
    freq = np.bincount(draws[:, 0], minlength=7) / n
    bound = 4 * np.sqrt(probs * (1 - probs) / n) + 1e-12
    np.testing.assert_array_less(np.abs(freq - probs), bound)
    assert np.all(freq[probs == 0] == 0)


def test_repeated_prompts_are_prefilled_once_with_the_same_samples(model, prompts):
    """`prompt_repeats=k` runs each prompt once and copies its KV cache to its k rows: the
    same tokens and log-probs as prefilling every copy (same key), and the log-probs still
    equal a full forward over prompt + response."""
    _, cfg, params = model
    ids, mask = prompts
    k = 3
    rep_ids, rep_mask = np.repeat(ids, k, axis=0), np.repeat(mask, k, axis=0)
    sampling = SamplingConfig(max_new_tokens=N, eos_token_ids=(), pad_token_id=PAD)
    fn = make_generate_fn(cfg, sampling)
    key = jax.random.key(5)
    shared = fn(params, rep_ids, rep_mask, key, prompt_repeats=k)
    each = fn(params, rep_ids, rep_mask, key)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(each.tokens))
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(each.logprobs), atol=1e-5)
    # the k rows of a prompt are independent samples, not copies
    tokens = np.asarray(shared.tokens).reshape(len(PROMPT_LENGTHS), k, N)
    assert all(len({tuple(row) for row in group}) > 1 for group in tokens)
    _, lp = full_forward(params, cfg, rep_ids, rep_mask, shared)
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(lp), atol=1e-5)
    assert fn.num_programs() == 2  # one program per prompt_repeats


def test_repeated_prompts_must_be_copies(model, prompts):
    _, cfg, params = model
    ids, mask = prompts
    fn = make_generate_fn(cfg, SamplingConfig(max_new_tokens=2, eos_token_ids=(), pad_token_id=0))
    with pytest.raises(ValueError, match=r"group\(s\) \[0, 1\] are not 2 copies"):
        fn(params, ids, mask, jax.random.key(0), prompt_repeats=2)
    with pytest.raises(ValueError, match="does not divide the 4 rows"):
        fn(params, ids, mask, jax.random.key(0), prompt_repeats=3)


@pytest.mark.parametrize("rows", [1, 16, 65])
def test_rollout_kernels_stored_out_in_give_the_same_products(rows):
    """`kernels_out_in` (the merged rollout weights' layout) changes the orientation of the
    products, not their values: `linear` with `kernel_t` equals `linear` with `kernel` on both
    sides of `FEW_ROWS` (with a bias), and the tied LM head's few-row branch equals the
    [D, V] product; the router and quantized kernels are left alone."""
    from jaxrlhf.models import transformer as T
    from jaxrlhf.models.quant import QuantConfig, is_quantized, quantize_params

    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.normal(size=(rows, 1, 24)), jnp.float32)
    w = {"kernel": jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)}
    w["bias"] = jnp.asarray(rng.normal(size=(40,)), jnp.float32)
    block = {"q_proj": w, "router": {"kernel": w["kernel"]}, "input_norm": {"scale": x[0, 0]}}
    out = T.kernels_out_in(block)
    assert set(out["q_proj"]) == {"kernel_t", "bias"}
    assert out["router"] is block["router"] and out["input_norm"] is block["input_norm"]
    np.testing.assert_array_equal(np.asarray(out["q_proj"]["kernel_t"]), np.asarray(w["kernel"]).T)
    want = T.linear(x, w, None, 1.0)
    got = jax.jit(lambda x, p: T.linear(x, p, None, 1.0))(x, out["q_proj"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    table = jnp.asarray(rng.normal(size=(50, 24)), jnp.float32)
    logits = T.lm_logits({"embed": table}, x)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(jnp.einsum("btd,vd->btv", x, table)), rtol=1e-5, atol=1e-5
    )
    big = jnp.asarray(rng.normal(size=(2, 64, 128)), jnp.float32)
    q = quantize_params({"layers": {"q_proj": {"kernel": big}}}, QuantConfig(kind="int8"))
    one_block = T.unstack_layers(q["layers"])[0]  # a 2-D quantized kernel
    assert is_quantized(one_block["q_proj"]["kernel"])
    assert T.kernels_out_in(one_block)["q_proj"] is one_block["q_proj"]
