"""The sentence-continuation experiment's metrics and generate baselines (issue 23; Hu et al.
§4.1, spec §1.4): diversity on hand-made embeddings, the log-likelihoods against the raw HF
model's logits + the task's bias, and each baseline's samples on a tiny random GPT-2."""

import math

import pytest
import torch
from conftest import save_tiny_lm

from smclm.evaluators.sentences import (
    BASELINES,
    BaselineUnavailable,
    Embedder,
    cosine_diversity,
    diversity,
    generate_baseline,
    generate_baselines,
    sentence_metrics,
)
from smclm.models.twisted_lm import TwistedLM
from smclm.tasks.base import Task
from smclm.tasks.next_sentence import NoPotential, logit_bias

# toy words: the cat dog sat on a mat and ran bad big end(=EOS); stop = "mat", banned: bad, EOS
STOP, BANNED = 6, [9, 11]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from smclm.models.toy import build_toy_tokenizer

    path = save_tiny_lm(tmp_path_factory.mktemp("sentences_gpt2"), "gpt2", vocab_size=12)
    base = AutoModelForCausalLM.from_pretrained(path)
    bias = logit_bias(12, BANNED, -50.0)
    model = TwistedLM(base)
    model.set_logit_bias(bias)  # as build_world does
    prompts = [torch.tensor([11, 0, 1, 3]), torch.tensor([11, 0, 2])]
    task = Task(
        "toy_sentence",
        prompts[0],
        6,
        NoPotential(),
        log_phi_max=0.0,
        stop_ids=(STOP,),
        min_len=2,
        logit_bias=bias,
    )
    return model, build_toy_tokenizer(12), task, prompts, bias


def one_hot_embedder():
    """Each distinct text gets its own axis: equal texts cos 1, different ones cos 0."""
    axes: dict[str, int] = {}

    def fn(texts):
        for t in texts:
            axes.setdefault(t, len(axes))
        return torch.eye(16)[[axes[t] for t in texts]]

    return Embedder("one-hot (test)", fn)


def test_diversity_of_identical_samples_is_0_and_of_orthogonal_ones_is_1(world):
    _, tok, _, _, _ = world
    emb = one_hot_embedder()
    assert diversity(tok, [[1, 3, STOP]] * 4, emb) == pytest.approx(0.0, abs=1e-12)
    assert diversity(tok, [[1, STOP], [2, STOP], [3, STOP]], emb) == pytest.approx(1.0)
    # pairs (1,2) cos 1, (1,3) and (2,3) cos 0: 1 - 1/3
    assert diversity(tok, [[1, STOP], [1, STOP], [2, STOP]], emb) == pytest.approx(2 / 3)
    assert cosine_diversity(torch.tensor([[1.0, 0.0], [0.0, 2.0]])) == pytest.approx(1.0)
    assert math.isnan(cosine_diversity(torch.ones(1, 3)))
    # periods are removed before embedding: "cat mat." and "cat mat" embed alike
    seen = []
    rec = Embedder("rec", lambda texts: seen.extend(texts) or torch.ones(len(texts), 2))
    diversity(tok, [[1, STOP], [2, STOP]], rec)
    assert seen == ["cat mat", "dog mat"]


def independent_log_lik(base, prompt, sample, bias):
    ids = torch.tensor([prompt.tolist() + sample[:-1]])
    with torch.no_grad():
        logits = base(input_ids=ids).logits[0, prompt.numel() - 1 :].double()
    lp = torch.log_softmax(logits + bias.double(), dim=-1)
    return float(sum(lp[t, s] for t, s in enumerate(sample)))


def test_log_likelihoods_match_the_raw_models_logits_plus_the_bias(world):
    model, tok, task, prompts, bias = world
    samples = [
        [[1, 3, 4, 5, STOP], [2, STOP], [9, 0, STOP]],  # 9 is banned: ≈ −50 on it
        [[0, 1, 2, 3, 4, STOP], [7, 8, STOP]],
    ]
    out = sentence_metrics(model, tok, prompts, samples, (STOP,), one_hot_embedder())
    maxes, means = [], []
    for prompt, group, row in zip(prompts, samples, out["per_prompt"], strict=True):
        ll = [independent_log_lik(model.base, prompt, s, bias) for s in group]
        assert row["max_log_lik"] == pytest.approx(max(ll), abs=1e-4)
        assert row["mean_log_lik"] == pytest.approx(sum(ll) / len(ll), abs=1e-4)
        assert row["mean_len"] == pytest.approx(sum(map(len, group)) / len(group))
        maxes.append(max(ll))
        means.append(sum(ll) / len(ll))
    assert independent_log_lik(model.base, prompts[0], [9, 0, STOP], bias) < -45
    assert out["max_log_lik"] == pytest.approx(sum(maxes) / 2, abs=1e-4)
    assert out["mean_log_lik"] == pytest.approx(sum(means) / 2, abs=1e-4)
    assert out["diversity"] == pytest.approx(1.0)  # distinct texts, one-hot embedder
    assert out["embedder"] == "one-hot (test)" and out["n_prompts"] == 2
    with pytest.raises(ValueError, match="must end in a stop id"):
        sentence_metrics(model, tok, prompts[:1], [[[1, 2]]], (STOP,), one_hot_embedder())


def test_the_default_embedder_offline_is_labelled_not_the_papers(world):
    model, tok, _, prompts, _ = world
    out = sentence_metrics(model, tok, prompts[:1], [[[1, STOP], [1, STOP]]], (STOP,))
    assert "NOT the paper's" in out["embedder"]  # no sentence_transformers / Hub here
    assert out["diversity"] == pytest.approx(0.0, abs=1e-6)


def test_each_available_baseline_returns_n_stopped_samples_without_banned_tokens(world):
    model, _, task, prompts, _ = world
    n = 3
    done, skipped = generate_baselines(model, task, prompts, n, tau=0.5, seed=0)
    assert set(done) == set(BASELINES) - {"diverse_beam"}
    assert "diverse_beam" in skipped and "trust_remote_code" in skipped["diverse_beam"]
    capped = 0
    for method, per_prompt in done.items():
        assert len(per_prompt) == len(prompts)
        for group in per_prompt:
            assert len(group) == n, method
            for s in group:
                assert 2 <= len(s) <= task.output_len, (method, s)
                assert s[-1] == STOP and STOP not in s[:-1], (method, s)
                assert not set(s) & set(BANNED), (method, s)
                capped += len(s) == task.output_len
        if method in ("beam", "greedy"):
            assert all(g == [g[0]] * n for g in per_prompt), method
    assert capped > 0  # some samples reach the cap: the forced stop is exercised
    # seeded: the same samples again
    again = generate_baseline(model, task, prompts[0], "sample", n, seed=0)
    assert again == done["sample"][0]


def test_greedy_matches_a_hand_loop_over_the_raw_logits_plus_the_bias(world):
    """Greedy is argmax of p̃₀ = softmax(raw logits + b), the stop barred at step 1
    (min_new_tokens 1) and forced at the cap."""
    model, _, task, prompts, bias = world
    short = Task(
        "short", prompts[0], 3, NoPotential(), stop_ids=(STOP,), min_len=2, logit_bias=bias
    )
    for t in (task, short):
        for prompt in prompts:
            ids, want = prompt.tolist(), []
            for step in range(t.output_len):
                with torch.no_grad():
                    x = model.base(input_ids=torch.tensor([ids])).logits[0, -1] + bias
                if step == 0:
                    x[STOP] = -math.inf
                tok = STOP if step == t.output_len - 1 else int(x.argmax())
                want.append(tok)
                ids.append(tok)
                if tok == STOP:
                    break
            assert generate_baseline(model, t, prompt, "greedy", 2) == [want, want]


def test_diverse_beam_is_refused_clearly_offline(world):
    model, _, task, prompts, _ = world
    with pytest.raises(BaselineUnavailable, match="group-beam-search"):
        generate_baseline(model, task, prompts[0], "diverse_beam", 2)
    with pytest.raises(BaselineUnavailable, match="could not be loaded"):
        generate_baseline(model, task, prompts[0], "diverse_beam", 2, trust_remote_code=True)
