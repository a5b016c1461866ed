"""Text scorers that ship with smclm, for ``task=text_scorer`` (no download, no model).

A scorer is a plain function from N decoded texts to N numbers; a config names it by
``_target_`` with ``_partial_: true`` (see configs/task/text_scorer.yaml), e.g.

    task.scorer={_target_: smclm.tasks.scorers.word_count, _partial_: true, words: [red, blue]}

``word_count`` counts whole-word, case-insensitive occurrences of listed words. With
``task.form=indicator`` and ``task.threshold=0.5`` the potential is log(1[the text contains a
listed word] + ε), a threshold target in the style of the paper's Figure 3 whose exact samples come
from rejection sampling from p₀ (configs/experiment/word_threshold.yaml).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

# The built-in list: common negative and insulting English words, a classifier-free stand-in for
# "the continuation is unkind". It is a word list, not a toxicity classifier: it misses anything
# not listed and counts a listed word in any context ("not bad" counts "bad").
NEGATIVE_WORDS: tuple[str, ...] = (
    "angry",
    "awful",
    "bad",
    "cruel",
    "dumb",
    "evil",
    "hate",
    "hated",
    "hates",
    "horrible",
    "idiot",
    "nasty",
    "rude",
    "stupid",
    "terrible",
    "ugly",
    "wicked",
)


@lru_cache(maxsize=64)
def _pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # longest first, so that a listed phrase wins over a listed word it starts with
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    # whole words: no letter, digit or underscore on either side (\b, made explicit so that a
    # listed word that starts or ends with punctuation still needs a boundary)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def _word_tuple(words: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(words, str):  # one word given alone, or "a,b,c" from the command line
        words = words.split(",")
    out = tuple(str(w).strip() for w in words)
    out = tuple(w for w in out if w)
    if not out:
        raise ValueError("task.scorer.words is empty; give at least one word")
    return out


def word_count(texts: Sequence[str], words: str | Iterable[str] = NEGATIVE_WORDS) -> list[int]:
    """For each text, how many times words of ``words`` occur in it as whole words, ignoring case.

    ``words`` is a list of words (or phrases), or one comma-separated string; default
    :data:`NEGATIVE_WORDS`. "Bad, BAD dog" has 2 occurrences of "bad"; "badly" and "bad_dog" none.
    Occurrences do not overlap.
    """
    pattern = _pattern(_word_tuple(words))
    return [len(pattern.findall(text)) for text in texts]
