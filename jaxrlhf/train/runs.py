"""One call per algorithm, for the research API and the CLI: `run_rm(cfg)`, `run_dpo(cfg)`,
`run_kto`, `run_orpo`,
`run_cpo`, `run_ppo(cfg)`, `run_grpo(cfg)`, `run_rloo`, `run_reinforce_pp` — the algorithm's record handed to its driver. `ALGORITHMS`
maps each command name to its record (and so to its config class)."""

from __future__ import annotations

from typing import Any

from jaxrlhf.algorithms import cpo, dpo, grpo, kto, orpo, ppo, reinforce_pp, reward_model, rloo
from jaxrlhf.algorithms.spec import OnlineAlgorithm, PreferenceAlgorithm
from jaxrlhf.train.online import EvalHook, train_online
from jaxrlhf.train.preference import train_preference

ALGORITHMS: dict[str, PreferenceAlgorithm | OnlineAlgorithm] = {
    a.name: a
    for a in (
        reward_model.ALGORITHM,
        dpo.ALGORITHM,
        kto.ALGORITHM,
        orpo.ALGORITHM,
        cpo.ALGORITHM,
        ppo.ALGORITHM,
        grpo.ALGORITHM,
        rloo.ALGORITHM,
        reinforce_pp.ALGORITHM,
    )
}


def run_algorithm(name: str, cfg: Any, *, resume: bool = False, **inputs: Any) -> dict:
    """Train algorithm `name` with its config `cfg` on its driver. `inputs`: `source` (rows
    replacing `data.train`) and, for online algorithms, `eval_hook` and `engine`."""
    algo = ALGORITHMS[name]
    if not isinstance(cfg, algo.config):
        raise TypeError(f"{name} takes a {algo.config.__name__}, got {type(cfg).__name__}")
    driver = train_online if isinstance(algo, OnlineAlgorithm) else train_preference
    return driver(algo, cfg, resume=resume, **inputs)


def run_rm(cfg: reward_model.RMConfig, *, resume: bool = False, source: Any = None) -> dict:
    """Train, evaluate, checkpoint and export a Bradley–Terry reward model."""
    return run_algorithm("rm", cfg, resume=resume, source=source)


def run_dpo(cfg: dpo.DPOConfig, *, resume: bool = False, source: Any = None) -> dict:
    """Train, evaluate, checkpoint and export a DPO policy."""
    return run_algorithm("dpo", cfg, resume=resume, source=source)


def run_ppo(cfg: ppo.PPOConfig, *, eval_hook: EvalHook | None = None, **kw: Any) -> dict:
    """Train a policy with PPO; `eval_hook(prompts, completions) -> metrics` adds metrics to
    each evaluation (the demo's outside judge)."""
    return run_algorithm("ppo", cfg, eval_hook=eval_hook, **kw)


def run_grpo(cfg: grpo.GRPOConfig, *, eval_hook: EvalHook | None = None, **kw: Any) -> dict:
    """Train a policy with GRPO (group-relative advantages, no critic)."""
    return run_algorithm("grpo", cfg, eval_hook=eval_hook, **kw)


def run_kto(cfg: kto.KTOConfig, *, resume: bool = False, source: Any = None) -> dict:
    """Train, evaluate, checkpoint and export a KTO policy (unpaired feedback)."""
    return run_algorithm("kto", cfg, resume=resume, source=source)


def run_orpo(cfg: orpo.ORPOConfig, *, resume: bool = False, source: Any = None) -> dict:
    """Train, evaluate, checkpoint and export an ORPO policy (no reference model)."""
    return run_algorithm("orpo", cfg, resume=resume, source=source)


def run_cpo(cfg: cpo.CPOConfig, *, resume: bool = False, source: Any = None) -> dict:
    """Train, evaluate, checkpoint and export a CPO (or SimPO) policy (no reference model)."""
    return run_algorithm("cpo", cfg, resume=resume, source=source)


def run_rloo(cfg: rloo.RLOOConfig, *, eval_hook: EvalHook | None = None, **kw: Any) -> dict:
    """Train a policy with RLOO (leave-one-out baseline, KL in the reward)."""
    return run_algorithm("rloo", cfg, eval_hook=eval_hook, **kw)


def run_reinforce_pp(
    cfg: reinforce_pp.ReinforcePPConfig, *, eval_hook: EvalHook | None = None, **kw: Any
) -> dict:
    """Train a policy with REINFORCE++ (globally normalised advantages, token-level KL)."""
    return run_algorithm("reinforce_pp", cfg, eval_hook=eval_hook, **kw)
