"""Loading real architecture classes from a directory, twist heads, the cached twisted LM."""

import pytest
import torch

from smclm.models.loading import ModelLoadError, build_twist, load_base_model
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import run_smc

KINDS = [("head", "linear"), ("head", "mlp"), ("separate", "linear"), ("separate", "mlp")]


@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
@pytest.mark.parametrize("kind,head", KINDS)
def test_twists_on_models_loaded_by_name(tiny_lm_dirs, arch, kind, head):
    base, tok = load_base_model(tiny_lm_dirs[arch], torch.float32, "cpu")
    assert not any(p.requires_grad for p in base.parameters())
    twist = build_twist(kind, base, head=head)
    model = TwistedLM(base, twist)
    prompt = torch.tensor(tok("the cat", add_special_tokens=False)["input_ids"])
    tokens = torch.randint(0, 12, (5, 4))
    log_p0, log_psi = model.forward_full(prompt, tokens)
    assert log_p0.shape == log_psi.shape == (5, 4, 12)
    # initialised so that log ψ ≡ 0: the twisted proposal starts as p₀
    assert torch.all(log_psi == 0)
    # gradients reach the twist and never the frozen base
    log_psi.sum().backward()
    assert all(p.grad is not None for p in twist.parameters() if p.requires_grad)
    assert all(p.grad is None for p in base.parameters())
    # twist log ψ from incremental sampling equals the teacher-forced values
    with torch.no_grad():
        twist.head.net[-1].weight.normal_(0, 0.3)
    res = run_smc(
        model,
        prompt,
        4,
        lambda s: torch.zeros(s.shape[0]),
        6,
        generator=torch.Generator().manual_seed(0),
    )
    tf = model.sequence_log_probs(prompt, res.tokens)
    torch.testing.assert_close(res.log_q, tf["log_q"].sum(1), atol=1e-4, rtol=0)


def test_conditional_twist_encodes_o_once_and_concatenates(toy_world):
    base, _ = toy_world
    twist = build_twist("head", base, head="mlp", conditional=True)
    assert twist.head.net[0].in_features == 2 * base.config.hidden_size
    with torch.no_grad():
        twist.head.net[-1].weight.normal_(0, 0.3)
    model = TwistedLM(base, twist)
    prompt = torch.tensor([0, 1])
    cond = torch.randint(0, 12, (4, 3))
    tokens = torch.randint(0, 12, (4, 5))
    _, log_psi = model.forward_full(prompt, tokens, cond)
    _, log_psi_other = model.forward_full(prompt, tokens, torch.roll(cond, 1, 0))
    assert not torch.allclose(log_psi, log_psi_other)  # ψ depends on o
    res = run_smc(
        model,
        prompt,
        5,
        lambda s: torch.zeros(s.shape[0]),
        4,
        cond=cond,
        ess_threshold=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    tf = model.sequence_log_probs(prompt, res.tokens, cond)
    torch.testing.assert_close(res.log_q, tf["log_q"].sum(1), atol=1e-4, rtol=0)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_base_model(str(tmp_path / "nope" / "model"), torch.float32, "cpu")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_base_model(str(tmp_path), torch.float32, "cpu")  # exists but holds no model


def test_toy_model_loads_in_process():
    base, tok = load_base_model("toy", torch.float32, "cpu", {"vocab_size": 8})
    assert base.get_output_embeddings().weight.shape[0] == 8
    assert tok.decode([0, 1]) == "the cat"
