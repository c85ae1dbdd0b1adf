"""A reward model scores the policy's token ids as they are, so one built on another tokenizer
is refused with an error instead of silently scoring other text."""

from __future__ import annotations

import jax
import pytest

from jaxrlhf import config as C
from jaxrlhf.algorithms.reward_model import check_same_vocabulary, load_reward_model
from jaxrlhf.models.base import load_base
from jaxrlhf.models.byte_tokenizer import byte_tokenizer
from jaxrlhf.models.loading import save_hf_folder
from jaxrlhf.models.transformer import init_head
from jaxrlhf.sharding import make_mesh, put_tree


def _other_tokenizer():
    tok = byte_tokenizer()
    tok.add_tokens(["<extra-token>"])
    return tok


def test_same_vocabulary_passes_and_another_is_refused():
    check_same_vocabulary(byte_tokenizer(), byte_tokenizer(), where="reward_model.path")
    check_same_vocabulary(byte_tokenizer(), None, where="reward_model.path")  # nothing to compare
    with pytest.raises(ValueError, match=r"reward_model.base.*1 tokens differ.*<extra-token>"):
        check_same_vocabulary(byte_tokenizer(), _other_tokenizer(), where="reward_model.base")


@pytest.mark.parametrize("same", [True, False])
def test_full_reward_model_folder_must_share_the_policy_tokenizer(tmp_path, same):
    model_cfg, base, tok = load_base(C.ModelSection(path="tiny"))
    rm_params = dict(base, score=init_head(jax.random.PRNGKey(0), model_cfg, "score"))
    folder = save_hf_folder(
        rm_params, model_cfg, tmp_path / "rm", tokenizer=tok if same else _other_tokenizer()
    )
    mesh = make_mesh(C.MeshConfig(data=1))
    section = C.RewardModelSection(path=str(folder))
    load = lambda: load_reward_model(  # noqa: E731
        section, model_cfg=model_cfg, frozen=put_tree(base, mesh), mesh=mesh, tokenizer=tok
    )
    if same:
        assert load().lora is None
    else:
        with pytest.raises(ValueError, match="reward_model.path: the reward model's tokenizer"):
            load()
