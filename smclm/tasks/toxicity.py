"""Toxicity (paper §6, Figure 3 and Table 2) with a one-logit classifier r(s), the *non-toxic* score
(``nicholasKluge/ToxicityModel``: higher = less toxic).

* ``threshold``:     log φ = log(1[r(s) < η] + ε), η = −5 and ε = 1e-16 by default (Figure 3).
* ``class_logprob``: log φ = β · log p(toxic | s) = β · log(1 − sigmoid(r)) = β · logsigmoid(−r)
                     (Table 2, β = 1).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from smclm.tasks.classifier import TextClassifier

POTENTIALS = ("threshold", "class_logprob")


class ToxicityPotential:
    def __init__(
        self,
        classifier: TextClassifier,
        kind: str = "threshold",
        threshold: float = -5.0,
        beta: float = 1.0,
        epsilon: float = 1e-16,
    ) -> None:
        if kind not in POTENTIALS:
            raise ValueError(
                f"task.potential={kind} is not a toxicity potential; choose one of: "
                f"{', '.join(POTENTIALS)}"
            )
        if classifier.num_labels != 1:
            raise ValueError(
                f"the toxicity classifier has {classifier.num_labels} outputs but the task reads "
                "one non-toxic logit r(s); give a one-logit classifier such as "
                "nicholasKluge/ToxicityModel"
            )
        self.classifier, self.kind = classifier, kind
        self.threshold, self.beta, self.epsilon = threshold, beta, epsilon

    def score(self, tokens: Tensor) -> Tensor:
        """The non-toxic logit r(s) [N]."""
        return self.classifier.logits(tokens)[:, 0]

    def from_score(self, r: Tensor) -> Tensor:
        if self.kind == "threshold":
            return ((r < self.threshold).float() + self.epsilon).log()
        return self.beta * F.logsigmoid(-r)

    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.from_score(self.score(tokens))

    def log_max(self) -> float | None:
        if self.kind == "threshold":
            return math.log1p(self.epsilon)
        return 0.0 if self.beta >= 0 else None
