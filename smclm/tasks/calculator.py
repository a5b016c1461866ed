"""The calculator tool of the integer-arithmetic experiment (Hu et al., ICLR 2024, §4.4;
``../shared/docs/gfn-paper-spec.md`` §4.2), as pure text functions.

``task=latent task.calculator=true`` runs it inside the sampler (:class:`CalculatorTool`):
whenever the policy emits a trigger token (:func:`is_trigger`) the returned text is appended to
the context: it is not an action of the policy and is not counted in log q.

The rule, as the paper's code (``utils.py`` ``generate``) applies it to the decoded state:

1. the expression is the text after the last ``"Answer:"``, then after the last ``","``, then
   after the last ``"."``, then before the first ``"="`` (:func:`expression_before_equals`);
   so in ``"Answer: 6 - 0 = 6, 6 - 4 ="`` it is ``" 6 - 4 "``;
2. with a limit of k terms (the paper's ``limit_capability``, 2 in its runs) an expression of at
   most k operands is kept; a longer one is cut as the paper's ``get_limited_expr`` cuts it
   (:func:`limit_terms`): to its last k − 1 operands, each with the text before it. For k = 2
   that is the last operand with its sign: ``"6 - 0 - 4"`` → ``" - 4"`` → −4, ``"3 + 4 + 5"`` →
   5. The paper calls this a two-term calculator; in effect longer calls silently give wrong
   numbers, which pushes the policy to one step per call. ``over_limit="refuse"`` inserts
   nothing instead. Operands are found as the paper finds them, by the pattern ``-?[0-9]+`` (a
   minus sign directly before a digit belongs to the operand);
3. the value is appended as ``" " + str(value)``; when the expression cannot be evaluated
   nothing is appended.

One deliberate difference: the paper's code calls Python's ``eval`` on model output. Here
:func:`evaluate` is a small integer parser that accepts exactly the Python expressions made of
decimal integer literals, ``+``, ``-`` (binary and unary) and spaces/tabs, with Python's result
(so leading zeros such as ``"07"`` are refused, as Python refuses them). Anything else (``*``,
parentheses, letters, an empty span) is refused: the paper would evaluate such text, but under
its vocabulary restriction (tokens made of ``,.0-9=+-`` and spaces) the span can only contain
digits, spaces, ``+`` and ``-``, where both agree. The functions never raise on model output:
junk gives ``None`` (no insertion). Only a bad setting (``max_terms``, ``over_limit``) raises
:class:`smclm.errors.ConfigError`.
"""

from __future__ import annotations

import re
from typing import Any

from smclm.errors import ConfigError

TRIGGERS = ("=", " =")  # the token texts that call the tool (the paper: " =" and "=")
OVER_LIMIT = ("paper", "refuse")
_OPERAND = re.compile(r"-?[0-9]+")  # the paper's operand pattern (get_limited_expr)
_LEXEME = re.compile(r"[0-9]+|[+-]|[ \t]+")


def is_trigger(piece: str) -> bool:
    """Whether a generated token's text calls the calculator (exactly "=" or " =")."""
    return piece in TRIGGERS


def check_limit(max_terms: int | None, over_limit: str = "paper") -> None:
    """Raise :class:`ConfigError` unless ``max_terms`` is None (no limit) or an int ≥ 2 and
    ``over_limit`` is one of :data:`OVER_LIMIT`."""
    if max_terms is not None and (
        isinstance(max_terms, bool) or not isinstance(max_terms, int) or max_terms < 2
    ):
        raise ConfigError(
            f"max_terms={max_terms!r}: give null (no limit) or an integer ≥ 2 "
            "(the paper's calculator uses 2)"
        )
    if over_limit not in OVER_LIMIT:
        raise ConfigError(f"over_limit={over_limit!r}: give one of {', '.join(OVER_LIMIT)}")


def expression_before_equals(text: str) -> str:
    """The span the paper evaluates: after the last "Answer:", the last ",", the last ".",
    then before the first "=" (rule 1 of the module docstring)."""
    span = text.split("Answer:")[-1].split(",")[-1].split(".")[-1]
    return span.split("=")[0]


def limit_terms(expr: str, max_terms: int | None, over_limit: str = "paper") -> str | None:
    """``expr`` cut to the paper's term limit (rule 2): unchanged when it has at most
    ``max_terms`` operands (or no limit); else its last ``max_terms`` − 1 operands each with
    the text before it (``over_limit="paper"``) or None (``"refuse"``)."""
    check_limit(max_terms, over_limit)
    if max_terms is None:
        return expr
    operands = list(_OPERAND.finditer(expr))
    if len(operands) <= max_terms:
        return expr
    if over_limit == "refuse":
        return None
    start = operands[-max_terms].end()  # the text before the (k − 1)-th last operand ...
    return expr[start : operands[-1].end()]  # ... through the last operand


def evaluate(expr: str) -> int | None:
    """The integer value of ``expr`` if it is a Python expression of decimal integer literals,
    binary and unary + and -, spaces and tabs (Python's value); else None. Never raises."""
    if not isinstance(expr, str):
        return None
    lexemes = _LEXEME.findall(expr)
    if "".join(lexemes) != expr:
        return None  # a character outside digits, + - and blanks
    total, sign, op, expect_operand = 0, 1, 1, True
    for lex in lexemes:
        if lex[0] in " \t":
            continue
        if lex in "+-":
            if expect_operand:  # a unary sign
                sign = -sign if lex == "-" else sign
            else:  # a binary operator
                op, sign, expect_operand = (1 if lex == "+" else -1), 1, True
            continue
        if not expect_operand:  # two literals in a row ("3 4")
            return None
        if len(lex) > 1 and lex[0] == "0" and lex.strip("0"):
            return None  # Python refuses leading zeros ("07"); "00" is allowed
        try:
            total += op * sign * int(lex)
        except ValueError:  # a literal beyond Python's int-string limit
            return None
        expect_operand = False
    return None if expect_operand else total


def calculator(text: str, max_terms: int | None = None, over_limit: str = "paper") -> str | None:
    """The text to append after ``text`` (the decoded context so far, which ends in "="):
    ``" " + str(value)`` of the expression before that "=" (module docstring), or None when
    ``text`` does not end in "=" or the expression cannot be evaluated. Never raises on model
    output; raises :class:`ConfigError` for a bad ``max_terms`` / ``over_limit``."""
    check_limit(max_terms, over_limit)
    if not isinstance(text, str) or not text.endswith("="):
        return None
    expr = limit_terms(expression_before_equals(text), max_terms, over_limit)
    value = None if expr is None else evaluate(expr)
    if value is None:
        return None
    try:
        return f" {value}"
    except ValueError:  # a value beyond Python's int-string limit
        return None


def run_with_calculator(
    context: str,
    pieces: list[str],
    max_terms: int | None = None,
    over_limit: str = "paper",
) -> tuple[str, list[str | None]]:
    """Replay generated token texts ``pieces`` after ``context`` with the tool, as the sampler
    will: each piece is appended; after a trigger piece (:func:`is_trigger`) the calculator's
    text is appended too. Returns (the full text, the insertion after each piece: None where
    there was none)."""
    check_limit(max_terms, over_limit)
    text, inserted = context, []
    for piece in pieces:
        text += piece
        extra = calculator(text, max_terms, over_limit) if is_trigger(piece) else None
        if extra is not None:
            text += extra
        inserted.append(extra)
    return text, inserted


class CalculatorTool:
    """The calculator inside the sampler, over token ids (:func:`calculator` on the decoded text).

    The tool changes the base process, not the policy: whenever a generated token's text is a
    trigger (:func:`is_trigger`), the tokens of the calculator's text (``" " + value``) follow
    it as *forced* steps, whose next-token distribution is one-hot, for p₀ and for every proposal
    alike. So log p₀ and log q of a forced token are both 0 (tool tokens are in the context, not
    in log q, and not in p₀'s probability of the policy's actions), while the twist is read after
    them as after any token. :class:`smclm.models.twisted_lm.TwistedLM` applies it everywhere a
    next-token distribution is made, incrementally while sampling and by :meth:`forced_targets`
    in teacher-forced passes, so the learners and evaluators need no flag.

    Rules: the expression is read from the *generated* text alone (the policy's prompt ends in
    "Answer:", after which the paper's rule reads anyway); an insertion is made only if it ends
    at least one step before the length cap ``cap`` (T, the stop counted), so the stop still
    fits; a failed evaluation inserts nothing. Tool tokens count towards T (the paper does not
    count them in its ``max_len``; give a larger ``task.output_len`` to compensate).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        cap: int,
        max_terms: int | None = 2,
        over_limit: str = "paper",
    ) -> None:
        check_limit(max_terms, over_limit)
        self.tokenizer, self.cap = tokenizer, int(cap)
        self.max_terms, self.over_limit = max_terms, over_limit
        n = min(int(vocab_size), len(tokenizer))
        self.trigger_ids = tuple(
            i for i in range(n) if is_trigger(tokenizer.decode([i], skip_special_tokens=False))
        )
        if not self.trigger_ids:
            raise ConfigError(
                "task.calculator=true: the tokenizer has no token whose text is '=' or ' =', so "
                "the tool could never be called; set task.calculator=false"
            )
        self._memo: dict[tuple[int, ...], tuple[int, ...]] = {}

    def insertion(self, generated: list[int]) -> tuple[int, ...]:
        """The tool's token ids after ``generated`` (the output so far, ending in a trigger):
        the calculator's text tokenised alone; () when it cannot evaluate."""
        key = tuple(generated)
        hit = self._memo.get(key)
        if hit is None:
            text = self.tokenizer.decode(list(generated), skip_special_tokens=False)
            extra = calculator(text, self.max_terms, self.over_limit)
            ids = () if extra is None else self.tokenizer(extra, add_special_tokens=False)
            hit = () if extra is None else tuple(int(i) for i in ids["input_ids"])
            if len(self._memo) > 100_000:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def fits(self, t: int, n_tokens: int) -> bool:
        """Whether an insertion of n_tokens after the trigger at step t (1-based) ends before T."""
        return 0 < n_tokens and t + n_tokens <= self.cap - 1

    def forced_targets(self, tokens: Any) -> Any:
        """[N, L] long: at each step the token the tool forces there, −1 where the policy acts,
        from each row's prefix alone (teacher forcing; tokens [N, L]). A row whose token differs
        from the forced one has probability 0 under the tool's p₀ (one-hot on the target)."""
        import torch

        rows = tokens.tolist()
        out = torch.full(tokens.shape, -1, dtype=torch.long)
        triggers = set(self.trigger_ids)
        for n, row in enumerate(rows):
            queue: list[int] = []
            for i, tok in enumerate(row):
                if queue:
                    out[n, i] = queue.pop(0)
                    continue
                if tok in triggers:
                    ins = self.insertion(row[: i + 1])
                    if self.fits(i + 1, len(ins)):
                        queue = list(ins)
        return out.to(tokens.device)

    def complete(self, actions: list[list[int]]) -> list[int]:
        """A sequence as the sampler makes it from the policy's action pieces (token lists;
        each piece after the first starts a new token, so a trigger ending one piece stays a
        token of its own): the tool's tokens inserted after each trigger that fits."""
        out: list[int] = []
        triggers = set(self.trigger_ids)
        for piece in actions:
            for tok in piece:
                out.append(int(tok))
                if tok in triggers:
                    ins = self.insertion(out)
                    if self.fits(len(out), len(ins)):
                        out.extend(ins)
        return out
