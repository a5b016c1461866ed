"""Compute accounting for every learner (``compute/*`` metrics), without touching the methods.

A :class:`ComputeMeter` puts forward pre-hooks on the networks of a run — the frozen base body,
the twist, the policy, and any extra module a method registers (a PPO value head, a GFlowNet
flow head) — and wraps the task's potential. Per update it counts:

* ``compute/sampled_tokens``          tokens drawn by the sampler (N·T per sampling run; N per
                                      step it ran on a stopping task, which ends when all stop),
* ``compute/{net}_forward_calls``     forward calls of each network,
* ``compute/{net}_forward_tokens``    token positions processed by those calls,
* ``compute/{net}_backward_tokens``   token positions of forwards made with gradients enabled
                                      through trainable parameters (what backward passes cost),
* ``compute/potential_sequences``     sequences scored by the potential (classifier calls).

The update's wall time is ``time/update_s`` (logged by the trainer). ``totals()`` gives the
running sums (``compute/total_*``, and ``time/total_update_s``) that go into ``summary.json``, so
methods can be compared at equal compute.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from smclm.tasks.base import Task


def _positions(args: tuple, kwargs: dict) -> int:
    """Token positions in a forward call: input_ids [N, L] for bodies, hidden [..., d] for heads."""
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    if not isinstance(ids, torch.Tensor):
        return 0
    if ids.dtype in (torch.long, torch.int, torch.int32):
        return int(ids.numel())
    return int(ids[..., 0].numel())


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _body(module: nn.Module) -> nn.Module:
    """The module whose forward sees a whole pass: a body copy if the network has one."""
    body = getattr(module, "body", None)
    if isinstance(body, nn.Module):
        return body
    lm = getattr(module, "lm", None)  # a full policy runs its LM's body
    if isinstance(lm, nn.Module):
        return lm.base_model
    return module


class CountedPotential:
    """A task's potential that counts the sequences it scores in its meter's
    ``potential_sequences``: calls, the KV-cache path (``from_cache``, infilling) and the prefix
    path (``prefix_log_phi``, latent) are counted;
    every other attribute is the inner potential's (``for_prompt`` returns the inner one rebound,
    which the trainer watches again)."""

    def __init__(self, inner: Any, meter: ComputeMeter) -> None:
        self.inner, self._meter = inner, meter
        if getattr(inner, "from_cache", None) is not None:
            self.from_cache = self._counted_from_cache
        if getattr(inner, "prefix_log_phi", None) is not None:
            self.prefix_log_phi = self._counted_prefix_log_phi

    def __call__(self, tokens: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self._meter.step["potential_sequences"] += int(tokens.shape[0])
        return self.inner(tokens, cond)

    def _counted_from_cache(self, model: Any, ctx: Any, tokens: torch.Tensor, cond: Any) -> Any:
        self._meter.step["potential_sequences"] += int(tokens.shape[0])
        return self.inner.from_cache(model, ctx, tokens, cond)

    def _counted_prefix_log_phi(
        self, tokens: torch.Tensor, terminable: torch.Tensor, stop_ids: list[int]
    ) -> Any:
        got = self.inner.prefix_log_phi(tokens, terminable, stop_ids)
        if got is not None:  # else the caller scores the sequences through __call__
            self._meter.step["potential_sequences"] += int(terminable.sum()) * len(stop_ids)
        return got

    def __getattr__(self, name: str) -> Any:  # only for attributes not set here
        if name == "inner":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


class ComputeMeter:
    def __init__(self) -> None:
        self.step: dict[str, float] = defaultdict(float)
        self.total: dict[str, float] = defaultdict(float)
        self._handles: list[Any] = []
        self._t0 = time.perf_counter()
        self.total_s = 0.0

    # -- registration --------------------------------------------------------------------------
    def watch(self, name: str, module: nn.Module | None) -> None:
        """Count forwards of ``module`` (and its head, if it has a separate one) as ``name``."""
        if module is None:
            return
        mods = [_body(module)]
        head = getattr(module, "head", None)
        if isinstance(head, nn.Module) and mods[0] is not module:
            mods.append(head)  # a separate body plus a head: count the body's passes only once
        elif isinstance(head, nn.Module):
            mods = [head]  # a head on the frozen base: its positions are the base's positions
        root = mods[0]

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            n = _positions(args, kwargs)
            self.step[f"{name}_forward_calls"] += 1
            self.step[f"{name}_forward_tokens"] += n
            if torch.is_grad_enabled() and _trainable(mod):
                self.step[f"{name}_backward_tokens"] += n

        self._handles.append(root.register_forward_pre_hook(hook, with_kwargs=True))

    def watch_task(self, task: Task) -> None:
        """Wrap task.potential so every scored sequence is counted (:class:`CountedPotential`:
        everything else about the potential, its KV-cache path and its rebinding included, is
        the inner one's)."""
        if isinstance(task.potential, CountedPotential):
            return
        task.potential = CountedPotential(task.potential, self)

    def sampled(self, n_tokens: int) -> None:
        self.step["sampled_tokens"] += n_tokens

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- per update ------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start an update: counts from evaluation or set-up in between are dropped."""
        self.step.clear()
        self._t0 = time.perf_counter()

    def end(self) -> dict[str, float]:
        """The update's ``compute/*`` metrics; adds them to the running totals."""
        out = {f"compute/{k}": float(v) for k, v in sorted(self.step.items())}
        for k, v in self.step.items():
            self.total[k] += v
        self.total_s += time.perf_counter() - self._t0
        self.step.clear()
        return out

    def totals(self) -> dict[str, float]:
        out = {f"compute/total_{k}": float(v) for k, v in sorted(self.total.items())}
        return {**out, "time/total_update_s": self.total_s}

    def state_dict(self) -> dict[str, float]:
        return {**self.total, "_total_s": self.total_s}

    def load_state_dict(self, state: dict[str, float]) -> None:
        state = dict(state)
        self.total_s = float(state.pop("_total_s", 0.0))
        self.total = defaultdict(float, state)
