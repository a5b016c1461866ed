"""Tests for the offline toy world (smclm.models.toy)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GPTNeoForCausalLM

from smclm.models.toy import (
    TOY_WORDS,
    build_toy_model,
    build_toy_tokenizer,
    build_toy_world,
    encode_toy_prompt,
    save_toy_world,
)

V = 12


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny models run far faster on one thread (multi-threading thrashes on a busy CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world():
    return build_toy_world(vocab_size=V)


def _random_contexts(n: int, vocab_size: int, seed: int = 123) -> list[torch.Tensor]:
    """``n`` random contexts, batched by length (1..8) so each batch is one forward pass."""
    gen = torch.Generator().manual_seed(seed)
    per = -(-n // 8)
    return [torch.randint(0, vocab_size, (per, length), generator=gen) for length in range(1, 9)]


@torch.no_grad()
def _last_logprobs(model, contexts: list[torch.Tensor]) -> torch.Tensor:
    rows = [torch.log_softmax(model(batch).logits[:, -1], -1) for batch in contexts]
    return torch.cat(rows)


def test_toy_words_and_model_class(world):
    model, tok = world
    assert len(TOY_WORDS) == 16 and len(set(TOY_WORDS)) == 16
    assert "bad" in TOY_WORDS[:V]
    assert isinstance(model, GPTNeoForCausalLM)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == V == len(tok)
    assert model.config.eos_token_id == model.config.pad_token_id == tok.eos_token_id == V - 1
    assert tok.pad_token_id == V - 1 and tok.eos_token == TOY_WORDS[V - 1]


def test_same_seed_identical_and_different_seed_differs():
    a, b, c = build_toy_model(seed=0), build_toy_model(seed=0), build_toy_model(seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.tensor([[0, 1, 3, 4]])
    with torch.no_grad():
        la, lb, lc = a(x).logits, b(x).logits, c(x).logits
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc, atol=1e-3)


def test_build_does_not_touch_global_rng():
    torch.manual_seed(1234)
    before = torch.random.get_rng_state().clone()
    build_toy_world(seed=7)
    assert torch.equal(before, torch.random.get_rng_state())


def test_tokenizer_round_trip(world):
    _, tok = world
    assert tok("the cat", add_special_tokens=False)["input_ids"] == [0, 1]
    assert tok("the cat")["input_ids"] == [0, 1]  # no special tokens even by default
    assert tok.decode([0, 1, 3]) == "the cat sat"
    assert tok.batch_decode([[0, 1], [2, 3]]) == ["the cat", "dog sat"]
    text = " ".join(TOY_WORDS[:V])
    ids = encode_toy_prompt(tok, text)
    assert ids == list(range(V))
    assert tok.decode(ids) == text
    assert tok.get_vocab() == {w: i for i, w in enumerate(TOY_WORDS[:V])}


def test_unknown_word_raises(world):
    _, tok = world
    with pytest.raises(ValueError, match=r"word 'xyz' is not in the toy vocabulary \(known: the, "):
        encode_toy_prompt(tok, "the xyz")
    with pytest.raises(Exception):  # noqa: B017 - the raw tokenizer raises a tokenizers error
        tok("the xyz", add_special_tokens=False)
    small = build_toy_tokenizer(4)  # a real TOY_WORD outside a small vocabulary is unknown too
    with pytest.raises(ValueError, match="'big'"):
        encode_toy_prompt(small, "the big cat")


@pytest.mark.parametrize("bad", [0, 1, 17, 100, -1])
def test_invalid_vocab_size(bad):
    with pytest.raises(ValueError, match="between 2 and 16"):
        build_toy_tokenizer(bad)
    with pytest.raises(ValueError, match="between 2 and 16"):
        build_toy_model(vocab_size=bad)


def test_other_vocab_sizes():
    for v in (2, 8, 16):
        model, tok = build_toy_world(vocab_size=v)
        assert len(tok) == v and model.config.vocab_size == v
        with torch.no_grad():
            assert model(torch.tensor([[0, v - 1]])).logits.shape == (1, 2, v)


def test_peaked_but_full_support(world):
    model, _ = world
    logp = _last_logprobs(model, _random_contexts(200, V))
    entropy = -(logp.exp() * logp).sum(-1)
    mean_h = entropy.mean().item()
    assert 0.8 <= mean_h <= 1.6, mean_h  # documented: ~1.33 nats for the defaults
    assert mean_h < 0.75 * math.log(V)
    assert torch.all(logp.exp() > 0)
    assert logp.min().exp().item() > 1e-6


def test_sharpness_controls_peakedness():
    contexts = _random_contexts(50, V)
    entropies = []
    for s in (1.0, 4.0, 8.0):
        logp = _last_logprobs(build_toy_model(sharpness=s), contexts)
        entropies.append(-(logp.exp() * logp).sum(-1).mean().item())
    assert entropies[0] > entropies[1] > entropies[2]
    with pytest.raises(ValueError):
        build_toy_model(sharpness=0.0)


def test_save_and_load_offline(world, tmp_path):
    model, tok = world
    save_toy_world(tmp_path, vocab_size=V)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    x = torch.tensor([[0, 1, 3, 4, 2], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, loaded(x).logits, atol=1e-6)
    text = "the cat sat on a mat"
    assert loaded_tok(text, add_special_tokens=False)["input_ids"] == encode_toy_prompt(tok, text)
    assert loaded_tok.decode([0, 1, 3]) == tok.decode([0, 1, 3]) == "the cat sat"
    assert loaded_tok.batch_decode(x.tolist()) == tok.batch_decode(x.tolist())
    assert loaded_tok.pad_token_id == loaded_tok.eos_token_id == V - 1


def test_incremental_decoding_with_dynamic_cache(world):
    model, _ = world
    x = torch.tensor([[0, 1, 3, 4, 2, 7]])
    with torch.no_grad():
        full = model(x).logits[0, -1]
        cache = DynamicCache()
        out = model(x[:, :3], cache=cache, use_cache=True)
        for t in range(3, x.shape[1]):
            out = model(x[:, t : t + 1], cache=out.cache, use_cache=True)
    assert torch.allclose(out.logits[0, -1], full, atol=1e-5)
