"""The KV cache keyword: `cache=` where a model's forward takes it (transformers ≥ 5.24),
`past_key_values=` where it does not, probed once per model class."""

import inspect
import warnings

import torch
from torch import nn

from smclm.models import cache as cache_mod
from smclm.models.cache import cache_keyword, cache_kwargs, make_kv_cache


class OldStyle(nn.Module):
    """A model of the pre-5.24 kind (remote code): the cache only as past_key_values."""

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        return past_key_values


def test_the_keyword_follows_the_forward_signature(toy_world, tiny_lm_dirs):
    from smclm.models.loading import load_base_model

    base, _ = toy_world
    assert cache_keyword(base.base_model) == "cache"  # GPT-Neo
    gpt2, _ = load_base_model(tiny_lm_dirs["gpt2"])
    assert cache_keyword(gpt2.base_model) == "cache"
    old = OldStyle()
    c = make_kv_cache()
    assert cache_kwargs(old, c) == {"past_key_values": c, "use_cache": True}
    assert old(torch.zeros(1, 1), **cache_kwargs(old, c)) is c


def test_probed_once_per_class(monkeypatch):
    class Fresh(OldStyle):
        pass

    calls = []
    real = inspect.signature
    monkeypatch.setattr(
        cache_mod.inspect, "signature", lambda f: calls.append(f) or real(f), raising=True
    )
    for _ in range(5):
        cache_kwargs(Fresh(), None)
    assert len(calls) == 1


def test_no_future_warning_while_sampling(toy_world, tiny_lm_dirs):
    from smclm.models.loading import load_base_model
    from smclm.models.twisted_lm import TwistedLM

    for base in (toy_world[0], load_base_model(tiny_lm_dirs["gpt2"])[0]):
        model = TwistedLM(base)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            ctx, _ = model.start(torch.tensor([0, 1]), 3)
            model.reorder(ctx, torch.tensor([0, 0, 1]))
            model.advance(ctx, torch.tensor([2, 3, 4]))
