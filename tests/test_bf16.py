"""``model.dtype=auto`` on a CPU: bfloat16 only where the CPU has it natively, the model is large
enough (``BF16_MIN_PARAMS``) and bfloat16 agrees with float32 (``BF16_TOLERANCE``); the run's
config.yaml names the dtype it used (``model.dtype_resolved``).

The tolerance (per token, in nats, for log p₀ and for log q with a twist head): max |Δ| ≤ 1.0,
mean |Δ| ≤ 0.1, |mean Δ| ≤ 0.02. Why: KL and log Ẑ are averages over sequences of sums over T
tokens of these log-probabilities, with standard errors of ~0.1 nats; bfloat16's per-token
errors are rounding noise of mean ~0, so the signed mean is what could bias an estimate
(≤ 0.02 nats per token: ≤ 0.1 nats, one standard error, over T = 5 tokens), the mean |Δ| is
noise that averages out over sequences, and no single token's probability may move by more
than a factor e. Measured on SmolLM2 (README: model.dtype): max |Δ| ~0.15-0.5, mean |Δ| ~0.03,
|mean Δ| ≤ 0.007.
"""

import os

import pytest
import torch
import yaml

from smclm.models import loading
from smclm.models.loading import (
    BF16_MIN_PARAMS,
    BF16_TOLERANCE,
    BF16Tolerance,
    auto_cpu_dtype,
    cpu_has_bf16,
    load_base_model,
    probe_head,
    token_log_pq,
)

# SMCLM_TEST_BF16=1 runs the SmolLM2 agreement test on a CPU without native bfloat16 too (torch
# emulates it there: the same rounding, about twice as slow as float32)
FORCE = os.environ.get("SMCLM_TEST_BF16", "") == "1"
NATIVE = cpu_has_bf16()

# a few sequences of everyday text, cut to the same number of tokens (teacher-forced)
TEXTS = (
    "The weather was cold and grey, so Tom put on his warm coat and walked to the old station.",
    "In 1969, two astronauts landed on the Moon and walked on its surface for hours.",
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n\nprint(add(2, 3))',
    "Hello! How are you today? I am fine, thank you. Would you like a cup of tea?",
)
TOKENS = 20


@pytest.mark.skipif(
    not (NATIVE or FORCE),
    reason="this CPU has no native bfloat16 (avx512_bf16 or amx_bf16 not in /proc/cpuinfo): "
    "model.dtype=auto keeps float32 here (SMCLM_TEST_BF16=1 runs the check emulated)",
)
def test_bf16_log_p0_and_log_q_agree_with_float32_on_smollm2():
    """log p₀ and log q (an MLP twist head whose output layer has small random weights) per
    token on four sequences of 20 tokens: SmolLM2 in bfloat16 against float32, within
    ``BF16_TOLERANCE`` (max |Δ| ≤ 1, mean |Δ| ≤ 0.1, |mean Δ| ≤ 0.02 nats; module docstring);
    and ``auto`` picks bfloat16 for it here."""
    base, tok = load_base_model("smollm2", torch.float32, "cpu")
    assert tok("x", add_special_tokens=False)["input_ids"]
    rows = [tok(t, add_special_tokens=False)["input_ids"][:TOKENS] for t in TEXTS]
    assert all(len(r) == TOKENS for r in rows)
    ids = torch.tensor(rows)
    head = probe_head(base, seed=1)
    ref_p0, ref_q = token_log_pq(base, ids, head)
    dtype, why = auto_cpu_dtype(base, tok, has_bf16=True)  # casts base in place when bfloat16
    assert dtype == torch.bfloat16, why
    assert next(base.parameters()).dtype == torch.bfloat16
    assert base.model.rotary_emb.inv_freq.dtype == torch.float32  # computed constants stay
    p0, q = token_log_pq(base, ids, head)
    assert p0.dtype == q.dtype == torch.float32
    for name, d in (("log p0", p0 - ref_p0), ("log q", q - ref_q)):
        ok, stats = BF16_TOLERANCE.check(d)
        print(f"{name}: " + ", ".join(f"{k} {v:+.4f}" for k, v in stats.items()))
        assert ok, f"{name}: {stats} outside {BF16_TOLERANCE}"


def test_auto_keeps_tiny_models_and_cpus_without_bf16_in_float32(tiny_lm_dirs, toy_world):
    base, tok = load_base_model(tiny_lm_dirs["gpt2"], torch.float32, "cpu")
    dtype, why = auto_cpu_dtype(base, tok, has_bf16=True)
    assert dtype == torch.float32 and f"< {BF16_MIN_PARAMS / 1e6:g}M" in why
    assert next(base.parameters()).dtype == torch.float32
    dtype, why = auto_cpu_dtype(base, tok, has_bf16=False, min_params=0)
    assert dtype == torch.float32 and "no native bfloat16" in why
    toy, toy_tok = toy_world
    assert auto_cpu_dtype(toy, toy_tok, has_bf16=True)[0] == torch.float32


def test_a_failed_probe_leaves_the_float32_model_exactly_as_it_was(tiny_lm_dirs):
    """Above the size threshold on a bf16 CPU (both faked), a probe outside the tolerance keeps
    float32 with the very same weights; within it, the model is cast to bfloat16."""
    base, tok = load_base_model(tiny_lm_dirs["gpt_neo"], torch.float32, "cpu")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    strict = BF16Tolerance(max_abs=0.0, mean_abs=0.0, mean=0.0)
    dtype, why = auto_cpu_dtype(base, tok, has_bf16=True, min_params=0, tolerance=strict)
    assert dtype == torch.float32 and "disagrees" in why
    after = base.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    dtype, why = auto_cpu_dtype(base, tok, has_bf16=True, min_params=0)
    assert dtype == torch.bfloat16 and "agrees" in why
    assert next(base.parameters()).dtype == torch.bfloat16


def test_the_runs_config_names_the_dtype_it_used_and_resume_accepts_it(
    tmp_path, tiny_lm_dirs, monkeypatch
):
    """A tiny real-architecture run with model.dtype=auto on a (faked) bf16 CPU: float32, said
    in one log line and in config.yaml as model.dtype_resolved; resume=true and eval run= read
    that config back."""
    import logging

    from hydra import compose, initialize_config_module

    from smclm.evaluate import evaluate
    from smclm.train import train

    monkeypatch.setattr(loading, "cpu_has_bf16", lambda *a: True)

    def cfg(name, *extra):
        with initialize_config_module("smclm.configs", version_base="1.3"):
            return compose(name, overrides=["device=cpu", *extra])

    common = [
        "model=tinystories",
        f"model.name={tiny_lm_dirs['gpt2']}",
        "model.dtype=auto",
        "smc.n_particles=4",
        "task.output_len=2",
        "train.progress=false",
    ]
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("smclm.build").addHandler(handler)
    logging.getLogger("smclm.build").setLevel(logging.INFO)
    try:
        train(cfg("train", *common, "train.updates=1"), tmp_path)
    finally:
        logging.getLogger("smclm.build").removeHandler(handler)
    said = [r for r in records if r.startswith("model.dtype=auto")]
    assert (
        len(said) == 1
        and said[0].startswith("model.dtype=auto: float32 (")
        and "< 20M" in (said[0])
    )
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["dtype"] == "auto" and saved["model"]["dtype_resolved"] == "float32"
    summary = train(cfg("train", *common, "train.updates=2", "resume=true"), tmp_path)
    assert summary["run/updates"] == 2
    evaluate(cfg("eval", f"run={tmp_path}"))
    evaluated = yaml.safe_load((tmp_path / "eval" / "config.yaml").read_text())
    assert evaluated["model"]["dtype_resolved"] == "float32"
