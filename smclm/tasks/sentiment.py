"""Sentiment (paper §6, Table 3): log φ = β · log p(c | s) from a review classifier
(``LiYuan/amazon-review-sentiment-analysis``, 5 classes), c = target_class − 1 (class 1 = one
star, the paper's default), or the class named ``target_label`` in the classifier's ``id2label``.
Any classifier works (:func:`smclm.tasks.classifier.class_log_probs`: one logit or C classes)."""

from __future__ import annotations

from torch import Tensor

from smclm.tasks.base import Task
from smclm.tasks.classifier import (
    TextClassifier,
    class_index,
    class_log_probs,
    load_text_classifier,
)
from smclm.tasks.plugin import TaskEnv


class SentimentPotential:
    def __init__(
        self,
        classifier: TextClassifier,
        target_class: int = 1,
        beta: float = 1.0,
        target_label: str | None = None,
    ):
        if target_label is not None:
            self.index = class_index(classifier, target_label)
        else:
            n = max(classifier.num_labels, 2)
            if not isinstance(target_class, int) or not 1 <= target_class <= n:
                raise ValueError(
                    f"task.target_class={target_class} but the classifier has {n} classes; "
                    f"choose task.target_class between 1 and {n} (or task.target_label: "
                    f"{', '.join(classifier.labels)})"
                )
            self.index = target_class - 1
        self.classifier, self.beta = classifier, beta

    def from_logits(self, logits: Tensor) -> Tensor:
        return self.beta * class_log_probs(logits)[:, self.index]

    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.from_logits(self.classifier.logits(tokens))

    def log_max(self) -> float | None:
        return 0.0 if self.beta >= 0 else None


def sentiment_task(
    env: TaskEnv,
    *,
    name: str,
    prompt: str,
    output_len: int,
    classifier: str,
    target_class: int = 1,
    target_label: str | None = None,
    beta: float = 1.0,
    classifier_dtype: str = "auto",
    classifier_batch_size: int = 128,
    cond_len: int = 0,
) -> Task:
    """The task of configs/task/sentiment.yaml."""
    if cond_len:
        raise ValueError(f"task.cond_len={cond_len}: the sentiment task is unconditional")
    clf = load_text_classifier(env, classifier, classifier_dtype, classifier_batch_size)
    pot = SentimentPotential(clf, target_class, float(beta), target_label)
    return Task(name, env.prompt_ids, int(output_len), pot, pot.log_max(), beta=float(beta))
