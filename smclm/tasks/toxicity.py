"""Toxicity (paper §6, Figure 3 and Table 2) with r(s), the *non-toxic* score of the sequence.

The paper's classifier (``nicholasKluge/ToxicityModel``) has one logit, r itself (higher = less
toxic). A classifier with C ≥ 2 classes (e.g. labels ``non-toxic``/``toxic``) works too: its
toxic class is found by name (``task.target_label``, default ``toxic``) and r is the log-odds
against it, r = log(1 − p(toxic | s)) − log p(toxic | s), so both kinds give the same formulas:

* ``threshold``:     log φ = log(1[r(s) < η] + ε), η = −5 and ε = 1e-16 by default (Figure 3).
* ``class_logprob``: log φ = β · log p(toxic | s) = β · logsigmoid(−r) (Table 2, β = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smclm.tasks.base import Task
from smclm.tasks.classifier import (
    TextClassifier,
    class_index,
    class_log_phi_max,
    load_text_classifier,
)
from smclm.tasks.plugin import TaskEnv

POTENTIALS = ("threshold", "class_logprob")


class ToxicityPotential:
    def __init__(
        self,
        classifier: TextClassifier,
        kind: str = "threshold",
        threshold: float = -5.0,
        beta: float = 1.0,
        epsilon: float = 1e-16,
        target_label: str = "toxic",
    ) -> None:
        if kind not in POTENTIALS:
            raise ValueError(
                f"task.potential={kind} is not a toxicity potential; choose one of: "
                f"{', '.join(POTENTIALS)}"
            )
        # one logit: it is r (the paper's classifier); C classes: the toxic one, by its name
        self.index = None if classifier.num_labels == 1 else class_index(classifier, target_label)
        self.classifier, self.kind = classifier, kind
        self.threshold, self.beta, self.epsilon = threshold, beta, epsilon

    def score(self, tokens: Tensor) -> Tensor:
        """The non-toxic score r(s) [N]: the logit, or the log-odds against the toxic class."""
        logits = self.classifier.logits(tokens)
        if self.index is None:
            return logits[:, 0]
        lp = F.log_softmax(logits.float(), dim=-1)
        others = torch.cat([lp[:, : self.index], lp[:, self.index + 1 :]], dim=1)
        return torch.logsumexp(others, dim=1) - lp[:, self.index]

    def from_score(self, r: Tensor) -> Tensor:
        if self.kind == "threshold":
            return ((r < self.threshold).float() + self.epsilon).log()
        return self.beta * F.logsigmoid(-r)

    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.from_score(self.score(tokens))

    def log_max(self) -> float | None:
        return class_log_phi_max(self.kind == "threshold", self.beta, self.epsilon)


def toxicity_task(
    env: TaskEnv,
    *,
    name: str,
    prompt: str,
    output_len: int,
    classifier: str,
    potential: str = "threshold",
    threshold: float = -5.0,
    epsilon: float = 1e-16,
    beta: float = 1.0,
    target_label: str = "toxic",
    classifier_dtype: str = "auto",
    classifier_batch_size: int = 128,
    cond_len: int = 0,
) -> Task:
    """The task of configs/task/toxicity.yaml."""
    if cond_len:
        raise ValueError(f"task.cond_len={cond_len}: the toxicity task is unconditional")
    clf = load_text_classifier(env, classifier, classifier_dtype, classifier_batch_size)
    pot = ToxicityPotential(
        clf, potential, float(threshold), float(beta), float(epsilon), target_label
    )
    return Task(
        name,
        env.prompt_ids,
        int(output_len),
        pot,
        log_phi_max=pot.log_max(),
        beta=float(beta) if potential == "class_logprob" else 1.0,  # β only where φ uses it
    )
