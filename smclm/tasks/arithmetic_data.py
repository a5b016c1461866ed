"""The integer-arithmetic data of Hu et al. (ICLR 2024, §4.4, Table 4;
``../shared/docs/gfn-paper-spec.md`` §4.1), made by smclm with a seeded generator (no download),
and the JSONL row format that ``task=latent`` will read.

``task=latent`` reads its rows with :func:`read_jsonl` and, with ``task.data=arithmetic``, makes
them with :func:`generate` (:mod:`smclm.tasks.latent`); ``task.calculator=true`` adds the tool
(:mod:`smclm.tasks.calculator`).

The data, as the paper's generator notebook makes it (``data_integer_arithmetic.ipynb``):

* a question is ``"Question: a ± b ± c [± …] = ? Answer:"``, operands uniform single digits
  0–9 (``digits`` = 1), each operator uniform in {+, -} (ASCII minus), evaluated left to right;
* the worked rationale is the chain of partial results, one two-term step per operand after the
  first: ``"6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"``; its tool form (what the policy writes when the
  calculator supplies the numbers, :func:`tool_form`) is ``"6 - 0 =, 6 - 4 =, 2 - 8 ="``;
* the reward's answer text is ``". The answer is N."`` (:func:`answer_text`); a worked example
  in the reward's k-shot prompt is ``x + " " + z + answer_text(y)`` (:func:`demo_text`);
* training questions have 3 or 4 operands (the count uniform per question, as the notebook's
  ``randint(3, 4)``): ``n_labelled`` = 50 with a rationale, then ``n_unlabelled`` = 1000
  without (the paper's "hw" file: 1000); all training questions are distinct, labelled and
  unlabelled together (the notebook's exclusion set). The paper's config trains on the first 10
  labelled rows only (``num_train``; which of 10 and 50 made Table 4 is open, spec §4.1): take
  ``labelled[:10]`` of the default draw, since ``n_labelled=10`` would shift the unlabelled draw;
* test sets of ``n_test`` = 500 per operand count, 3, 4 and 5 (``test_operands``).

Test sets (``test_sampling``). ``"paper"`` (default) draws each test set as the paper's files
were made: from a fresh ``random.Random(seed)`` per set, with replacement, training questions
not excluded. The 5-operand set is then disjoint from training because 5 is not a training
count; the 3- and 4-operand sets may share questions with training and repeat some, as the
paper's do (its 3-operand file shares 100 questions with training and holds 474 distinct
questions; the 4-operand file shares 56). ``"disjoint"`` draws every test set, after the
training rows, from the same stream: distinct questions, none of them a training question.

Seed 0 reproduces the paper's shipped files (checked against GFNOrg/gfn-lm-tuning @ 8604cff,
``infill_subj_arithmetic/data/``): the 50 labelled rows are those of
``arithmetic_with_tool/1digit_34_op+-_train_50.json`` in order (27 × 3 / 23 × 4 operands; its
rationales are :func:`tool_form` of ours), and the three ``test_sampling="paper"`` sets are
``1digit_{3,4,5}_op+-_test.json`` exactly. The paper's hw file was not made by its committed
notebook (which writes 250 rows): it agrees with our unlabelled rows only for the first 172
(ours: 497 × 3 / 503 × 4 operands, the paper's 485 / 515).

Determinism: one ``random.Random(seed)`` draws the training rows, labelled then unlabelled (and
the ``"disjoint"`` test sets after them, in the order of ``test_operands``); per question the
operand count, the operands, then the operators, as the notebook; a question already taken is
redrawn. Python's ``Random`` gives the same ``randint`` / ``choice`` results on every machine and
version, so a seed names one data set (the tests pin a hash of seed 0's).

Rows are dicts (the JSONL row format, :func:`write_jsonl` / :func:`read_jsonl`):

* ``x`` (text, required): the conditioning text, here the question;
* ``y`` (int or text, required): the answer, here the int value;
* ``z`` (text or null, optional, default null): a worked latent, here the rationale;
* ``n_operands`` (int, optional): the question's operand count (arithmetic only).

Other keys are kept as they are. One JSON object per line, UTF-8; blank lines are skipped.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smclm.errors import ConfigError

OPERATORS = ("+", "-")
QUESTION = "Question: {expr} = ? Answer:"
ANSWER = ". The answer is {y}."
ROW_KEYS = ("x", "y", "z", "n_operands")
MIN_OPERANDS = 2
TEST_SAMPLING = ("paper", "disjoint")


def question(operands: Sequence[int], operators: Sequence[str]) -> str:
    """The question text of ``a op1 b op2 c …``."""
    return QUESTION.format(expr=expression(operands, operators))


def expression(operands: Sequence[int], operators: Sequence[str]) -> str:
    """``"a op1 b op2 c"``, one space around each operator."""
    parts = [str(operands[0])]
    for op, b in zip(operators, operands[1:]):
        parts += [op, str(b)]
    return " ".join(parts)


def rationale(operands: Sequence[int], operators: Sequence[str]) -> tuple[int, str]:
    """(the value, the worked rationale): the left-to-right chain of two-term steps."""
    acc, steps = operands[0], []
    for op, b in zip(operators, operands[1:]):
        new = acc + b if op == "+" else acc - b
        steps.append(f"{acc} {op} {b} = {new}")
        acc = new
    return acc, ", ".join(steps)


def tool_form(z: str) -> str:
    """A rationale with the calculator's numbers removed: ``"6 - 0 = 6, 6 - 4 = 2"`` →
    ``"6 - 0 =, 6 - 4 ="`` (what the policy writes; the tool inserts the rest)."""
    return ", ".join(step.split("=")[0] + "=" for step in z.split(", "))


def answer_text(y: int | str) -> str:
    """The reward's answer text, ``". The answer is N."``."""
    return ANSWER.format(y=y)


def demo_text(row: dict[str, Any]) -> str:
    """A worked example of the reward's k-shot prompt: question, space, rationale, answer text
    (the paper joins k of these with newlines and ends the prompt with one)."""
    if row.get("z") is None:
        raise ConfigError(f"a k-shot example needs a rationale z; this row has none: {row['x']!r}")
    return f"{row['x']} {row['z']}{answer_text(row['y'])}"


def n_distinct(n_operands: int, digits: int = 1) -> int:
    """How many distinct questions with ``n_operands`` operands of up to ``digits`` digits."""
    return (10**digits) ** n_operands * len(OPERATORS) ** (n_operands - 1)


@dataclass
class ArithmeticData:
    """The generated splits: ``labelled`` (x, y, z, n_operands), ``unlabelled`` (z None) and
    ``test`` (operand count → rows, z None)."""

    labelled: list[dict[str, Any]]
    unlabelled: list[dict[str, Any]]
    test: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def splits(self) -> dict[str, list[dict[str, Any]]]:
        """Name → rows: ``train_labelled``, ``train_unlabelled``, ``test_<n>op``."""
        out = {"train_labelled": self.labelled, "train_unlabelled": self.unlabelled}
        out.update({f"test_{n}op": rows for n, rows in self.test.items()})
        return out

    def write(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Each split to ``<folder>/<name>.jsonl``; returns the paths."""
        folder = Path(folder)
        return [write_jsonl(folder / f"{name}.jsonl", rows) for name, rows in self.splits().items()]


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}={value!r}: give an integer ≥ 0")
    return value


def _check_counts(name: str, counts: Any) -> tuple[int, ...]:
    counts = tuple(counts)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < MIN_OPERANDS for n in counts):
        raise ConfigError(f"{name}={list(counts)}: operand counts are integers ≥ {MIN_OPERANDS}")
    if len(set(counts)) != len(counts):
        raise ConfigError(f"{name}={list(counts)}: list each operand count once")
    return counts


def _draw(rng: random.Random, n: int, hi: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    operands = tuple(rng.randint(0, hi) for _ in range(n))
    operators = tuple(rng.choice(OPERATORS) for _ in range(n - 1))
    return operands, operators


def _row(operands: Sequence[int], operators: Sequence[str], worked: bool) -> dict[str, Any]:
    y, z = rationale(operands, operators)
    return {"x": question(operands, operators), "y": y, "z": z if worked else None,
            "n_operands": len(operands)}  # fmt: skip


def generate(
    seed: int = 0,
    n_labelled: int = 50,
    n_unlabelled: int = 1000,
    n_test: int = 500,
    train_operands: Iterable[int] = (3, 4),
    test_operands: Iterable[int] = (3, 4, 5),
    digits: int = 1,
    test_sampling: str = "paper",
) -> ArithmeticData:
    """The paper's data for ``seed`` (module docstring; defaults are the paper's sizes).
    Raises :class:`ConfigError` (one line) for a bad size or more distinct questions than
    exist."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r}: give an integer")
    n_labelled = _check_size("n_labelled", n_labelled)
    n_unlabelled = _check_size("n_unlabelled", n_unlabelled)
    n_test = _check_size("n_test", n_test)
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ConfigError(f"digits={digits!r}: give an integer ≥ 1 (the paper's operands: 1)")
    if test_sampling not in TEST_SAMPLING:
        raise ConfigError(
            f"test_sampling={test_sampling!r}: give one of {', '.join(TEST_SAMPLING)}"
        )
    train_counts = _check_counts("train_operands", train_operands)
    test_counts = _check_counts("test_operands", test_operands)
    n_train = n_labelled + n_unlabelled
    if n_train and not train_counts:
        raise ConfigError(f"train_operands=[]: {n_train} training questions need an operand count")
    capacity = {n: n_distinct(n, digits) for n in train_counts + test_counts}
    if n_train > sum(capacity[n] for n in train_counts):
        raise ConfigError(
            f"n_labelled + n_unlabelled = {n_train}: only "
            f"{sum(capacity[n] for n in train_counts)} distinct questions with "
            f"{train_counts} operands exist; ask for fewer or add operand counts"
        )
    rng, hi = random.Random(seed), 10**digits - 1
    taken: dict[int, set[str]] = {n: set() for n in capacity}  # training questions per count

    def train_row(worked: bool) -> dict[str, Any]:
        n = rng.choice(train_counts)
        if len(taken[n]) == capacity[n]:  # this count is used up: draw among the others
            n = rng.choice([m for m in train_counts if len(taken[m]) < capacity[m]])
        while True:
            operands, operators = _draw(rng, n, hi)
            text = question(operands, operators)
            if text not in taken[n]:
                taken[n].add(text)
                return _row(operands, operators, worked)

    labelled = [train_row(True) for _ in range(n_labelled)]
    unlabelled = [train_row(False) for _ in range(n_unlabelled)]
    test: dict[int, list[dict[str, Any]]] = {}
    for n in test_counts:
        if test_sampling == "paper":  # a fresh stream per set, with replacement, no exclusion
            fresh = random.Random(seed)
            draws = (_draw(fresh, fresh.choice((n,)), hi) for _ in range(n_test))
            test[n] = [_row(operands, operators, False) for operands, operators in draws]
            continue
        excluded = taken[n]  # "disjoint": distinct, none a training question
        available = capacity[n] - len(excluded)
        if n_test > available:
            raise ConfigError(
                f"n_test={n_test}: only {available} distinct {n}-operand questions exist "
                f"outside the training set; ask for at most {available}"
            )
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        while len(rows) < n_test:
            operands, operators = _draw(rng, n, hi)
            text = question(operands, operators)
            if text not in seen and text not in excluded:
                seen.add(text)
                rows.append(_row(operands, operators, False))
        test[n] = rows
    return ArithmeticData(labelled, unlabelled, test)


# -- JSONL ------------------------------------------------------------------------------------
def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` to ``path`` (one JSON object per line, the keys of :data:`ROW_KEYS`
    first), atomically (a temporary file renamed); creates the folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        ordered = {k: row[k] for k in ROW_KEYS if k in row}
        ordered.update({k: v for k, v in row.items() if k not in ordered})
        lines.append(json.dumps(ordered, ensure_ascii=False) + "\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_FORMAT = (
    "each line must be a JSON object with x (text), y (int or text), optional z (text or null) "
    "and optional n_operands (int)"
)


def _check_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: not a JSON object; {_FORMAT}")
    x, y, z = row.get("x"), row.get("y"), row.get("z")
    if not isinstance(x, str) or not x:
        raise ConfigError(f"{where}: x={x!r} is not a non-empty text; {_FORMAT}")
    if isinstance(y, bool) or not isinstance(y, (int, str)):
        raise ConfigError(f"{where}: y={y!r} is not an int or a text; {_FORMAT}")
    if z is not None and not isinstance(z, str):
        raise ConfigError(f"{where}: z={z!r} is not a text or null; {_FORMAT}")
    n = row.get("n_operands")
    if "n_operands" in row and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{where}: n_operands={n!r} is not an integer ≥ 1; {_FORMAT}")
    return {**row, "z": z}


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSONL file in the row format of the module docstring (z set to None where
    absent). Raises :class:`ConfigError` naming the file and line of the first bad row."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give a JSONL file ({_FORMAT})")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg}); {_FORMAT}") from None
            rows.append(_check_row(obj, where))
    return rows
