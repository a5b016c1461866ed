"""BERTScore F1 (smclm/evaluators/bertscore.py) against greedy matching computed here, token by
token, from the encoder's own hidden states, on a tiny random BERT (no download)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_bert_encoder

from smclm.errors import ConfigError
from smclm.evaluators.bertscore import BertScorer

PAIRS = [
    ("the cat sat on the mat", "the dog sat on a mat"),
    ("a red sun", "the big red sun sat"),
    ("dog", "the dog ran and the cat ran"),
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("sun sun sun", "the mat"),
]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_bert_encoder(tmp_path_factory.mktemp("bert") / "enc")


def greedy_f1(encoder_dir, layer, cand, ref):
    """P, R, F by the definition: cosine of every token pair, one text at a time, special tokens
    matched but not averaged over."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(encoder_dir)
    model = AutoModel.from_pretrained(encoder_dir).eval()

    def states(text):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        return ids, h[layer][0]

    special = {tok.cls_token_id, tok.sep_token_id}
    (ci, ch), (ri, rh) = states(cand), states(ref)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    def side(ids, h, other):
        best = [max(cos(h[i], other[j]) for j in range(len(other))) for i in range(len(ids))]
        kept = [b for b, t in zip(best, ids) if t not in special]
        return sum(kept) / len(kept)

    p, r = side(ci, ch, rh), side(ri, rh, ch)
    return p, r, 2 * p * r / (p + r)


@pytest.mark.parametrize("layer", [0, 2])
def test_bertscore_is_greedy_cosine_matching_of_the_chosen_layer(encoder_dir, layer):
    """All pairs scored in one padded batch agree with the one-at-a-time definition (1e-5), at
    the layer asked for; and the two layers differ by more than 10× that (the layer is used)."""
    scorer = BertScorer(encoder_dir, layer=layer, baseline=None)
    got = scorer.f1([c for c, _ in PAIRS], [r for _, r in PAIRS])
    for (cand, ref), f in zip(PAIRS, got):
        want = greedy_f1(encoder_dir, layer, cand, ref)[2]
        assert abs(f - want) < 1e-5, (cand, ref, f, want)
    other = BertScorer(encoder_dir, layer=2 - layer, baseline=None)
    assert max(abs(a - b) for a, b in zip(got, other.f1([c for c, _ in PAIRS],
                                                        [r for _, r in PAIRS]))) > 1e-4  # fmt: skip
    assert abs(got[3] - 1.0) < 1e-6  # identical texts


def test_rescaling_and_empty_candidates(encoder_dir):
    """baseline b: F' = (F − b)/(1 − b); an empty candidate has F = 0 (so F' = −b/(1 − b))."""
    raw = BertScorer(encoder_dir, layer=2, baseline=None)
    b = 0.4
    scaled = BertScorer(encoder_dir, layer=2, baseline=b)
    cands, refs = ["the cat ran", ""], ["a cat sat", "the mat"]
    f_raw, f_scaled = raw.f1(cands, refs), scaled.f1(cands, refs)
    assert 0.0 < f_raw[0] < 1.0 and f_raw[1] == 0.0
    for a, s in zip(f_raw, f_scaled):
        assert abs(s - (a - b) / (1 - b)) < 1e-9
    # the paper's encoder name picks bert_score's layer and baseline; an unknown one needs a layer
    assert raw.baseline is None and BertScorer(encoder_dir, layer=2).baseline is None


def test_bad_bertscore_settings_are_one_clear_line(encoder_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"bertscore.model=.* could not be loaded.*or set it"):
        BertScorer(str(tmp_path / "missing"), layer=1)
    with pytest.raises(ConfigError, match=r"bertscore.layer is needed"):
        BertScorer(encoder_dir)
    with pytest.raises(ConfigError, match=r"bertscore.layer=5 is outside 0..2"):
        BertScorer(encoder_dir, layer=5)
