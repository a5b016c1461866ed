"""An example text potential: how many words of a continuation rhyme with "cat".

``rhyme_score`` is a plain function from decoded texts to numbers, used by smclm's text-scorer
task (configs/task/rhymes.yaml names it by ``_target_``). Each score is in (0, 1]:

    score(text) = (1 + #words ending in ``suffix``) / (1 + #words)

so log φ = β·log score ≤ 0, and ``score_max: 1.0`` lets smclm draw exact target samples by
rejection. Nothing here imports smclm: a potential only has to map texts to numbers.
"""

from __future__ import annotations


def rhyme_score(texts: list[str], suffix: str = "at") -> list[float]:
    """(1 + #words ending in suffix) / (1 + #words) for each text."""
    out = []
    for text in texts:
        words = text.split()
        hits = sum(w.endswith(suffix) for w in words)
        out.append((1 + hits) / (1 + len(words)))
    return out
