"""Sentence-level BLEU-4 and GLEU of one hypothesis against one reference, as NLTK defines them
(``nltk.translate.bleu_score.sentence_bleu`` with ``SmoothingFunction().method1`` and
``nltk.translate.gleu_score.sentence_gleu``, n = 1–4), which the GFlowNet paper's infilling
evaluation uses (``../shared/docs/gfn-paper-spec.md`` §2.4). Written from those definitions; NLTK
is not a dependency. Inputs are token lists (the paper: whitespace-split words).

BLEU-4: p_n = Σ_g min(c_hyp(g), c_ref(g)) / max(1, Σ_g c_hyp(g)) over the n-grams g of the
hypothesis; 0 when no unigram matches; a p_n whose numerator is 0 becomes ε / denominator with
ε = 0.1 (method1); brevity penalty BP = 1 if c > r else exp(1 − r / c) (0 for an empty
hypothesis); BLEU = BP · exp(Σ_n ¼ log p_n).

GLEU: with all n-grams of orders 1–4 pooled, matches m = Σ min(c_hyp, c_ref), GLEU =
min(m / #hyp n-grams, m / #ref n-grams), 0 when either has none.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

EPSILON = 0.1  # NLTK's SmoothingFunction().method1


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu4(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """BLEU-4 of ``hypothesis`` against one ``reference`` (module docstring)."""
    log_p = 0.0
    for n in range(1, 5):
        hyp, ref = ngrams(hypothesis, n), ngrams(reference, n)
        matches = sum(min(c, ref[g]) for g, c in hyp.items())
        total = max(1, sum(hyp.values()))
        if n == 1 and matches == 0:
            return 0.0
        p = matches / total if matches else EPSILON / total
        log_p += 0.25 * math.log(p)
    c, r = len(hypothesis), len(reference)
    if c == 0:
        return 0.0
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


def sentence_gleu(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """GLEU (n = 1–4) of ``hypothesis`` against one ``reference`` (module docstring)."""
    hyp: Counter = Counter()
    ref: Counter = Counter()
    for n in range(1, 5):
        hyp.update(ngrams(hypothesis, n))
        ref.update(ngrams(reference, n))
    n_hyp, n_ref = sum(hyp.values()), sum(ref.values())
    if n_hyp == 0 or n_ref == 0:
        return 0.0
    matches = sum(min(c, ref[g]) for g, c in hyp.items())
    return min(matches / n_hyp, matches / n_ref)
