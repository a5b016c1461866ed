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


class ArithmeticEvaluator:
    """``evaluator=arithmetic``: for each of the first ``n_prompts`` test rows of a
    ``task=latent`` task (integer answers), ``n_samples`` samples from the run's sampler
    (:class:`smclm.evaluators.latent.LatentSamples`; the paper: 10 at temperature 0.1), each
    decoded with its prompt, one answer each (:func:`extract_answer`), a majority vote and exact
    match (:func:`accuracy_by_operands`)."""

    def __init__(
        self, ev: Any, model: Any, tokenizer: Any, task: Any, *, smc: Any, untrained=False
    ):
        from smclm.evaluators.latent import LatentSamples

        self.samples = LatentSamples(
            ev, model, tokenizer, task, smc=smc, untrained=untrained, name="arithmetic",
            n_default=10, temperature_default=0.1,
        )  # fmt: skip
        for row in self.samples.rows:
            true_value(row["y"])  # refuses a non-integer answer in one line
        missing = ev.get("missing")
        self.missing = None if missing is None else int(missing)

    def texts(self, prompt: Any, generator: Any = None) -> list[str]:
        """The n sample texts of one test prompt: the prompt, then Z without its stop."""
        task, zs = self.samples.draw(prompt, generator)
        head = task.prompt_ids.tolist()
        tok = self.samples.tokenizer
        return [tok.decode(head + z, skip_special_tokens=True) for z in zs]

    def __call__(self, step: int, generator: Any = None) -> dict[str, Any]:
        samples = [self.texts(p, generator) for p in self.samples.prompts]
        out: dict[str, Any] = dict(accuracy_by_operands(self.samples.rows, samples, self.missing))
        out.update(self.samples.info("arith"))
        example = samples[0][0] if samples and samples[0] else ""
        if example:  # from the question's line on: k-shot demonstrations left out
            tok = self.samples.tokenizer
            head = tok.decode(self.samples.prompts[0].tolist(), skip_special_tokens=True)
            example = example[example.rfind("\n", 0, len(head)) + 1 :]
        out["arith/example"] = example
        return out
