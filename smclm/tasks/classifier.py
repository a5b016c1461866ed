"""Sequence classifiers as potentials: load, decode → re-tokenise → score (paper-spec §6).

The classifier never sees the LM's token ids. Each full sequence (prompt included) is decoded
with the LM tokenizer (``skip_special_tokens=True``), re-tokenised with the classifier's own
tokenizer (truncated to the classifier's limit, at most 512, padded), and scored in batches on the
classifier's device. Logits come back as float32 [N, C].

Any classifier works: C ≥ 2 classes are read with a softmax; one logit z is a two-class
classifier with p(class 1) = sigmoid(z) and p(class 0) = sigmoid(−z) (:func:`class_log_probs`).
A class is chosen by index or by its label name in the classifier's ``id2label``
(:func:`class_index`); for one logit, the label of that logit names class 1.

``classifier_task`` (configs/task/classifier.yaml) is the generic task:
log φ = β·log p(target | s), or the indicator log(1[p(target | s) > η] + ε).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smclm.models.loading import load_pretrained, resolve_dtype
from smclm.tasks.base import Task
from smclm.tasks.plugin import TaskEnv
from smclm.tasks.text_scorer import TextDecoder


def load_classifier(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """A frozen ``AutoModelForSequenceClassification`` and its tokenizer: Hub name or local dir."""
    from transformers import AutoModelForSequenceClassification

    return load_pretrained(
        name,
        "task.classifier",
        AutoModelForSequenceClassification,
        "ForSequenceClassification",
        "a sequence classifier",
        dtype,
        device,
    )


class TextClassifier:
    """Scores LM token sequences with a classifier that has its own tokenizer."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        lm_tokenizer: Any,
        prompt_ids: Tensor,
        batch_size: int = 128,
        max_length: int = 512,
    ) -> None:
        self.model, self.tokenizer, self.lm_tokenizer = model, tokenizer, lm_tokenizer
        self.prompt_ids = prompt_ids
        self._decode = TextDecoder(lm_tokenizer, prompt_ids, "full")
        self.batch_size = batch_size
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        # RoBERTa reserves two positions for its offset; stay safely inside the table.
        self.max_length = min(max_length, limit - 2) if limit else max_length
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    @property
    def labels(self) -> list[str]:
        """The label name of each output (``id2label``; ``LABEL_i`` where it has none)."""
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.num_labels)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def texts(self, tokens: Tensor) -> list[str]:
        """The full sequences (prompt + output) as text, special tokens dropped."""
        return self._decode(tokens)

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        """Classifier logits for output tokens [N, T] → float32 [N, C] (on tokens' device)."""
        texts = self.texts(tokens)
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            out.append(self.model(**enc).logits.float())
        return torch.cat(out).to(tokens.device)


def class_log_probs(logits: Tensor) -> Tensor:
    """log p(class | s) [N, max(C, 2)] from logits [N, C]: a softmax over C ≥ 2 classes; one
    logit z is read as two classes, log p = [logsigmoid(−z), logsigmoid(z)]."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=1)
    return F.log_softmax(logits, dim=-1)


def class_index(
    classifier: TextClassifier,
    label: str | None = None,
    index: int | None = None,
    key: str = "task",
) -> int:
    """The column of :func:`class_log_probs` for a class given by its label name (exact, then
    case-insensitive) or by its index; one line listing the labels when it does not exist."""
    labels = classifier.labels
    n_classes = max(classifier.num_labels, 2)
    if label is not None:
        names = labels if classifier.num_labels > 1 else [f"not {labels[0]}", labels[0]]
        for match in (lambda a: a == str(label), lambda a: a.lower() == str(label).lower()):
            hits = [i for i, name in enumerate(names) if match(name)]
            if len(hits) == 1:
                return hits[0]
        raise ValueError(
            f"{key}.target_label={label!r} is not a label of the classifier; its labels are: "
            f"{', '.join(names)} (or choose a class by index)"
        )
    if not isinstance(index, int) or not 0 <= index < n_classes:
        raise ValueError(
            f"{key}.target_index={index} but the classifier has {n_classes} classes; choose an "
            f"index in [0, {n_classes}) or a label: {', '.join(labels)}"
        )
    return index


def load_text_classifier(
    env: TaskEnv, name: str, dtype: str = "auto", batch_size: int = 128
) -> TextClassifier:
    """The classifier ``name`` (Hub name or local dir) reading the env's decoded sequences."""
    model, tok = load_classifier(name, env.device, resolve_dtype(str(dtype), env.device))
    return TextClassifier(model, tok, env.tokenizer, env.prompt_ids, batch_size=int(batch_size))


def class_log_phi_max(indicator: bool, beta: float, epsilon: float) -> float | None:
    """An upper bound on log φ of a potential built on a class probability: log(1 + ε) for an
    indicator, 0 for β·log p with β ≥ 0; None (no bound) for β < 0."""
    if indicator:
        return math.log1p(epsilon)
    return 0.0 if beta >= 0 else None


class ClassPotential:
    """log φ = β·log p(class | s) (``form: log``), or log(1[p(class | s) > η] + ε)
    (``form: indicator``), for the class at column ``index`` of :func:`class_log_probs`."""

    def __init__(
        self,
        classifier: TextClassifier,
        index: int,
        form: str = "log",
        beta: float = 1.0,
        threshold: float = 0.5,
        epsilon: float = 1e-16,
    ) -> None:
        if form not in ("log", "indicator"):
            raise ValueError(f"task.form={form} must be log or indicator")
        self.classifier, self.index, self.form = classifier, index, form
        self.beta, self.threshold, self.epsilon = beta, threshold, epsilon

    def from_logits(self, logits: Tensor) -> Tensor:
        lp = class_log_probs(logits)[:, self.index]
        if self.form == "indicator":
            return ((lp.exp() > self.threshold).float() + self.epsilon).log()
        return self.beta * lp

    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.from_logits(self.classifier.logits(tokens))

    def log_max(self) -> float | None:
        return class_log_phi_max(self.form == "indicator", self.beta, self.epsilon)


def classifier_task(
    env: TaskEnv,
    *,
    name: str,
    prompt: str,
    output_len: int,
    classifier: str,
    target_label: str | None = None,
    target_index: int | None = None,
    form: str = "log",
    beta: float = 1.0,
    threshold: float = 0.5,
    epsilon: float = 1e-16,
    classifier_dtype: str = "auto",
    classifier_batch_size: int = 128,
    cond_len: int = 0,
) -> Task:
    """Any sequence classifier as a potential (configs/task/classifier.yaml): the class by
    ``target_label`` (a name in ``id2label``) or ``target_index``."""
    if cond_len:
        raise ValueError(f"task.cond_len={cond_len}: classifier tasks are unconditional")
    if (target_label is None) == (target_index is None):
        raise ValueError(
            "the classifier task needs exactly one of task.target_label (a label name) and "
            "task.target_index (a class index); set one, the other null"
        )
    clf = load_text_classifier(env, classifier, classifier_dtype, classifier_batch_size)
    idx = class_index(clf, target_label, target_index)
    pot = ClassPotential(clf, idx, form, float(beta), float(threshold), float(epsilon))
    return Task(
        name,
        env.prompt_ids,
        int(output_len),
        pot,
        log_phi_max=pot.log_max(),
        beta=float(beta) if form == "log" else 1.0,
    )
