"""Evaluators of ``task=latent`` on its test rows (Hu et al., ICLR 2024, §4.2–4.4;
``../shared/docs/gfn-paper-spec.md`` §2.4, §3.4, §4.4), all drawing samples the same way
(:class:`LatentSamples`): for each of the first ``evaluator.n_prompts`` test rows,
``evaluator.n_samples`` finished rationales Z from the run's sampler (``auto``: its policy, else
twisted SMC with its twist, else p₀), the stop dropped. The policy and p₀ sample at
``evaluator.temperature``; twisted SMC samples at temperature 1 and draws the n samples from its
final weights.

* ``evaluator=arithmetic`` (:class:`smclm.evaluators.arithmetic.ArithmeticEvaluator`): the
  answer after the last "=", majority vote, exact match per operand count.
* ``evaluator=overlap`` (:class:`OverlapEvaluator`; infilling): BLEU-4 and GLEU
  (:mod:`smclm.evaluators.text_overlap`) of each sample's text against the row's z, whitespace
  words, the reference's final "." removed, averaged over all samples of all rows (the paper's
  mean); with ``evaluator.bertscore.model`` (the paper's ``microsoft/deberta-xlarge-mnli``, or
  any encoder and its layer, by name or local directory) also BERTScore F1
  (:mod:`smclm.evaluators.bertscore`) of the same sample texts against the same reference (z
  without its final ".", as the paper's reference sentence).
* ``evaluator=label_vote`` (:class:`LabelVoteEvaluator`; subjectivity): each sample's label is
  the one of ``task.labels`` whose answer text p₀ scores highest after [C, X, Z]; the row's
  prediction is the label most samples give (ties: the label listed last, so that with
  ``[objective, subjective]`` "objective" needs more than half the votes, as in the paper);
  accuracy against y.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from smclm.errors import ConfigError


class LatentSamples:
    """The shared sampling of the latent evaluators (module docstring)."""

    def __init__(
        self,
        ev: Any,
        model: Any,
        tokenizer: Any,
        task: Any,
        *,
        smc: Any,
        untrained: bool,
        name: str,
        n_default: int,
        temperature_default: float,
    ) -> None:
        rows = getattr(task.potential, "test_rows", None)
        if not rows or not getattr(task, "test_prompts", ()):
            raise ConfigError(
                f"evaluator={name} needs task=latent with test rows (task.test_data, or "
                f"task.data=arithmetic); task '{task.name}' has none"
            )
        n_prompts = ev.get("n_prompts")
        self.rows = list(rows)[: None if n_prompts is None else int(n_prompts)]
        self.prompts = list(task.test_prompts)[: len(self.rows)]
        self.n = int(ev.get("n_samples", n_default))
        self.temperature = float(ev.get("temperature", temperature_default))
        if not (self.n > 0 and self.temperature > 0):
            raise ConfigError(
                f"evaluator.n_samples={self.n} and evaluator.temperature={self.temperature} "
                "must be positive"
            )
        from smclm.evaluators.sentences import resolve_sampler

        self.sampler = resolve_sampler(str(ev.get("sampler", "auto")), model, untrained)
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.n_particles = int(smc.n_particles)
        self.resampling, self.ess_threshold = str(smc.resampling), float(smc.ess_threshold)

    def draw(self, prompt: Tensor, generator: Any = None) -> tuple[Any, list[list[int]]]:
        """(the task bound to ``prompt``, the n samples' Z without its stop, as id lists)."""
        from smclm.smc.sampler import no_potential, run_smc

        task = self.task.for_prompt(prompt)
        if self.sampler == "twisted_smc":
            res = run_smc(
                self.model, task.prompt_ids, task.output_len, task.bind(), self.n_particles,
                resampling=self.resampling, ess_threshold=self.ess_threshold, generator=generator,
            )  # fmt: skip
            w = res.normalized_weights
            idx = torch.multinomial(w, self.n, replacement=True, generator=generator)
        else:
            proposal = self.model.with_twist(None, keep_policy=self.sampler == "policy")
            res = run_smc(
                proposal, task.prompt_ids, task.output_len, no_potential, self.n,
                ess_threshold=0.0, generator=generator, temperature=self.temperature,
                stopping=task.stopping,
            )  # fmt: skip
            idx = torch.arange(self.n)
        rows, lengths = res.tokens.tolist(), res.lengths.tolist()
        out = []
        for i in idx.tolist():
            z = rows[i][: lengths[i]]
            if z and z[-1] in task.stop_ids:
                z = z[:-1]
            out.append(z)
        return task, out

    def info(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}/sampler": self.sampler, f"{prefix}/n_samples": self.n}


class OverlapEvaluator:
    """``evaluator=overlap`` (module docstring): ``infill/bleu4``, ``infill/gleu``."""

    def __init__(
        self, ev: Any, model: Any, tokenizer: Any, task: Any, *, smc: Any, untrained=False
    ):
        self.samples = LatentSamples(
            ev, model, tokenizer, task, smc=smc, untrained=untrained, name="overlap",
            n_default=25, temperature_default=0.9,
        )  # fmt: skip
        for row in self.samples.rows:
            if not isinstance(row.get("z"), str) or not row["z"].strip():
                raise ConfigError(
                    f"evaluator=overlap compares samples with each test row's z; the row "
                    f"x={row['x']!r} has none"
                )
        from smclm.evaluators.bertscore import scorer_from_config

        self.bertscore = scorer_from_config(ev.get("bertscore"), model.device)

    @torch.no_grad()
    def __call__(self, step: int, generator: Any = None) -> dict[str, Any]:
        from smclm.evaluators.text_overlap import sentence_bleu4, sentence_gleu

        bleu, gleu, example = [], [], ""
        cands: list[str] = []
        refs: list[str] = []
        tok = self.samples.tokenizer
        for prompt, row in zip(self.samples.prompts, self.samples.rows):
            _, zs = self.samples.draw(prompt, generator)
            ref_text = row["z"].strip()
            ref_sentence = ref_text[:-1] if ref_text.endswith(".") else ref_text
            ref = ref_sentence.split()
            for z in zs:
                text = tok.decode(z, skip_special_tokens=True).strip()
                example = example or text
                bleu.append(sentence_bleu4(ref, text.split()))
                gleu.append(sentence_gleu(ref, text.split()))
                cands.append(text)
                refs.append(ref_sentence)
        out: dict[str, Any] = {
            "infill/bleu4": sum(bleu) / len(bleu),
            "infill/gleu": sum(gleu) / len(gleu),
            "infill/n_rows": len(self.samples.rows),
            "infill/example": example,
        }
        if self.bertscore is not None:
            f1 = self.bertscore.f1(cands, refs)
            out["infill/bertscore"] = sum(f1) / len(f1)
            out["infill/bertscore_model"] = f"{self.bertscore.name} layer {self.bertscore.layer}"
            if self.bertscore.baseline is not None:  # rescaled: (F − b) / (1 − b)
                out["infill/bertscore_baseline"] = self.bertscore.baseline
        out.update(self.samples.info("infill"))
        return out


class LabelVoteEvaluator:
    """``evaluator=label_vote`` (module docstring): ``label/acc``, ``label/n``."""

    def __init__(
        self, ev: Any, model: Any, tokenizer: Any, task: Any, *, smc: Any, untrained=False
    ):
        self.samples = LatentSamples(
            ev, model, tokenizer, task, smc=smc, untrained=untrained, name="label_vote",
            n_default=10, temperature_default=1.0,
        )  # fmt: skip
        labels = getattr(task.potential, "labels", None)
        if not labels:
            raise ConfigError(
                "evaluator=label_vote needs the task's labels: set task.labels (e.g. "
                "[objective, subjective])"
            )
        self.labels = list(labels)
        self.answers = [task.potential.label_ids[v] for v in self.labels]

    def predict(self, task: Any, z: list[int]) -> str:
        """The label whose answer text p₀ scores highest after [C, X, z] (first on ties)."""
        zs = torch.tensor([z], dtype=torch.long, device=self.samples.model.device)
        scores = task.potential.answer_log_probs(zs, self.answers)[0].tolist()
        return self.labels[max(range(len(scores)), key=lambda i: (scores[i], -i))]

    @torch.no_grad()
    def __call__(self, step: int, generator: Any = None) -> dict[str, Any]:
        hits = []
        for prompt, row in zip(self.samples.prompts, self.samples.rows):
            task, zs = self.samples.draw(prompt, generator)
            votes = [self.predict(task, z) for z in zs]
            counts = {lab: votes.count(lab) for lab in self.labels}
            pred = max(self.labels, key=lambda lab: (counts[lab], self.labels.index(lab)))
            hits.append(int(pred == str(row["y"])))
        out: dict[str, Any] = {"label/acc": sum(hits) / len(hits), "label/n": len(hits)}
        out.update(self.samples.info("label"))
        return out
