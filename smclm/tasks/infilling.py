"""Infilling (paper §6, Tables 4 and 8): log φ(s, o) = log p₀(o | prompt, s), where o are the c
tokens that follow the output s_1:T. Exact target samples come from joint sampling
(:meth:`smclm.tasks.base.Task.sample_joint`); twists condition on o.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smclm.models.cache import cache_kwargs, prompt_shared_hidden
from smclm.models.twisted_lm import token_log_probs
from smclm.tasks.base import Task
from smclm.tasks.plugin import TaskEnv


class InfillingPotential:
    """log p₀(o | prompt, s) by one teacher-forced pass of the base LM over [prompt, s, o_<c]
    (the prompt once, shared by the rows through its KV cache)."""

    def __init__(self, base: nn.Module, prompt_ids: Tensor, batch_size: int = 256) -> None:
        self.base, self.prompt_ids, self.batch_size = base, prompt_ids, batch_size

    @torch.no_grad()
    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("the infilling potential needs the conditioning tokens o")
        n, t_len = tokens.shape
        cond = cond.to(tokens.device)
        if cond.shape[0] == 1 and n > 1:
            cond = cond.expand(n, -1)
        dev = next(self.base.parameters()).device
        p_len = self.prompt_ids.numel()
        body = self.base.base_model
        out = []
        for i in range(0, n, self.batch_size):
            s, o = tokens[i : i + self.batch_size].to(dev), cond[i : i + self.batch_size].to(dev)
            # the prompt once, the rows from its KV cache; the head only at the c positions
            # that predict o
            rest = torch.cat([s, o[:, :-1]], dim=1)
            h = prompt_shared_hidden(body, self.prompt_ids.to(dev), rest)[:, p_len + t_len - 1 :]
            out.append(token_log_probs(self.base, h, o).sum(1))
        return torch.cat(out).to(tokens.device)

    @torch.no_grad()
    def from_cache(self, model, ctx, tokens: Tensor, cond: Tensor) -> Tensor | None:
        """The same log p₀(o | prompt, s) from the sampler's KV cache of [prompt, s_1:T−1]: one
        forward of the c tokens [s_T, o_<c] per particle instead of P + T + c − 1."""
        if model.base is not self.base or ctx.cache is None:
            return None
        cond = cond.to(tokens.device)
        if cond.shape[0] != tokens.shape[0]:
            cond = cond.expand(tokens.shape[0], -1)
        ids = torch.cat([tokens[:, -1:], cond[:, :-1]], dim=1)
        h = model.body(input_ids=ids, **cache_kwargs(model.body, ctx.cache)).last_hidden_state
        return token_log_probs(self.base, h, cond).sum(1)


def infilling_task(env: TaskEnv, *, name: str, prompt: str, output_len: int, cond_len: int) -> Task:
    """The task of configs/task/infilling.yaml: c = ``cond_len`` ≥ 1 conditioning tokens o."""
    if int(cond_len) < 1:
        raise ValueError(f"task.cond_len={cond_len} must be at least 1 for infilling")
    pot = InfillingPotential(env.base, env.prompt_ids)
    return Task(name, env.prompt_ids, int(output_len), pot, None, cond_len=int(cond_len))
