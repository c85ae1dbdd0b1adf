"""A reward model is read where it was trained to be read: `jaxrlhf rm` appends EOS to every
response (`data.add_eos`), so PPO/GRPO's scorer appends one to a rollout cut at
max_new_tokens (`reward_model.append_eos`) before reading the score."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import config as C
from jaxrlhf.algorithms.reward_model import reward_model_scores
from jaxrlhf.data import load_preferences
from jaxrlhf.lora import LoraConfig, init_lora
from jaxrlhf.models.base import load_base
from jaxrlhf.peft_format import export_peft
from jaxrlhf.rollout import Rollout
from jaxrlhf.sharding import make_mesh, put_tree
from jaxrlhf.train.scoring import Scorer

RM_LORA = LoraConfig(r=4, alpha=8, task_type="SEQ_CLS", modules_to_save=("score",))


def _rm_adapter(tmp_path, base, model_cfg):
    lora = init_lora(jax.random.PRNGKey(0), base, RM_LORA, model_cfg)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    lora = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), lora)
    out = tmp_path / "rm"
    export_peft(lora, RM_LORA, model_cfg, out, base_model_name_or_path="tiny")
    return out, lora


def test_scorer_appends_eos_to_unfinished_rollouts(tmp_path):
    model_cfg, base, tok = load_base(C.ModelSection(path="tiny"))
    path, lora = _rm_adapter(tmp_path, base, model_cfg)
    mesh = make_mesh(C.MeshConfig(data=1))
    frozen = put_tree(base, mesh)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    # Left-padded prompts of 3 columns, responses of 4: row 0 runs to the limit, row 1 stops
    # with EOS after two tokens (then padding).
    prompt = np.array([[pad, 40, 41], [50, 51, 52]])
    tokens = np.array([[60, 61, 62, 63], [70, 71, eos, pad]])
    resp = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    rollout = Rollout(
        input_ids=jnp.asarray(np.concatenate([prompt, tokens], 1)),
        attention_mask=jnp.asarray(np.concatenate([prompt != pad, resp], 1).astype(np.int32)),
        response_mask=jnp.asarray(resp),
        sampler_logprobs=jnp.zeros(tokens.shape, jnp.float32),
        tokens=jnp.asarray(tokens),
        finished=jnp.asarray([False, True]),
    )

    def expected(ids: list[list[int]]) -> np.ndarray:
        width = max(map(len, ids))
        arr = np.array([row + [pad] * (width - len(row)) for row in ids])
        mask = np.array([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        return np.asarray(
            reward_model_scores(
                frozen, put_tree(lora, mesh), RM_LORA.scale, arr, mask, model_cfg=model_cfg
            )
        )

    with_eos = expected([[40, 41, 60, 61, 62, 63, eos], [50, 51, 52, 70, 71, eos]])
    without = expected([[40, 41, 60, 61, 62, 63], [50, 51, 52, 70, 71, eos]])
    for append, want in ((True, with_eos), (False, without)):
        scorer = Scorer(
            model_cfg=model_cfg,
            frozen=frozen,
            mesh=mesh,
            section=C.RewardModelSection(path=str(path), append_eos=append),
            funcs=(),
            tokenizer=tok,
            missing_eos_penalty=None,
            score_clip=None,
        )
        scores, _, _ = scorer(rollout, ["a", "b"], {})
        # row 1 (finished) is read at its own EOS either way; row 0 at the appended one or not
        np.testing.assert_allclose(scores[1], want[1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(scores[0], want[0], rtol=1e-4, atol=1e-4)
    assert abs(with_eos[0] - without[0]) > 1e-3  # the appended EOS changes what is read


def test_preference_data_add_eos_option():
    _, _, tok = load_base(C.ModelSection(path="tiny"))
    rows = [{"prompt": "Hi", "chosen": " good", "rejected": " bad"}] * 4
    for add_eos in (True, False):
        cfg = C.PreferenceDataConfig(max_length=32, eval_fraction=0.0, add_eos=add_eos)
        prefs = load_preferences(cfg, tok, seed=0, source=rows).train
        for ids in (*prefs.chosen_ids, *prefs.rejected_ids):
            assert (int(ids[-1]) == tok.eos_token_id) == add_eos
