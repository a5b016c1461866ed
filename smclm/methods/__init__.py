"""Learners, one file each: the twist learners ``ctl``, ``rl``, ``sixo``, ``fudge``, ``dpg``
(paper §4) and the policy learners ``ppo`` and ``gfn`` (baselines-spec), which own their update,
and ``sft`` (supervised fine-tuning of a policy on the task's demonstrations).

A learner is named by the ``_target_`` of its method config (``configs/method/<name>.yaml``),
built-in or in the user's own package; ``METHODS`` maps the built-in names to the same targets,
for ``build_method("ctl", positives="exact")`` from Python. The trainer never branches on a
name: a learner declares what it needs (:func:`needs`), and implements one of the two contracts
of :mod:`smclm.methods.base` (``loss(batch) -> (loss, metrics)``, or ``setup``/``update``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from smclm.errors import ConfigError
from smclm.methods.base import Method, TrainContext
from smclm.methods.ctl import CTL
from smclm.methods.dpg import DPG
from smclm.methods.fudge import FUDGE
from smclm.methods.rl import RL
from smclm.methods.sixo import SIXO

METHODS: dict[str, str] = {  # name -> _target_ (as in configs/method/<name>.yaml)
    "ctl": "smclm.methods.ctl.CTL",
    "dpg": "smclm.methods.dpg.DPG",
    "fudge": "smclm.methods.fudge.FUDGE",
    "rl": "smclm.methods.rl.RL",
    "sixo": "smclm.methods.sixo.SIXO",
    "ppo": "smclm.methods.ppo.PPO",  # imported on first use
    "gfn": "smclm.methods.gfn.GFN",
    "sft": "smclm.methods.sft.SFT",
}

__all__ = [
    "CTL",
    "DPG",
    "FUDGE",
    "METHODS",
    "RL",
    "SIXO",
    "Method",
    "Needs",
    "TrainContext",
    "build_method",
    "needs",
]


def locate(target: str, key: str = "method._target_") -> Any:
    """The class or function named by a dotted path; one line when it cannot be imported."""
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as e:
        lines = [ln.strip() for ln in str(e.__cause__ or e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise ConfigError(
            f"{key}={target} cannot be imported ({detail}); check the dotted path, and "
            "that its package is installed or on PYTHONPATH"
        ) from e


def build_method(name: str, _target_: str | None = None, **kwargs: Any) -> Method:
    """The learner ``_target_`` (or the built-in ``name``) with its options, e.g.
    ``build_method("ctl", positives="exact")``; one line for an unknown option."""
    target = _target_ or METHODS.get(name)
    if target is None:
        raise ConfigError(
            f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}, or give "
            "your own learner's method._target_"
        )
    cls = locate(target)
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [p for p in params if p != "self"]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ConfigError(
                f"method {name} does not take option(s) {', '.join(unknown)}; its options "
                f"are: {', '.join(allowed) or 'none'}"
            )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"method {name} ({target}): {e}") from e


@dataclass(frozen=True)
class Needs:
    """What a learner needs the world and the trainer to provide."""

    twist: bool  # a twist ψ (built from the twist config); False: the model has none
    policy: bool  # a proposal policy (built from method.policy)
    exact: bool  # a pool of exact target samples (batch.exact_pool)


def needs(method: Any) -> Needs:
    """A learner's declared needs: attributes ``needs_twist`` (default True), ``needs_policy``
    (default False) and ``needs_exact`` (default False). ``None`` (no learner: smclm eval or
    sample of an untrained model) needs a twist and nothing else."""
    if method is None:
        return Needs(twist=True, policy=False, exact=False)
    return Needs(
        twist=bool(getattr(method, "needs_twist", True)),
        policy=bool(getattr(method, "needs_policy", False)),
        exact=bool(getattr(method, "needs_exact", False)),
    )
