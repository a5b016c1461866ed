"""Tests for smclm.tasks.exact_samples: rejection sampling is exact, the cache, infeasibility."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smclm.evaluators.exact import solve
from smclm.models.toy import build_toy_model
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import run_smc
from smclm.tasks.exact_samples import (
    InfeasibleError,
    cache_key,
    load_or_collect,
    rejection_sample,
)
from smclm.tasks.toy import build_toy_task

V, T = 8, 3
PROMPT = torch.tensor([1, 2])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run much faster single-threaded (and do not fight other test processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> TwistedLM:
    return TwistedLM(build_toy_model(vocab_size=V, seed=0))


def _tasks():
    return {
        "threshold": build_toy_task(PROMPT, T, "threshold", [3], V, min_count=1),
        "exp_count": build_toy_task(PROMPT, T, "exp_count", [3, 5], V, beta=1.0),
    }


def _index(samples: torch.Tensor) -> torch.Tensor:
    """Sequence index in the enumeration's order (s_1 most significant)."""
    weights = torch.tensor([V ** (T - 1 - t) for t in range(T)])
    return (samples.long() * weights).sum(1)


def chi_square(samples: torch.Tensor, log_sigma: torch.Tensor) -> tuple[float, int]:
    """Pearson χ² of samples against σ; cells with expected count < 5 are pooled into one."""
    n = samples.shape[0]
    counts = torch.bincount(_index(samples), minlength=log_sigma.numel()).double()
    expected = n * log_sigma.exp()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    if bool((obs[~keep] > 0).any()):  # samples where σ has no mass at all
        stat = math.inf
    return stat, int(keep.sum()) - 1


def chi_square_limit(df: int) -> float:
    """df + 5·sd of χ²_df (sd = √(2 df)): a false alarm has probability below ~1e-4."""
    return df + 5 * math.sqrt(2 * df)


@pytest.mark.parametrize("kind", ["threshold", "exp_count"])
def test_rejection_samples_follow_sigma_and_p0_samples_do_not(model, kind):
    task = _tasks()[kind]
    sol = solve(model, task)
    n = 3000
    gen = torch.Generator().manual_seed(1)
    samples = rejection_sample(model, task, n, batch_size=4096, generator=gen)
    assert samples.shape == (n, T) and samples.dtype == torch.long
    stat, df = chi_square(samples, sol.log_sigma)
    assert stat < chi_square_limit(df), (stat, df)

    # The test has power: p₀ samples (no rejection) fail it clearly.
    p0 = run_smc(model, task.prompt_ids, T, task.bind(), n, ess_threshold=0.0, generator=gen)
    stat_p0, df_p0 = chi_square(p0.tokens.cpu(), sol.log_sigma)
    assert stat_p0 > 3 * chi_square_limit(df_p0), (stat_p0, df_p0)


def test_rejection_sampling_is_reproducible_and_shaped(model):
    task = _tasks()["threshold"]
    a = rejection_sample(model, task, 50, batch_size=64, generator=torch.Generator().manual_seed(3))
    b = rejection_sample(model, task, 50, batch_size=64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (a == 3).any(dim=1).all()  # every sample is a hit of the indicator


def test_infeasible_request_raises_one_line(model):
    # Every output token must be the rarest one: acceptance ≈ 0 in the first batch.
    task = build_toy_task(PROMPT, T, "threshold", [V - 1], V, min_count=T)
    sol = solve(model, task)
    assert sol.log_z < math.log(1e-3)
    with pytest.raises(InfeasibleError) as err:
        rejection_sample(
            model,
            task,
            1000,
            batch_size=256,
            generator=torch.Generator().manual_seed(0),
            max_draws=10_000,
        )
    msg = str(err.value)
    assert "\n" not in msg
    assert "acceptance rate" in msg and "max_draws=10000" in msg
    assert "lower n, raise max_draws, or use a less rare target" in msg
    assert isinstance(err.value, ValueError)


def test_feasible_request_within_max_draws(model):
    task = _tasks()["threshold"]
    out = rejection_sample(
        model,
        task,
        100,
        batch_size=512,
        generator=torch.Generator().manual_seed(0),
        max_draws=100_000,
    )
    assert out.shape == (100, T)


def test_needs_log_phi_max(model):
    task = _tasks()["threshold"]
    task.log_phi_max = None
    with pytest.raises(ValueError, match="log_phi_max"):
        rejection_sample(model, task, 10, batch_size=16, generator=torch.Generator())


def _settings(**over):
    s = {
        "model": {"name": "toy", "vocab_size": V, "seed": 0, "sharpness": 4.0},
        "task": {
            "name": "toy",
            "prompt_ids": torch.tensor([1, 2]),
            "potential": "threshold",
            "target_ids": [3],
            "min_count": 1,
            "epsilon": 1e-16,
        },
        "output_len": T,
        "seed": 0,
        "n": 20,
    }
    for k, v in over.items():
        if "." in k:
            a, b = k.split(".")
            s[a] = {**s[a], b: v}
        else:
            s[k] = v
    return s


def test_cache_key_is_stable_and_canonical():
    a = cache_key(_settings())
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)
    reordered = dict(reversed(list(_settings().items())))
    assert cache_key(reordered) == a
    as_list = _settings(**{"task.prompt_ids": [1, 2]})
    assert cache_key(as_list) == a  # a tensor and the same list are the same setting


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"n": 21},
        {"output_len": T + 1},
        {"task.prompt_ids": torch.tensor([1, 3])},
        {"task.target_ids": [4]},
        {"task.epsilon": 1e-8},
        {"model.sharpness": 2.0},
        {"model.name": "gpt2"},
    ],
)
def test_cache_reused_and_invalidated(tmp_path, change):
    calls = []

    def collect():
        calls.append(1)
        return torch.arange(len(calls) * 6).view(-1, 3)[-2:]

    first, cached = load_or_collect(tmp_path, _settings(), collect)
    assert not cached and len(calls) == 1
    again, cached = load_or_collect(tmp_path, _settings(), collect)
    assert cached and len(calls) == 1  # collect_fn not called again
    assert torch.equal(again, first)
    key = cache_key(_settings())
    stored = json.loads((tmp_path / f"{key}.json").read_text())
    assert stored["task"]["prompt_ids"] == [1, 2] and stored["n"] == 20
    assert (tmp_path / f"{key}.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    other, cached = load_or_collect(tmp_path, _settings(**change), collect)
    assert not cached and len(calls) == 2
    assert not torch.equal(other, first)


def test_corrupt_cache_is_recollected(tmp_path):
    load_or_collect(tmp_path, _settings(), lambda: torch.zeros(2, 3, dtype=torch.long))
    key = cache_key(_settings())
    (tmp_path / f"{key}.safetensors").write_bytes(b"not a safetensors file")
    out, cached = load_or_collect(tmp_path, _settings(), lambda: torch.ones(2, 3, dtype=torch.long))
    assert not cached and torch.equal(out, torch.ones(2, 3, dtype=torch.long))
