"""Integer arithmetic with a calculator (issue 24; Hu et al. §4.4, spec §4): the seeded data
generator, the JSONL row format, the calculator tool and the majority-vote evaluator. Pure
Python, no model. Answers and rationales are checked with Python's own ``eval`` on the question
text, not through the generator's code."""

import hashlib
import json
import random
import re
from collections import Counter

import pytest

from smclm.errors import ConfigError
from smclm.evaluators.arithmetic import (
    PAPER_MISSING,
    accuracy_by_operands,
    extract_answer,
    majority_vote,
    vote,
)
from smclm.tasks.arithmetic_data import (
    ArithmeticData,
    demo_text,
    generate,
    read_jsonl,
    tool_form,
    write_jsonl,
)
from smclm.tasks.calculator import (
    calculator,
    evaluate,
    expression_before_equals,
    limit_terms,
    run_with_calculator,
)

# sha256 of seed 0's default data (the canonical JSON of ArithmeticData.splits()): a seed names
# one data set on every machine; this changes only if the generator's draws change.
SEED0_SHA256 = "5cfffcc37f7ae77f844114154746398b0ba1c58fc4c180b5064e1b066db79bd7"


@pytest.fixture(scope="module")
def data() -> ArithmeticData:
    return generate()


def fingerprint(d: ArithmeticData) -> str:
    return hashlib.sha256(json.dumps(d.splits(), sort_keys=True).encode()).hexdigest()


def expr_of(x: str) -> str:
    m = re.fullmatch(r"Question: (.+) = \? Answer:", x)
    assert m, x
    return m.group(1)


def all_rows(d: ArithmeticData):
    return d.labelled + d.unlabelled + [r for rows in d.test.values() for r in rows]


# -- the generator -----------------------------------------------------------------------------
def test_deterministic_per_seed_and_differs_across_seeds(data):
    assert fingerprint(generate()) == fingerprint(data) == SEED0_SHA256
    other = generate(seed=1)
    assert [r["x"] for r in other.labelled] != [r["x"] for r in data.labelled]
    for n in (3, 4, 5):
        assert [r["x"] for r in other.test[n]] != [r["x"] for r in data.test[n]]
    assert fingerprint(generate(seed=1, test_sampling="disjoint")) != fingerprint(
        generate(seed=0, test_sampling="disjoint")
    )


def test_seed0_is_the_papers_shipped_data(data):
    """Rows copied by hand from GFNOrg/gfn-lm-tuning @ 8604cff ``infill_subj_arithmetic/data/
    arithmetic_with_tool/`` (train_50 and the 3/4/5-operand test files)."""
    first, last = data.labelled[0], data.labelled[-1]
    assert first["x"] == "Question: 6 - 0 - 4 - 8 = ? Answer:" and first["y"] == -6
    assert tool_form(first["z"]) == "6 - 0 =, 6 - 4 =, 2 - 8 ="
    assert last["x"] == "Question: 6 - 8 - 8 = ? Answer:" and last["y"] == -10
    assert tool_form(last["z"]) == "6 - 8 =, -2 - 8 ="
    assert Counter(r["n_operands"] for r in data.labelled) == {3: 27, 4: 23}
    assert data.unlabelled[0]["x"] == "Question: 9 - 3 + 6 - 1 = ? Answer:"
    ends = {
        3: ("6 - 0 - 4", "9 - 3 + 1"),
        4: ("6 - 0 - 4 - 8", "7 + 4 + 3 - 8"),
        5: ("6 - 0 - 4 - 8 - 7", "6 - 6 - 0 + 2 + 9"),
    }
    for n, (head, tail) in ends.items():
        assert expr_of(data.test[n][0]["x"]) == head
        assert expr_of(data.test[n][-1]["x"]) == tail
    assert len({r["x"] for r in data.test[3]}) == 474  # the paper's file repeats 26 questions


def test_default_sizes(data):
    assert len(data.labelled) == 50 and len(data.unlabelled) == 1000
    assert sorted(data.test) == [3, 4, 5]
    assert all(len(rows) == 500 for rows in data.test.values())
    assert all(r["z"] is not None for r in data.labelled)
    assert all(r["z"] is None for r in data.unlabelled)
    assert {r["n_operands"] for r in data.labelled + data.unlabelled} == {3, 4}
    for n, rows in data.test.items():
        assert {r["n_operands"] for r in rows} == {n}
        assert all(r["z"] is None for r in rows)
    small = generate(n_labelled=7, n_unlabelled=11, n_test=13, test_operands=(2, 6))
    assert (len(small.labelled), len(small.unlabelled)) == (7, 11)
    assert {n: len(rows) for n, rows in small.test.items()} == {2: 13, 6: 13}


def test_training_distinct_and_five_operand_test_disjoint(data):
    train = [r["x"] for r in data.labelled + data.unlabelled]
    assert len(set(train)) == len(train)
    assert not {r["x"] for r in data.test[5]} & set(train)
    d = generate(seed=3, test_sampling="disjoint")
    train = {r["x"] for r in d.labelled + d.unlabelled}
    for rows in d.test.values():
        xs = [r["x"] for r in rows]
        assert len(set(xs)) == len(xs) and not set(xs) & train


@pytest.mark.parametrize("kwargs", [{}, {"seed": 5, "digits": 2, "test_sampling": "disjoint"}])
def test_answers_and_rationales_are_correct(data, kwargs):
    d = data if not kwargs else generate(n_unlabelled=200, n_test=100, **kwargs)
    for row in all_rows(d):
        expr = expr_of(row["x"])
        terms = expr.split(" ")  # a, op, b, op, c, ...
        assert eval(expr) == row["y"], row  # Python's arithmetic, not the generator's
        assert row["n_operands"] == len(terms[::2])
        assert set(terms[1::2]) <= {"+", "-"}
        assert all(t.isdigit() and int(t) < 10 ** kwargs.get("digits", 1) for t in terms[::2])
        if row["z"] is None:
            continue
        steps = row["z"].split(", ")
        assert len(steps) == row["n_operands"] - 1
        acc = terms[0]
        for i, step in enumerate(steps):
            lhs, rhs = step.split(" = ")
            assert lhs == f"{acc} {terms[2 * i + 1]} {terms[2 * i + 2]}", (row, step)
            assert eval(lhs) == int(rhs)
            acc = rhs
        assert int(acc) == row["y"]
        assert demo_text(row) == f"{row['x']} {row['z']}. The answer is {row['y']}."


def test_exhausting_operand_counts_stays_distinct():
    d = generate(n_labelled=0, n_unlabelled=4200, n_test=0, train_operands=(2, 3))
    by_n = Counter(r["n_operands"] for r in d.unlabelled)
    assert by_n == {2: 200, 3: 4000}  # every 2- and 3-operand question exactly once
    assert len({r["x"] for r in d.unlabelled}) == 4200


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n_test": 3600, "test_sampling": "disjoint"}, "n_test=3600"),
        ({"n_labelled": 0, "n_unlabelled": 201, "train_operands": (2,)}, "only 200"),
        ({"n_test": -1}, "n_test=-1"),
        ({"n_labelled": 2.5}, "n_labelled=2.5"),
        ({"train_operands": (1, 3)}, "train_operands"),
        ({"test_operands": (5, 5)}, "once"),
        ({"test_sampling": "random"}, "test_sampling"),
        ({"digits": 0}, "digits=0"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_bad_sizes_are_one_line_config_errors(kwargs, words):
    with pytest.raises(ConfigError) as e:
        generate(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


# -- JSONL ---------------------------------------------------------------------------------------
def test_jsonl_round_trip(tmp_path, data):
    rows = data.labelled[:5] + data.unlabelled[:5] + data.test[5][:5]
    path = write_jsonl(tmp_path / "sub" / "rows.jsonl", rows)
    assert read_jsonl(path) == rows
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert list(first) == ["x", "y", "z", "n_operands"]
    paths = data.write(tmp_path / "all")
    assert sorted(p.name for p in paths) == sorted(
        ["train_labelled.jsonl", "train_unlabelled.jsonl"]
        + [f"test_{n}op.jsonl" for n in (3, 4, 5)]
    )
    assert read_jsonl(tmp_path / "all" / "test_4op.jsonl") == data.test[4]


def test_jsonl_reads_user_rows_and_names_bad_lines(tmp_path):
    good = tmp_path / "user.jsonl"
    good.write_text(
        '{"x": "Once upon a time", "y": "they lived.", "id": 7}\n\n{"x": "q", "y": -3}\n'
    )
    assert read_jsonl(good) == [
        {"x": "Once upon a time", "y": "they lived.", "id": 7, "z": None},
        {"x": "q", "y": -3, "z": None},
    ]
    bad_lines = ['{"x": "", "y": 1}', '{"x": "q"}', '{"x": "q", "y": true}', "[1, 2]", "{oops",
                 '{"x": "q", "y": 1, "z": 5}', '{"x": "q", "y": 1, "n_operands": 0}']  # fmt: skip
    for i, line in enumerate(bad_lines):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text('{"x": "fine", "y": 1}\n' + line + "\n")
        with pytest.raises(ConfigError, match=rf"bad{i}\.jsonl:2: "):
            read_jsonl(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


# -- the calculator ------------------------------------------------------------------------------
def pieces(text: str) -> list[str]:
    """Word-level 'tokens' with their leading space: '6 - 0 =,' -> '6', ' -', ' 0', ' =', ','."""
    return re.findall(r" ?(?:[0-9]+|[^0-9 ])", text)


@pytest.mark.parametrize("max_terms", [None, 2])
def test_calculator_fills_in_every_rationale(data, max_terms):
    for row in data.labelled:
        written = pieces(" " + tool_form(row["z"]))
        assert "".join(written) == " " + tool_form(row["z"])
        full, inserted = run_with_calculator(row["x"], written, max_terms=max_terms)
        assert full == f"{row['x']} {row['z']}"  # the tool supplied every partial result
        assert sum(i is not None for i in inserted) == row["n_operands"] - 1
        assert all((i is not None) == (p == " =") for p, i in zip(written, inserted))


def test_calculator_span_and_values():
    assert expression_before_equals("Question: 3 + 4 = ? Answer: 3 + 4 = 7, 7 - 2 =") == " 7 - 2 "
    assert calculator("Question: 9 - 3 - 4 = ? Answer: 9 - 3 =") == " 6"
    assert calculator("Answer: 5 - 9 = -4, -4 - 3 =") == " -7"
    assert calculator("Answer: 2 - 8 = -6. 1 - 9 =") == " -8"  # after the last "."
    assert calculator("Answer: 3 + 4 = 7 =") == " 7"  # before the first "=" of the segment
    assert calculator("Answer: 12 + 30=") == " 42"
    assert calculator("3 - - 4 =") == " 7" and calculator("- 3 + + 4 =") == " 1"
    assert calculator("Answer: 3 + 4") is None  # no "=" at the end: no call


def test_two_term_limit():
    text = "Question: 6 - 0 - 4 = ? Answer: 6 - 0 - 4 ="
    assert calculator(text) == " 2"
    assert calculator(text, max_terms=2) == " -4"  # the paper's code: the last operand, signed
    assert calculator(text, max_terms=2, over_limit="refuse") is None
    assert calculator(text, max_terms=3) == " 2"
    assert calculator("Answer: 3 + 4 + 5 =", max_terms=2) == " 5"
    assert calculator("Answer: 9 - 3 -4 =", max_terms=2) == " -4"  # "-4" is one operand
    assert calculator("Answer: -4 - 3 =", max_terms=2) == " -7"  # two terms: exact
    assert calculator("Answer: 1 + 2 + 3 + 4 =", max_terms=3) == " 7"  # last k-1 = 2 operands
    assert limit_terms(" 3 * 4 + 5 ", 2) == " + 5"  # cut first, as the paper, then evaluated
    for bad in ({"max_terms": 1}, {"max_terms": 2.0}, {"over_limit": "clip"}):
        with pytest.raises(ConfigError):
            calculator("1 + 1 =", **bad)


JUNK = ["", "=", " =", "Answer: =", "abc =", "3 * 4 =", "(3) =", "3 4 =", "07 + 1 =", "3 + =",
        "3 +\n4 =", "١ + ٢ =", "9" * 5000 + " + 1 =", "Answer:", None, 17, "+ =", "3 - =", "0x1 ="]  # fmt: skip


def test_calculator_refuses_junk_without_raising():
    for text in JUNK:
        assert calculator(text) is None, text
        assert calculator(text, max_terms=2) is None, text


def test_evaluate_agrees_with_python_eval_on_random_strings():
    rng = random.Random(0)
    alphabet = "0123456789+-  \t"
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
        try:
            want = eval(s)  # Python's own answer, the paper's evaluator
        except SyntaxError:
            want = None
        assert evaluate(s) == want, repr(s)
    for _ in range(1000):  # anything else never raises
        s = "".join(rng.choice("0123456789+-=,. Answer:x*()") for _ in range(rng.randint(0, 30)))
        out = calculator(s + "=", max_terms=rng.choice([None, 2]))
        assert out is None or re.fullmatch(r" -?[0-9]+", out), (s, out)


# -- the evaluator -------------------------------------------------------------------------------
def test_extract_answer_as_the_paper():
    q = "Question: 3 + 4 - 2 = ? Answer:"
    assert extract_answer(q + " 3 + 4 = 7, 7 - 2 = 5") == 5
    assert extract_answer(q + " 3 + 4 = 7, 7 - 9 = -2.") == -2
    assert extract_answer(q + " 3 + 4 = 7, 7 - 2 = 5 .") == 5
    assert extract_answer(q + " 7 - 2 = 5. The answer is 5") == 5  # last-word fallback
    assert extract_answer(q + " 5") == 5  # no "=" in the rationale: the last word
    assert extract_answer(q + " 2 = 5, so") is None
    assert extract_answer(q) is None  # "Answer:" is no number
    assert extract_answer(q, missing=PAPER_MISSING) == -1
    assert extract_answer("") is None and extract_answer(None) is None


def test_majority_vote_ties_and_missing():
    assert majority_vote([3, 5, 3]) == 3
    assert majority_vote([5, 3, 3, 5]) == 5  # tie: the first to appear
    assert majority_vote([-2, 7, 7, -2, 1]) == -2
    assert majority_vote([None, 4, None, 4]) is None  # unreadable samples vote too
    assert majority_vote([]) is None
    rng = random.Random(1)
    for _ in range(500):  # the paper's Counter(...).most_common(1), independently
        answers = [rng.choice([None, -1, 0, 1, 2]) for _ in range(rng.randint(1, 10))]
        assert majority_vote(answers) == Counter(answers).most_common(1)[0][0]
    q = "Question: 1 - 2 = ? Answer: 1 - 2 ="
    assert vote([q + " -1", q + " 3", q + " -1", "junk"]) == -1


def test_accuracy_per_operand_count():
    rows = [
        {"x": "Question: 1 + 2 + 3 = ? Answer:", "y": 6, "n_operands": 3},
        {"x": "Question: 1 - 2 + 0 = ? Answer:", "y": "-1", "n_operands": 3},
        {"x": "Question: 9 - 9 - 9 - 9 - 9 = ? Answer:", "y": -27, "n_operands": 5},
        {"x": "free text", "y": 4},
    ]
    samples = [
        ["= 6", "= 6", "= 5"],  # right by majority
        ["junk", "nothing", "= -1"],  # majority unreadable: wrong (the paper's -1 would match)
        ["= -27", "= -26", "= -25", "= -26"],  # the majority -26 is wrong
        ["= 4"],
    ]
    out = accuracy_by_operands(rows, samples)
    assert out == {"arith/acc_3op": 0.5, "arith/n_3op": 2, "arith/acc_5op": 0.0,
                   "arith/n_5op": 1, "arith/acc": 0.5, "arith/n": 4}  # fmt: skip
    paper = accuracy_by_operands(rows, samples, missing=PAPER_MISSING)
    assert paper["arith/acc_3op"] == 1.0 and paper["arith/acc"] == 0.75
    with pytest.raises(ConfigError):
        accuracy_by_operands(rows, samples[:2])
    with pytest.raises(ConfigError):
        accuracy_by_operands([{"x": "q", "y": "seven"}], [["= 7"]])
