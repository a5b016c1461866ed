"""Potentials over decoded text, for scorers that are not transformers models.

``score`` is any callable from a list of N texts to N numbers (a list, an array or a tensor),
named in the task config by ``_target_`` (``_partial_: true`` for a plain function). The N
output sequences [N, T] are decoded with the LM's tokenizer (``skip_special_tokens=True``),
either with the prompt in front (``text: full``, what a classifier reads) or alone
(``text: continuation``), and scored in one call:

* ``form: log``:       log φ(s) = β · log score(text)          (score ≥ 0; 0 gives φ = 0)
* ``form: indicator``: log φ(s) = log(1[score(text) > η] + ε)   (η = ``threshold``)

Text scorers are unconditional (``cond_len`` = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from smclm.tasks.base import Task
from smclm.tasks.plugin import TaskEnv

FORMS = ("log", "indicator")
TEXTS = ("full", "continuation")


class TextDecoder:
    """Output token ids [N, T] → N strings, with the prompt in front (``full``) or not."""

    def __init__(self, lm_tokenizer: Any, prompt_ids: Tensor, text: str = "full") -> None:
        if text not in TEXTS:
            raise ValueError(f"task.text={text} must be one of: {', '.join(TEXTS)}")
        self.lm_tokenizer, self.prompt_ids, self.full = lm_tokenizer, prompt_ids, text == "full"

    def __call__(self, tokens: Tensor) -> list[str]:
        ids = tokens
        if self.full:
            prompt = self.prompt_ids.to(tokens.device)[None].expand(tokens.shape[0], -1)
            ids = torch.cat([prompt, tokens], dim=1)
        return self.lm_tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)


class TextScorerPotential:
    """log φ from ``score(texts)``; see the module docstring for the two forms."""

    def __init__(
        self,
        score: Callable[[list[str]], Sequence[float] | Tensor],
        decode: Callable[[Tensor], list[str]],
        form: str = "log",
        beta: float = 1.0,
        threshold: float = 0.0,
        epsilon: float = 1e-16,
    ) -> None:
        if not callable(score):
            raise ValueError(
                f"task.scorer is a {type(score).__name__}, not a callable; give it a _target_ "
                "(add _partial_: true for a plain function)"
            )
        if form not in FORMS:
            raise ValueError(f"task.form={form} must be one of: {', '.join(FORMS)}")
        self.score, self.decode, self.form = score, decode, form
        self.beta, self.threshold, self.epsilon = float(beta), float(threshold), float(epsilon)

    def scores(self, tokens: Tensor) -> Tensor:
        """score(text) of each sequence: float64 [N] (on tokens' device)."""
        texts = self.decode(tokens)
        raw = self.score(texts)
        out = torch.as_tensor(
            raw.detach().cpu() if isinstance(raw, Tensor) else list(raw), dtype=torch.float64
        ).reshape(-1)
        if out.numel() != len(texts):
            raise ValueError(
                f"the task's scorer returned {out.numel()} numbers for {len(texts)} texts; it "
                "must return one number per text"
            )
        if bool(torch.isnan(out).any()):
            raise ValueError(
                "the task's scorer returned NaN for some texts; it must return numbers"
            )
        return out.to(tokens.device)

    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        s = self.scores(tokens)
        if self.form == "indicator":
            return ((s > self.threshold).double() + self.epsilon).log().float()
        if bool((s < 0).any()):
            bad = s[s < 0][0].item()
            raise ValueError(
                f"the task's scorer returned {bad}, but log φ = β·log score needs scores ≥ 0; "
                "fix the scorer or use task.form=indicator"
            )
        return (self.beta * s.log()).float()

    def log_max(self, score_max: float | None = None) -> float | None:
        """An upper bound on log φ: log(1 + ε) for the indicator; β·log(score_max) for the log
        form when the scores are known to be at most ``score_max`` (β ≥ 0), else None."""
        if self.form == "indicator":
            return math.log1p(self.epsilon)
        if score_max is None or self.beta < 0:
            return None
        return self.beta * math.log(score_max) if score_max > 0 else -math.inf


def text_scorer_task(
    env: TaskEnv,
    *,
    name: str,
    prompt: str,
    output_len: int,
    scorer: Callable[[list[str]], Sequence[float] | Tensor],
    text: str = "full",
    form: str = "log",
    beta: float = 1.0,
    threshold: float = 0.0,
    epsilon: float = 1e-16,
    score_max: float | None = None,
    cond_len: int = 0,
) -> Task:
    """The task of configs/task/text_scorer.yaml: log φ from ``scorer`` over decoded text.
    ``score_max``: a known upper bound on the scores (e.g. 1 for probabilities), which makes exact
    samples by rejection possible for the log form."""
    if cond_len:
        raise ValueError(
            f"task.cond_len={cond_len}: text scorers are unconditional; set task.cond_len=0"
        )
    decode = TextDecoder(env.tokenizer, env.prompt_ids, text)
    pot = TextScorerPotential(scorer, decode, form, beta, threshold, epsilon)
    return Task(
        name,
        env.prompt_ids,
        int(output_len),
        pot,
        log_phi_max=pot.log_max(score_max),
        beta=float(beta) if form == "log" else 1.0,
    )
