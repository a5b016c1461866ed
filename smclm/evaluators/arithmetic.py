"""Evaluation of the integer-arithmetic experiment (Hu et al., ICLR 2024, §4.4, Table 4), as the
paper's code does it (``utils.py`` ``extract_answer`` / ``run_evaluation``;
``../shared/docs/gfn-paper-spec.md`` §4.4): k samples per test question (the paper: 10 at
temperature 0.1, with the calculator), one answer extracted from each, a majority vote, exact
match with the true value; accuracy per operand count.

``evaluator=arithmetic`` (:class:`ArithmeticEvaluator`, configs/evaluator/arithmetic.yaml) runs
it on ``task=latent``'s test rows with the run's own sampler; the calculator is not in the
sampler yet (issue 24), so the samples must write the numbers themselves. The functions below
are pure Python and need no model.

* :func:`extract_answer`, the paper's rule: the text after the last "=", blanks then "." stripped
  from both ends, read as an integer; if that fails, the last blank-separated word, "." stripped,
  read as an integer; else no answer. The paper applies it to the decoded full text (the query,
  which holds "= ? Answer:", then the rationale with the calculator's numbers), so a text with no
  "=" in the rationale falls back to its last word. An integer is an optional sign and ASCII
  digits (the paper's ``int()`` also takes "1_000" and non-ASCII digits; irrelevant under its
  vocabulary restriction).
* No answer: the paper's code returns −1, which then votes like any answer and counts as correct
  when the true value is −1 (−1 is a possible answer). Here it is None by default: it still
  votes (a majority of unreadable samples gives no answer, as in the paper) but never matches.
  ``missing=-1`` (:data:`PAPER_MISSING`) reproduces the paper exactly.
* :func:`majority_vote`: the most frequent answer; a tie goes to the answer whose first sample
  comes first, which is what the paper's ``Counter(answers).most_common(1)`` returns (Counter
  keeps first-insertion order and ``most_common`` sorts stably).
* :func:`accuracy_by_operands`: exact match of the vote with the row's ``y`` (an int, or a text
  that reads as one), per ``n_operands`` and over all rows; keys ``arith/acc_<n>op``,
  ``arith/n_<n>op``, ``arith/acc``, ``arith/n``.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from typing import Any

from smclm.errors import ConfigError

PAPER_MISSING = -1  # what the paper's extract_answer returns when it finds no number
_INT = re.compile(r"[+-]?[0-9]+")


def _read_int(text: str) -> int | None:
    text = text.strip().strip(".").strip()  # int() itself ignores surrounding blanks
    if not _INT.fullmatch(text):
        return None
    try:
        return int(text)
    except ValueError:  # beyond Python's int-string limit
        return None


def extract_answer(text: str, missing: int | None = None) -> int | None:
    """The integer answer in a sample's text (module docstring), or ``missing``."""
    if not isinstance(text, str):
        return missing
    value = _read_int(text.split("=")[-1])
    if value is None:
        words = text.split()
        value = _read_int(words[-1]) if words else None
    return missing if value is None else value


def majority_vote(answers: Sequence[Hashable]) -> Any:
    """The most frequent of ``answers`` (None counts as an answer); ties go to the one that
    occurs first. None for no answers at all."""
    counts: dict[Hashable, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    best, best_count = None, 0
    for a, c in counts.items():  # first-occurrence order: a strict > keeps the earliest
        if c > best_count:
            best, best_count = a, c
    return best


def vote(texts: Sequence[str], missing: int | None = None) -> int | None:
    """The majority-vote answer of one question's sample texts."""
    return majority_vote([extract_answer(t, missing) for t in texts])


def true_value(y: Any) -> int:
    """A row's ``y`` as an int (an int, or a text such as "-12")."""
    if isinstance(y, int) and not isinstance(y, bool):
        return y
    if isinstance(y, str) and _INT.fullmatch(y.strip()):
        return int(y.strip())
    raise ConfigError(f"y={y!r}: arithmetic rows need an integer answer y")


def accuracy_by_operands(
    rows: Sequence[dict[str, Any]],
    samples: Sequence[Sequence[str]],
    missing: int | None = None,
) -> dict[str, float | int]:
    """Exact-match accuracy of the majority vote: ``samples[i]`` are row i's k sample texts.
    Per operand count (``arith/acc_<n>op``, ``arith/n_<n>op``, counts in increasing order; rows
    without ``n_operands`` count only in the total) and over all (``arith/acc``, ``arith/n``);
    accuracy is NaN for no rows."""
    if len(rows) != len(samples):
        raise ConfigError(f"{len(rows)} rows but {len(samples)} lists of samples: give one per row")
    correct: dict[int | None, list[int]] = {}
    for row, texts in zip(rows, samples):
        hit = int(vote(texts, missing) == true_value(row["y"]))
        correct.setdefault(row.get("n_operands"), []).append(hit)
    out: dict[str, float | int] = {}
    for n in sorted(k for k in correct if k is not None):
        hits = correct[n]
        out[f"arith/acc_{n}op"] = sum(hits) / len(hits)
        out[f"arith/n_{n}op"] = len(hits)
    everything = [h for hits in correct.values() for h in hits]
    out["arith/acc"] = sum(everything) / len(everything) if everything else float("nan")
    out["arith/n"] = len(everything)
    return out


SAMPLERS = ("auto", "policy", "twisted_smc", "p0")


class ArithmeticEvaluator:
    """``evaluator=arithmetic``: for each of the first ``n_prompts`` test rows of a
    ``task=latent`` task (integer answers), ``n_samples`` finished samples from the run's sampler
    (``auto``: its policy, else twisted SMC with its twist, else p₀), each decoded with its
    prompt (the stop dropped), one answer each (:func:`extract_answer`), a majority vote and
    exact match (:func:`accuracy_by_operands`). ``temperature`` (the paper: 0.1) divides the
    logits of the policy's or p₀'s proposal; twisted SMC samples at temperature 1 (its weights
    correct the proposal towards σ) and draws the n samples from its final weights."""

    def __init__(
        self, ev: Any, model: Any, tokenizer: Any, task: Any, *, smc: Any, untrained: bool = False
    ):
        rows = getattr(task.potential, "test_rows", None)
        if not rows or not getattr(task, "test_prompts", ()):
            raise ConfigError(
                f"evaluator=arithmetic needs test rows with integer answers (task=latent with "
                f"task.test_data, or task.data=arithmetic); task '{task.name}' has none"
            )
        for row in rows:
            true_value(row["y"])  # refuses a non-integer answer in one line
        n_prompts = ev.get("n_prompts")
        self.rows = list(rows)[: None if n_prompts is None else int(n_prompts)]
        self.prompts = list(task.test_prompts)[: len(self.rows)]
        self.n = int(ev.get("n_samples", 10))
        self.temperature = float(ev.get("temperature", 0.1))
        if not (self.n > 0 and self.temperature > 0):
            raise ConfigError(
                f"evaluator.n_samples={self.n} and evaluator.temperature={self.temperature} "
                "must be positive"
            )
        missing = ev.get("missing")
        self.missing = None if missing is None else int(missing)
        sampler = str(ev.get("sampler", "auto"))
        if sampler not in SAMPLERS:
            raise ConfigError(f"evaluator.sampler={sampler} must be one of {', '.join(SAMPLERS)}")
        if sampler == "auto":
            if untrained:
                sampler = "p0"
            else:
                sampler = (
                    "policy"
                    if model.policy is not None
                    else "twisted_smc"
                    if model.twist is not None
                    else "p0"
                )
        if sampler == "policy" and model.policy is None:
            raise ConfigError("evaluator.sampler=policy, but the model has no policy; use auto")
        if sampler == "twisted_smc" and model.twist is None:
            raise ConfigError("evaluator.sampler=twisted_smc, but the model has no twist; use auto")
        self.sampler = sampler
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.n_particles = int(smc.n_particles)
        self.resampling, self.ess_threshold = str(smc.resampling), float(smc.ess_threshold)

    def texts(self, prompt: Any, generator: Any = None) -> list[str]:
        """The n sample texts of one test prompt: the prompt, then Z without its stop."""
        import torch

        from smclm.smc.sampler import no_potential, run_smc

        task = self.task.for_prompt(prompt)
        if self.sampler == "twisted_smc":
            res = run_smc(
                self.model, task.prompt_ids, task.output_len, task.bind(), self.n_particles,
                resampling=self.resampling, ess_threshold=self.ess_threshold, generator=generator,
            )  # fmt: skip
            idx = torch.multinomial(
                res.normalized_weights, self.n, replacement=True, generator=generator
            )
        else:
            proposal = self.model.with_twist(None, keep_policy=self.sampler == "policy")
            res = run_smc(
                proposal, task.prompt_ids, task.output_len, no_potential, self.n,
                ess_threshold=0.0, generator=generator, temperature=self.temperature,
                stopping=task.stopping,
            )  # fmt: skip
            idx = torch.arange(self.n)
        rows, lengths = res.tokens.tolist(), res.lengths.tolist()
        head = task.prompt_ids.tolist()
        out = []
        for i in idx.tolist():
            z = rows[i][: lengths[i]]
            if z and z[-1] in task.stop_ids:
                z = z[:-1]
            out.append(self.tokenizer.decode(head + z, skip_special_tokens=True))
        return out

    def __call__(self, step: int, generator: Any = None) -> dict[str, Any]:
        samples = [self.texts(p, generator) for p in self.prompts]
        out: dict[str, Any] = dict(accuracy_by_operands(self.rows, samples, self.missing))
        out["arith/sampler"] = self.sampler
        out["arith/n_samples"] = self.n
        out["arith/example"] = samples[0][0] if samples and samples[0] else ""
        return out
