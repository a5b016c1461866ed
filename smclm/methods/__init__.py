"""Learners, one file each: the twist learners ``ctl``, ``rl``, ``sixo``, ``fudge``, ``dpg``
(paper §4) and the policy learners ``ppo`` and ``gfn`` (baselines-spec), which own their update.

``build_method(name, **options)`` is the only entry point the trainer uses; it never branches on
the name. Every method has ``name``, ``needs_exact`` and ``loss(TrainContext) -> (loss, metrics)``
(see :mod:`smclm.methods.base`).
"""

from __future__ import annotations

import importlib
import inspect

from smclm.errors import ConfigError
from smclm.methods.base import Method, TrainContext
from smclm.methods.ctl import CTL
from smclm.methods.dpg import DPG
from smclm.methods.fudge import FUDGE
from smclm.methods.rl import RL
from smclm.methods.sixo import SIXO

METHODS: dict[str, type | str] = {
    "ctl": CTL,
    "dpg": DPG,
    "fudge": FUDGE,
    "rl": RL,
    "sixo": SIXO,
    "ppo": "smclm.methods.ppo:PPO",  # imported on first use
    "gfn": "smclm.methods.gfn:GFN",
}

__all__ = ["CTL", "DPG", "FUDGE", "METHODS", "RL", "SIXO", "Method", "TrainContext", "build_method"]


def build_method(name: str, **kwargs) -> Method:
    """The method ``name`` with its options, e.g. ``build_method("ctl", positives="exact")``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    if isinstance(cls, str):
        module, attr = cls.split(":")
        cls = getattr(importlib.import_module(module), attr)
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"method {name} does not take option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(allowed) or 'none'}"
        )
    return cls(**kwargs)
