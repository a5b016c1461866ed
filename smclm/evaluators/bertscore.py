"""BERTScore F1 (Zhang et al., ICLR 2020) of a candidate against a reference, as the GFlowNet
paper's infilling evaluation computes it with the ``bert_score`` package
(``BERTScorer(model_type="microsoft/deberta-xlarge-mnli", lang="en", rescale_with_baseline=True)``;
``../shared/docs/gfn-paper-spec.md`` §2.4). Written from that definition with a ``transformers``
encoder given by name or local directory; ``bert_score`` is not a dependency.

* Each text is stripped and encoded with the tokenizer's special tokens (a byte-level BPE
  tokenizer — RoBERTa, DeBERTa — sees it after a space, as ``bert_score``'s
  ``add_prefix_space=True``), truncated to the encoder's length.
* Its token embeddings are the hidden states after encoder layer ``layer``
  (``hidden_states[layer]``; ``bert_score``'s default for the paper's model is 40), each divided
  by its norm.
* Greedy matching without idf weights: precision P = the mean over the candidate's tokens of the
  largest cosine with any reference token, recall R the same the other way round, F = 2PR/(P+R).
  The tokenizer's CLS and SEP tokens weigh 0 in the means but can be matched (as ``bert_score``
  with ``idf=False``). A text with no other token scores P = R = F = 0.
* Rescaled (``baseline`` b, the F column of ``bert_score``'s baseline table for the model and
  layer): F' = (F − b) / (1 − b); b = 0.5150192 for deberta-xlarge-mnli at layer 40.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from smclm.errors import ConfigError

PAPER_MODEL = "microsoft/deberta-xlarge-mnli"
# bert_score's choices for the paper's encoder: its default layer (model2layers) and the F column
# of rescale_baseline/en/microsoft/deberta-xlarge-mnli.tsv at that layer
KNOWN: dict[str, tuple[int, float]] = {PAPER_MODEL: (40, 0.5150192)}


class BertScorer:
    """``f1(candidates, references)``: BERTScore F1 of each pair (module docstring)."""

    def __init__(
        self,
        model: str,
        *,
        layer: int | None = None,
        baseline: float | str | None = "auto",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = str(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.name)
            self.encoder = AutoModel.from_pretrained(self.name).to(device).eval()
        except Exception as e:  # OSError offline, a directory that holds no model, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"evaluator.bertscore.model={self.name} could not be loaded ({first}): give a "
                "local directory holding the encoder and its tokenizer, or set it to null"
            ) from None
        if layer is None:
            if self.name not in KNOWN:
                raise ConfigError(
                    f"evaluator.bertscore.layer is needed for evaluator.bertscore.model="
                    f"{self.name} (set it to the encoder layer whose output to match; "
                    f"{PAPER_MODEL} defaults to {KNOWN[PAPER_MODEL][0]})"
                )
            layer = KNOWN[self.name][0]
        n_layers = int(getattr(self.encoder.config, "num_hidden_layers", 0))
        if not 0 <= int(layer) <= n_layers:
            raise ConfigError(
                f"evaluator.bertscore.layer={layer} is outside 0..{n_layers}, the layers of "
                f"{self.name}"
            )
        self.layer = int(layer)
        if baseline == "auto":
            known = KNOWN.get(self.name)
            baseline = known[1] if known and known[0] == self.layer else None
        if baseline is not None and not float(baseline) < 1.0:
            raise ConfigError(f"evaluator.bertscore.baseline={baseline} must be below 1 (or null)")
        self.baseline = None if baseline is None else float(baseline)
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device)
        tok = self.tokenizer
        self.silent = {i for i in (tok.cls_token_id, tok.sep_token_id) if i is not None}
        self.prefix_space = self._byte_level()
        self.max_len = min(
            int(getattr(tok, "model_max_length", 512) or 512),
            int(getattr(self.encoder.config, "max_position_embeddings", 512) or 512),
        )

    def _byte_level(self) -> bool:
        """Whether the tokenizer marks word starts with a space byte (GPT-2 style BPE)."""
        pieces = self.tokenizer.convert_ids_to_tokens(
            self.tokenizer(" a", add_special_tokens=False)["input_ids"]
        )
        return bool(pieces) and str(pieces[0]).startswith("Ġ")

    def encode(self, text: str) -> list[int]:
        text = text.strip()
        if text and self.prefix_space:
            text = " " + text
        ids = self.tokenizer(text, add_special_tokens=True, truncation=True,
                             max_length=self.max_len)["input_ids"]  # fmt: skip
        return list(ids)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """{text: (unit-norm token embeddings [n, d], token weights [n])} for distinct texts."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        distinct = sorted(set(texts), key=len)
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(distinct), self.batch_size):
            chunk = distinct[start : start + self.batch_size]
            rows = [self.encode(t) for t in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = 1
            hidden = self.encoder(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                output_hidden_states=True,
            ).hidden_states[self.layer].float().cpu()  # fmt: skip
            for i, (text, r) in enumerate(zip(chunk, rows)):
                emb = hidden[i, : len(r)]
                emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                weight = torch.tensor([0.0 if t in self.silent else 1.0 for t in r])
                out[text] = (emb, weight)
        return out

    def f1(self, candidates: list[str], references: list[str]) -> list[float]:
        """BERTScore F1 of each (candidate, reference) pair, rescaled when a baseline is set."""
        if len(candidates) != len(references):
            raise ValueError("candidates and references must pair up")
        table = self.embed(list(candidates) + list(references))
        scores = []
        for cand, ref in zip(candidates, references):
            (ce, cw), (re_, rw) = table[cand], table[ref]
            if float(cw.sum()) == 0.0 or float(rw.sum()) == 0.0:
                f = 0.0
            else:
                sim = ce @ re_.T
                p = float((sim.max(dim=1).values * cw).sum() / cw.sum())
                r = float((sim.max(dim=0).values * rw).sum() / rw.sum())
                f = 2 * p * r / (p + r) if p + r != 0 else 0.0
            if self.baseline is not None:
                f = (f - self.baseline) / (1.0 - self.baseline)
            scores.append(f)
        return scores


def scorer_from_config(cfg: Any, device: Any) -> BertScorer | None:
    """``evaluator.bertscore`` (``model``: null for none, ``layer``, ``baseline``, ``batch_size``)."""
    if cfg is None or cfg.get("model") in (None, "", "null"):
        return None
    layer = cfg.get("layer")
    return BertScorer(
        str(cfg.get("model")),
        layer=None if layer is None else int(layer),
        baseline=cfg.get("baseline", "auto"),
        device=device,
        batch_size=int(cfg.get("batch_size", 64)),
    )
