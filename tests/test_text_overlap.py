"""BLEU-4 (NLTK's sentence_bleu, smoothing method1) and GLEU (sentence_gleu, n = 1-4) on
examples whose n-gram counts are worked out by hand in each comment."""

import math

import pytest

from smclm.evaluators.text_overlap import sentence_bleu4, sentence_gleu

REF = "the cat sat on the mat".split()


def test_identical_sentences_score_one():
    assert sentence_bleu4(REF, REF) == pytest.approx(1.0)
    assert sentence_gleu(REF, REF) == pytest.approx(1.0)


def test_one_word_changed():
    hyp = "the cat sat on a mat".split()
    # matches / totals: unigrams 5/6, bigrams 3/5, trigrams 2/4, 4-grams 1/3; c = r: BP = 1
    want = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert sentence_bleu4(REF, hyp) == pytest.approx(want)
    # pooled n-grams: 11 matches of 18 hypothesis and 18 reference n-grams
    assert sentence_gleu(REF, hyp) == pytest.approx(11 / 18)


def test_smoothing_of_orders_without_a_match():
    ref, hyp = "a b c d".split(), "a b d c".split()
    # unigrams 4/4, bigrams 1/3, trigrams 0/2 -> 0.1/2, 4-grams 0/1 -> 0.1/1
    want = (1 * (1 / 3) * 0.05 * 0.1) ** 0.25
    assert sentence_bleu4(ref, hyp) == pytest.approx(want)
    assert sentence_gleu(ref, hyp) == pytest.approx(5 / 10)  # 4 + 1 matches; 10 n-grams each


def test_brevity_penalty_and_short_hypotheses():
    ref, hyp = "a b c d e f".split(), "a b".split()
    # unigrams 2/2, bigrams 1/1, no trigrams or 4-grams: 0.1/1 each; BP = exp(1 - 6/2)
    want = math.exp(-2) * (1 * 1 * 0.1 * 0.1) ** 0.25
    assert sentence_bleu4(ref, hyp) == pytest.approx(want)
    # 3 matches (a, b, a b) of 3 hypothesis and 6 + 5 + 4 + 3 = 18 reference n-grams
    assert sentence_gleu(ref, hyp) == pytest.approx(3 / 18)


def test_no_overlap_and_empty_hypotheses_score_zero():
    assert sentence_bleu4(REF, "dog ran".split()) == 0.0
    assert sentence_bleu4(REF, []) == 0.0
    assert sentence_gleu(REF, []) == 0.0
