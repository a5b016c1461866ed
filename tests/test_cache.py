"""The growable KV cache (smclm.models.cache) against transformers' DynamicCache."""

import pytest
import torch
from transformers import DynamicCache

import smclm.models.cache as cache_mod
from smclm.models.cache import GrowableCache, GrowableLayer, make_kv_cache, reorder_cache
from smclm.models.loading import load_base_model
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.resampling import arrange_in_place, multinomial


def _drive(body, cache, prompt, n, steps, seed):
    """Prompt once (batch 1), expand to n rows, then alternate a resample and one token per row.

    Returns the last hidden state of every step [steps + 1, n, d]. The draws depend only on the
    seed, so two caches fed the same seed see the same ancestors and tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = body.get_input_embeddings().weight.shape[0]
    outs = []
    with torch.no_grad():
        h = body(input_ids=prompt[None], cache=cache, use_cache=True).last_hidden_state
        reorder_cache(cache, torch.zeros(n, dtype=torch.long))
        outs.append(h[:, -1].expand(n, -1))
        for _ in range(steps):
            log_w = torch.randn(n, generator=gen) * 2.0
            anc = arrange_in_place(multinomial(log_w, n, gen), n)
            reorder_cache(cache, anc)
            tokens = torch.randint(0, vocab, (n,), generator=gen)
            h = body(input_ids=tokens[:, None], cache=cache, use_cache=True)
            outs.append(h.last_hidden_state[:, -1])
    return torch.stack(outs)


@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
def test_growable_cache_matches_dynamic_cache_with_resampling(tiny_lm_dirs, arch, copy_path):
    base, _ = load_base_model(tiny_lm_dirs[arch], torch.float32, "cpu")
    body = base.base_model
    prompt = torch.tensor([0, 1, 2])
    # 20 steps: past the initial capacity (prompt + 1) and several doublings, and past the
    # GPT-Neo local-attention window (8) of the fixture.
    ref = _drive(body, DynamicCache(), prompt, 16, 20, seed=3)
    cache = make_kv_cache()
    got = _drive(body, cache, prompt, 16, 20, seed=3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert isinstance(cache, GrowableCache)
    assert all(isinstance(layer, GrowableLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 3 + 20
    layer = cache.layers[0]
    assert layer._k.shape[-2] >= 23 and layer.keys.data_ptr() == layer._k.data_ptr()


@pytest.fixture(params=["scratch", "direct"])
def copy_path(request, monkeypatch):
    """Both ways of copying changed rows: through the scratch buffer and row by row (forced by
    a zero threshold; by default only rows of >= 64 KiB, or 256 KiB, on CPU are copied directly)."""
    if request.param == "direct":
        monkeypatch.setattr(cache_mod, "_DIRECT_COPY_MIN", 0)
        monkeypatch.setattr(cache_mod, "_DIRECT_COPY_MIN_WIDE", 0)
    return request.param


@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
def test_twisted_lm_logits_match_dynamic_cache(tiny_lm_dirs, arch, copy_path, monkeypatch):
    """log p₀ from TwistedLM.start/advance/reorder: growable cache vs plain DynamicCache."""
    base, _ = load_base_model(tiny_lm_dirs[arch], torch.float32, "cpu")
    model = TwistedLM(base)
    prompt = torch.tensor([0, 1])

    def run():
        gen = torch.Generator().manual_seed(0)
        ctx, dists = model.start(prompt, 8)
        rows = [dists.log_p0]
        for _ in range(12):
            anc = arrange_in_place(multinomial(torch.randn(8, generator=gen), 8, gen), 8)
            model.reorder(ctx, anc)
            dists = model.advance(ctx, torch.randint(0, 12, (8,), generator=gen))
            rows.append(dists.log_p0)
        return torch.stack(rows), ctx.cache

    got, cache = run()
    assert isinstance(cache, GrowableCache)
    monkeypatch.setattr(cache_mod, "make_kv_cache", DynamicCache)
    ref, cache = run()
    assert not isinstance(cache, GrowableCache)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def _filled_layer(batch, length, heads=2, dim=3, dtype=torch.float32):
    layer = GrowableLayer()
    k = torch.randn(batch, heads, length, dim).to(dtype)
    layer.update(k, -k)
    return layer, k


def test_growth_beyond_capacity_keeps_the_contents():
    layer, k = _filled_layer(4, 5)
    assert layer._k.shape[-2] == 5  # a fresh cache holds exactly its first update
    full = [k]
    capacities = set()
    for _ in range(40):
        new = torch.randn(4, 2, 1, 3)
        keys, values = layer.update(new, -new)
        full.append(new)
        capacities.add(layer._k.shape[-2])
        torch.testing.assert_close(keys, torch.cat(full, dim=-2), atol=0, rtol=0)
        torch.testing.assert_close(values, -torch.cat(full, dim=-2), atol=0, rtol=0)
    assert layer.get_seq_length() == 45
    assert len(capacities) <= 4  # capacity doubles: few reallocations
    # a multi-token update larger than the doubled capacity
    big = torch.randn(4, 2, 100, 3)
    keys, _ = layer.update(big, -big)
    assert keys.shape[-2] == 145
    torch.testing.assert_close(keys[..., 45:, :], big, atol=0, rtol=0)


@pytest.mark.parametrize(
    "dim,dtype",
    # rows copied as 16-byte units (4 float32, 8 bfloat16) and, with 12 bytes, as they are
    [(3, torch.float32), (4, torch.float32), (8, torch.bfloat16), (6, torch.bfloat16)],
)
def test_reorder_copies_changed_rows_in_place(copy_path, dim, dtype):
    layer, k = _filled_layer(6, 4, dim=dim, dtype=dtype)
    layer.update(torch.zeros(6, 2, 1, dim, dtype=dtype), torch.zeros(6, 2, 1, dim, dtype=dtype))
    ref = torch.cat([k, torch.zeros(6, 2, 1, dim, dtype=dtype)], dim=-2)
    wide = dim * k.element_size() % 16 == 0
    assert (cache_mod._wide(layer._k).dtype == torch.complex128) == wide
    ptr = layer._k.data_ptr()
    cache = GrowableCache()
    cache.layers.append(layer)
    for anc in ([0, 1, 2, 3, 4, 5], [0, 0, 2, 2, 4, 1], [3, 3, 3, 3, 3, 3], [5, 4, 3, 2, 1, 0]):
        anc = torch.tensor(anc)
        reorder_cache(cache, anc)
        ref = ref[anc]
        torch.testing.assert_close(layer.keys, ref, atol=0, rtol=0)
        torch.testing.assert_close(layer.values, -ref, atol=0, rtol=0)
        assert layer._k.data_ptr() == ptr  # in place, no new buffers
    # transformers' own entry point goes the same way
    cache.reorder_cache(torch.tensor([1, 0, 2, 3, 4, 5]))
    torch.testing.assert_close(layer.keys, ref[[1, 0, 2, 3, 4, 5]], atol=0, rtol=0)


def test_reorder_skips_the_shared_prompt_but_stays_exact(copy_path):
    layer, k = _filled_layer(1, 3)
    cache = GrowableCache()
    cache.layers.append(layer)
    reorder_cache(cache, torch.zeros(5, dtype=torch.long))  # expand the prompt to 5 rows
    assert layer._shared == 3 and layer.keys.shape[0] == 5
    new = torch.randn(5, 2, 2, 3)
    layer.update(new, -new)
    ref = torch.cat([k.expand(5, -1, -1, -1), new], dim=-2)
    anc = torch.tensor([0, 0, 2, 1, 1])
    reorder_cache(cache, anc)
    torch.testing.assert_close(layer.keys, ref[anc], atol=0, rtol=0)
    torch.testing.assert_close(layer.values, -ref[anc], atol=0, rtol=0)


def test_reorder_to_a_longer_batch_expands_like_index_select():
    """The exact evaluator grows the batch by reorder (rows → rows·V) before every advance."""
    layer, k = _filled_layer(2, 3)
    cache = GrowableCache()
    cache.layers.append(layer)
    ref = k
    for _ in range(3):
        rows = ref.shape[0]
        anc = torch.arange(rows).repeat_interleave(3)
        reorder_cache(cache, anc)
        new = torch.randn(rows * 3, 2, 1, 3)
        layer.update(new, -new)
        ref = torch.cat([ref[anc], new], dim=-2)
        torch.testing.assert_close(layer.keys, ref, atol=0, rtol=0)
        torch.testing.assert_close(layer.values, -ref, atol=0, rtol=0)
    assert layer.keys.shape[0] == 2 * 27


def test_crop_reset_and_batch_helpers():
    layer, k = _filled_layer(3, 6)
    layer.crop(-2)
    assert layer.get_seq_length() == 4
    new = torch.randn(3, 2, 1, 3)
    keys, _ = layer.update(new, -new)
    torch.testing.assert_close(keys, torch.cat([k[..., :4, :], new], dim=-2), atol=0, rtol=0)
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 6
    layer.batch_select_indices(torch.tensor([0, 2, 4]))
    torch.testing.assert_close(layer.keys[..., :4, :], k[..., :4, :], atol=0, rtol=0)
    layer.reset()
    assert layer.get_seq_length() == 0
    layer.update(new, -new)
    torch.testing.assert_close(layer.keys, new, atol=0, rtol=0)


def test_update_under_autograd_falls_back_to_concatenation():
    layer = GrowableLayer()
    x = torch.randn(2, 1, 3, 4, requires_grad=True)
    keys, values = layer.update(x, x * 2)
    keys2, _ = layer.update(x[..., :1, :] * 3, x[..., :1, :])
    assert keys2.shape[-2] == 4
    keys2.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
def test_smc_with_growable_caches_matches_dynamic_caches(
    tiny_lm_dirs, arch, copy_path, monkeypatch
):
    """The same SMC run (resampling at every step; base and separate-twist caches reordered by
    the same ancestors) with growable caches and with plain DynamicCaches."""
    from smclm.models.loading import build_twist
    from smclm.smc.sampler import run_smc

    base, _ = load_base_model(tiny_lm_dirs[arch], torch.float32, "cpu")
    torch.manual_seed(0)
    twist = build_twist("separate", base, head="mlp")
    with torch.no_grad():
        twist.head.net[-1].weight.normal_(0, 0.3)
    model = TwistedLM(base, twist)
    prompt = torch.tensor([0, 1, 2])

    def run():
        gen = torch.Generator().manual_seed(4)
        return run_smc(
            model, prompt, 14, lambda s: -0.1 * (s < 3).sum(-1).float(), 16, generator=gen
        )

    got = run()
    monkeypatch.setattr(cache_mod, "make_kv_cache", DynamicCache)
    ref = run()
    assert torch.equal(got.tokens, ref.tokens)
    for name in ("log_w", "log_p0", "log_q", "log_phi"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-5, rtol=0)
    assert abs(got.log_z_hat - ref.log_z_hat) < 1e-5
    assert [i.n_unique for i in got.infos] == [i.n_unique for i in ref.infos]
    assert any(i.n_unique < 16 for i in got.infos)


def test_reorder_under_inference_mode_and_after_in_place_edits():
    layer, k = _filled_layer(4, 2)
    cache = GrowableCache()
    cache.layers.append(layer)
    anc = torch.tensor([0, 0, 2, 2])
    reorder_cache(cache, anc)
    ref = k[anc]
    anc[1] = 1  # an in-place edit of the same tensor invalidates the remembered rows
    anc[3] = 0
    reorder_cache(cache, anc)
    torch.testing.assert_close(layer.keys, ref[anc], atol=0, rtol=0)
    with torch.inference_mode():
        reorder_cache(cache, torch.tensor([3, 3, 3, 3]))
    torch.testing.assert_close(layer.keys, ref[anc][[3, 3, 3, 3]], atol=0, rtol=0)
