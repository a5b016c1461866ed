"""Twist learners, one file each (paper §4): ``ctl``, ``rl``, ``sixo``, ``fudge``, ``dpg``.

``build_method(name, **options)`` is the only entry point the trainer uses; it never branches on
the name. Every method has ``name``, ``needs_exact`` and ``loss(TrainContext) -> (loss, metrics)``
(see :mod:`smclm.methods.base`).
"""

from __future__ import annotations

import inspect

from smclm.errors import ConfigError
from smclm.methods.base import Method, TrainContext
from smclm.methods.ctl import CTL
from smclm.methods.dpg import DPG
from smclm.methods.fudge import FUDGE
from smclm.methods.rl import RL
from smclm.methods.sixo import SIXO

METHODS: dict[str, type] = {"ctl": CTL, "dpg": DPG, "fudge": FUDGE, "rl": RL, "sixo": SIXO}

__all__ = ["CTL", "DPG", "FUDGE", "METHODS", "RL", "SIXO", "Method", "TrainContext", "build_method"]


def build_method(name: str, **kwargs) -> Method:
    """The method ``name`` with its options, e.g. ``build_method("ctl", positives="exact")``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"method {name} does not take option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(allowed) or 'none'}"
        )
    return cls(**kwargs)
