"""Sentiment (paper §6, Table 3): log φ = β · log softmax(classifier(s))[c], with a 5-class review
classifier (``LiYuan/amazon-review-sentiment-analysis``) and c = target_class − 1 (class 1 = one
star, the paper's default)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from smclm.tasks.classifier import TextClassifier


class SentimentPotential:
    def __init__(self, classifier: TextClassifier, target_class: int = 1, beta: float = 1.0):
        n = classifier.num_labels
        if not isinstance(target_class, int) or not 1 <= target_class <= n:
            raise ValueError(
                f"task.target_class={target_class} but the classifier has {n} classes; "
                f"choose task.target_class between 1 and {n}"
            )
        self.classifier, self.index, self.beta = classifier, target_class - 1, beta

    def from_logits(self, logits: Tensor) -> Tensor:
        return self.beta * F.log_softmax(logits.float(), dim=-1)[:, self.index]

    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.from_logits(self.classifier.logits(tokens))

    def log_max(self) -> float | None:
        return 0.0 if self.beta >= 0 else None
