"""Sequence classifiers as potentials: load, decode → re-tokenise → score (paper-spec §6).

The classifier never sees the LM's token ids. Each full sequence (prompt included) is decoded
with the LM tokenizer (``skip_special_tokens=True``), re-tokenised with the classifier's own
tokenizer (truncated to the classifier's limit, at most 512, padded), and scored in batches on the
classifier's device. Logits come back as float32 [N, C].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from smclm.models.loading import load_pretrained


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
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def texts(self, tokens: Tensor) -> list[str]:
        """The full sequences (prompt + output) as text, special tokens dropped."""
        prompt = self.prompt_ids.to(tokens.device)[None].expand(tokens.shape[0], -1)
        ids = torch.cat([prompt, tokens], dim=1).cpu()
        return self.lm_tokenizer.batch_decode(ids, skip_special_tokens=True)

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
