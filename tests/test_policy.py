"""Proposal policies (smclm.models.policy): every kind on the toy GPT-Neo (nn.Linear LoRA path)
and on a tiny GPT-2 (Conv1D LoRA path, tied embeddings).

* The log q accumulated while sampling (KV caches, resampling reorders) equals the
  teacher-forced ``sequence_log_probs`` log q of the same tokens (fp32, 1e-5).
* At initialisation q = p₀: residual policies output exactly zero logits, full/LoRA copies
  exactly the base logits (so log q = log p₀ up to one fp32 re-normalisation, 1e-6).
* Bad kinds / LoRA targets fail with a message that names the fix.
* A full policy with tied weights survives a checkpoint round trip.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from smclm.build import build_policy_from_config
from smclm.checkpoint import load_params, save_checkpoint
from smclm.errors import ConfigError
from smclm.models.loading import load_base_model
from smclm.models.policy import POLICIES, build_policy
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import run_smc

PROMPT = torch.tensor([0, 1])
T, N, C = 4, 16, 3


@pytest.fixture(scope="module")
def bases(toy_world, tiny_lm_dirs):
    gpt2, _ = load_base_model(tiny_lm_dirs["gpt2"])
    return {"toy": toy_world[0], "gpt2": gpt2}


def _cond(kind: str, n: int = N) -> torch.Tensor | None:
    if kind != "separate_conditional":
        return None
    return torch.randint(0, 12, (n, C), generator=torch.Generator().manual_seed(7))


def _model(base, kind: str, perturb: bool) -> TwistedLM:
    """base + a policy of ``kind``; perturb: add N(0, 0.1²) noise to the trainable parameters so
    that q ≠ p₀ (every kind starts at q = p₀)."""
    torch.manual_seed(0)
    policy = build_policy(kind, base, conditional=kind == "separate_conditional")
    if perturb:
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    return TwistedLM(base, None, policy.eval())


def _zero_potential(tokens: torch.Tensor) -> torch.Tensor:
    return torch.zeros(tokens.shape[0])


@pytest.mark.parametrize("arch", ["toy", "gpt2"])
@pytest.mark.parametrize("kind", POLICIES)
@pytest.mark.parametrize("ess_threshold", [0.0, 1.0], ids=["sis", "smc"])
def test_sampled_log_q_equals_teacher_forced(bases, arch, kind, ess_threshold):
    model = _model(bases[arch], kind, perturb=True)
    cond = _cond(kind)
    if cond is not None and ess_threshold > 0:  # an SMC run shares one o (resampling mixes rows)
        cond = cond[:1].expand(N, -1)
    res = run_smc(
        model,
        PROMPT,
        T,
        _zero_potential,
        N,
        ess_threshold=ess_threshold,
        cond=cond,
        generator=torch.Generator().manual_seed(1),
        temperature=1.0,
    )
    with torch.no_grad():
        out = model.sequence_log_probs(PROMPT, res.tokens, cond)
    torch.testing.assert_close(res.log_q, out["log_q"].sum(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.log_p0, out["log_p0"].sum(1), atol=1e-5, rtol=0)
    # the perturbation made q differ from p₀, so the check above is not p₀ against p₀
    assert (out["log_q"] - out["log_p0"]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["toy", "gpt2"])
@pytest.mark.parametrize("kind", POLICIES)
def test_policy_starts_at_p0(bases, arch, kind):
    base = bases[arch]
    model = _model(base, kind, perturb=False)
    tokens = torch.randint(0, 12, (8, T), generator=torch.Generator().manual_seed(3))
    cond = _cond(kind, 8)
    ids = torch.cat([PROMPT[None].expand(8, -1), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        h = model.body(input_ids=ids).last_hidden_state
        logits = model.policy.full(ids, h, PROMPT.numel() - 1, cond)
        if model.policy.residual:  # log q = log_softmax(log p₀ + l) with l ≡ 0
            assert torch.equal(logits, torch.zeros_like(logits))
        else:  # a copy of the LM (LoRA adds B·A with B = 0): the base logits, bit for bit
            base_logits = base(input_ids=ids).logits[:, PROMPT.numel() - 1 :].float()
            assert torch.equal(logits, base_logits)
        out = model.sequence_log_probs(PROMPT, tokens, cond)
    # equal up to float32 rounding: the base's teacher-forced pass continues the rows from the
    # prompt's KV cache (TwistedLM.base_pass), the policy's copy runs the whole ids
    torch.testing.assert_close(out["log_q"], out["log_p0"], atol=1e-5, rtol=0)


def test_unknown_policy_kind_names_the_choices(toy_world):
    with pytest.raises(ValueError, match="unknown policy 'tabular'; choose one of: full, mlp_head"):
        build_policy("tabular", toy_world[0])
    cfg = OmegaConf.create({"method": {"policy": "tabular"}, "task": {}})
    with pytest.raises(ConfigError, match=r"method.policy=tabular: .*choose one of"):
        build_policy_from_config(cfg, toy_world[0], torch.device("cpu"))


@pytest.mark.parametrize("arch", ["toy", "gpt2"])
def test_lora_targets_matching_nothing_list_the_layer_names(bases, arch):
    with pytest.raises(ValueError, match="match no Linear/Conv1D layer.*layer names are: .*c_"):
        build_policy("lora", bases[arch], lora_targets=["nonexistent"])
    cfg = OmegaConf.create(
        {"method": {"policy": "lora", "lora": {"targets": ["nonexistent"]}}, "task": {}}
    )
    with pytest.raises(ConfigError, match="method.policy=lora: .*layer names are"):
        build_policy_from_config(cfg, bases[arch], torch.device("cpu"))


def test_full_and_lora_refuse_conditioning(toy_world):
    for kind in ("full", "lora"):
        with pytest.raises(ValueError, match="use policy=separate_conditional"):
            build_policy(kind, toy_world[0], conditional=True)


def test_lora_trains_only_the_adapters(bases):
    policy = build_policy("lora", bases["gpt2"], lora_r=4)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    assert any(".c_attn." in n for n in names)  # the Conv1D layers were wrapped


def test_full_policy_with_tied_weights_checkpoint_round_trip(bases, tmp_path):
    base = bases["gpt2"]
    assert base.config.tie_word_embeddings  # the case under test: lm_head shares wte
    trained = _model(base, "full", perturb=True)
    lm = trained.policy.lm
    assert lm.lm_head.weight is lm.transformer.wte.weight
    ckpt = save_checkpoint(tmp_path, 1, trained.trainables(), None, {}, {})
    fresh = _model(base, "full", perturb=False)
    load_params(ckpt, fresh.trainables())
    a, b = trained.trainables().state_dict(), fresh.trainables().state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert fresh.policy.lm.lm_head.weight is fresh.policy.lm.transformer.wte.weight  # still tied
    tokens = torch.randint(0, 12, (4, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        la = trained.sequence_log_probs(PROMPT, tokens)["log_q"]
        lb = fresh.sequence_log_probs(PROMPT, tokens)["log_q"]
    assert torch.equal(la, lb)
