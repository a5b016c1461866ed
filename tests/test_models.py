"""Loading real architecture classes from a directory, twist heads, the cached twisted LM."""

import pytest
import torch

from smclm.models.loading import ModelLoadError, build_twist, load_base_model
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import run_smc

KINDS = [
    ("head", "linear", "vocab"),
    ("head", "mlp", "vocab"),
    ("separate", "linear", "vocab"),
    ("separate", "mlp", "vocab"),
    ("head", "mlp", "embedding"),
    ("separate", "linear", "embedding"),
]


@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
@pytest.mark.parametrize("kind,head,output", KINDS)
def test_twists_on_models_loaded_by_name(tiny_lm_dirs, arch, kind, head, output):
    base, tok = load_base_model(tiny_lm_dirs[arch], torch.float32, "cpu")
    assert not any(p.requires_grad for p in base.parameters())
    twist = build_twist(kind, base, head=head, output=output)
    if output == "embedding":  # the last layer is d_e wide; the base's embeddings are not saved
        assert twist.head.net[-1].out_features == base.get_output_embeddings().weight.shape[1]
        assert not any(k.startswith("_") for k in twist.head.state_dict())
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


def _arch(name: str):
    """A tiny random causal LM of an architecture whose logits are not just the head's output
    (soft-capped, scaled) or whose body projects out (OPT-350m), with the toy tokenizer."""
    import transformers as tr

    common = dict(vocab_size=12, bos_token_id=11, eos_token_id=11, max_position_embeddings=64)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    specs = {
        "gemma2": (tr.Gemma2Config, tr.Gemma2ForCausalLM,
                   dict(small, num_key_value_heads=2, head_dim=8, sliding_window=8,
                        final_logit_softcapping=2.0, initializer_range=0.5)),
        "granite": (tr.GraniteConfig, tr.GraniteForCausalLM,
                    dict(small, num_key_value_heads=2, logits_scaling=4.0, initializer_range=0.5)),
        "cohere": (tr.CohereConfig, tr.CohereForCausalLM,
                   dict(small, num_key_value_heads=2, logit_scale=4.0)),
        "opt": (tr.OPTConfig, tr.OPTForCausalLM,
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=16, pad_token_id=0, init_std=0.5)),
    }  # fmt: skip
    cfg_cls, model_cls, kw = specs[name]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**common, **kw))


@pytest.mark.parametrize("arch", ["gemma2", "granite", "cohere", "opt"])
def test_p0_is_the_models_own_next_token_distribution(tmp_path, arch):
    """log p₀ of the teacher-forced pass and of incremental sampling equal log_softmax of the
    model's own logits, on architectures that transform them after the head (and on OPT, whose
    body projects its hidden states to the head's width: conditional twist heads read that)."""
    from smclm.models.toy import build_toy_tokenizer

    _arch(arch).save_pretrained(tmp_path)
    build_toy_tokenizer(12).save_pretrained(tmp_path)
    base, _ = load_base_model(str(tmp_path), torch.float32, "cpu")  # runs check_output_head
    prompt, g = torch.tensor([3, 4]), torch.Generator().manual_seed(0)
    tokens, cond = (
        torch.randint(0, 11, (3, 5), generator=g),
        torch.randint(0, 11, (3, 2), generator=g),
    )
    with torch.no_grad():
        ids = torch.cat([prompt[None].expand(3, -1), tokens], dim=1)
        own = torch.log_softmax(base(input_ids=ids).logits.float(), -1)[:, 1:-1]
        raw = torch.log_softmax(base.get_output_embeddings()(
            base.base_model(input_ids=ids).last_hidden_state).float(), -1)[:, 1:-1]  # fmt: skip
    want = own.gather(-1, tokens[..., None]).squeeze(-1)
    if arch != "opt":  # the transform matters: the bare head's distribution is another one
        assert (raw - own).abs().max() > 0.05
    model = TwistedLM(base, build_twist("head", base, head="mlp", conditional=True))
    full = model.sequence_log_probs(prompt, tokens, cond)["log_p0"]
    ctx, dists = model.start(prompt, 3, cond)
    steps = [dists.log_p0.gather(1, tokens[:, :1])]
    for t in range(4):
        dists = model.advance(ctx, tokens[:, t])
        steps.append(dists.log_p0.gather(1, tokens[:, t + 1 : t + 2]))
    torch.testing.assert_close(full, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=1e-5, rtol=0)
    assert dists.log_psi.shape == (3, 12)


def test_a_model_whose_logits_are_not_its_head_output_is_refused(tiny_lm_dirs):
    from transformers import GPT2LMHeadModel

    from smclm.models.twisted_lm import check_output_head

    class Tempered(GPT2LMHeadModel):  # an unknown transform after the head
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    base = Tempered.from_pretrained(tiny_lm_dirs["gpt2"])
    with torch.no_grad():
        base.get_output_embeddings().weight.normal_(0, 1.0)
    with pytest.raises(ValueError, match="Tempered.* is not supported"):
        check_output_head(base, "model.name=tempered")
    check_output_head(GPT2LMHeadModel.from_pretrained(tiny_lm_dirs["gpt2"]), "model.name=gpt2")


def test_the_frozen_body_encodes_each_o_once_per_run(tiny_lm_dirs):
    """A head on the frozen body remembers g(o): a later call sends only o rows it has not seen
    through the body, with the same values as the body's; a body moved to another dtype is
    asked again; the memo starts over when it is full; the trained body copy has no memo."""
    base, _ = load_base_model(tiny_lm_dirs["gpt_neo"], torch.float32, "cpu")
    twist = build_twist("head", base, head="mlp", conditional=True)
    body = base.base_model
    rows: list[int] = []
    hook = body.register_forward_hook(lambda _m, args, kw, _o: rows.append(kw["input_ids"].shape[0]),
                                      with_kwargs=True)  # fmt: skip
    o1 = torch.tensor([[1, 2], [3, 4], [1, 2]])
    o2 = torch.tensor([[3, 4], [5, 6], [5, 6], [1, 2]])
    try:
        first = twist.encode_cond(o1)
        second = twist.encode_cond(o2)
        assert rows == [2, 1]  # [5, 6] is the only new row
        d = first.shape[1]  # a remembered row holds its batch's [U, d], not [U, c, d] (float32)
        assert all(r.untyped_storage().nbytes() <= 2 * d * 4 for r in twist._memo.values())
        with torch.no_grad():
            want = body(input_ids=o2).last_hidden_state[:, -1]
        rows.clear()
        torch.testing.assert_close(second, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(second[0], first[1], atol=0, rtol=0)
        base.to(torch.float64)
        again = twist.encode_cond(o2)
        assert rows == [3] and again.dtype == torch.float32
        rows.clear()
        twist.MEMO_ROWS = 4  # 6 rows remembered (3 per dtype) + 1 new > 4: it starts over
        twist.encode_cond(torch.tensor([[7, 8]]))
        assert rows == [1] and len(twist._memo) == 1
    finally:
        hook.remove()
    assert not hasattr(build_twist("separate", base, head="mlp", conditional=True), "_memo")


@pytest.mark.parametrize("kind", ["head", "separate"])
def test_each_distinct_o_is_encoded_once(tiny_lm_dirs, kind):
    """The particles of a run share o: g(o) is computed once per distinct row, and equals the
    per-row encoding (values and, for the trained body copy, gradients)."""
    base, _ = load_base_model(tiny_lm_dirs["gpt_neo"], torch.float32, "cpu")
    twist = build_twist(kind, base, head="mlp", conditional=True)
    body = twist.body if kind == "separate" else base.base_model
    o = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3], [7, 8, 9], [4, 5, 6], [1, 2, 3]])
    rows: list[int] = []
    hook = body.register_forward_hook(lambda _m, args, kw, _o: rows.append(kw["input_ids"].shape[0]),
                                      with_kwargs=True)  # fmt: skip
    try:
        got = twist.encode_cond(o)
    finally:
        hook.remove()
    assert rows == [3]
    if kind == "separate":
        want = torch.cat([twist.encode_cond(o[i : i + 1]) for i in range(o.shape[0])])
    else:  # the frozen body would answer from its memo: the body itself, row by row
        with torch.no_grad():
            want = torch.cat([body(input_ids=o[i : i + 1]).last_hidden_state[:, -1]
                              for i in range(o.shape[0])])  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    if kind == "separate":
        grads = []
        for enc in (lambda: got, lambda: want):
            twist.zero_grad()
            (enc() * torch.arange(6.0)[:, None]).sum().backward(retain_graph=True)
            grads.append(torch.cat([p.grad.flatten() for p in twist.body.parameters()
                                    if p.grad is not None]))  # fmt: skip
        # float32 sums in another order: equal to 1e-4 of the largest gradient entry
        assert (grads[0] - grads[1]).abs().max() <= 1e-4 * grads[1].abs().max()


def test_a_model_without_a_separable_head_is_refused_in_one_line(tiny_lm_dirs):
    from transformers import GPT2LMHeadModel

    from smclm.models.twisted_lm import check_output_head

    class Headless(GPT2LMHeadModel):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match=r"cannot be run apart \(AttributeError") as err:
        check_output_head(Headless.from_pretrained(tiny_lm_dirs["gpt2"]), "model.name=headless")
    assert "\n" not in str(err.value)


def test_an_embedding_output_head_scores_each_token_by_its_output_embedding(tiny_lm_dirs):
    """twist.output=embedding: log ψ(v) = u(h)·ê_v + b·ê_v with ê_v the base's output embedding
    scaled to unit mean L1 norm (checked against the formula with the head's own layers); an
    unknown output is refused."""
    base, _ = load_base_model(tiny_lm_dirs["gpt2"], torch.float32, "cpu")
    twist = build_twist("head", base, head="linear", output="embedding")
    lin = twist.head.net[-1]
    with torch.no_grad():
        lin.weight.normal_(0, 0.3)
        lin.bias.normal_(0, 0.3)
    h = torch.randn(3, lin.in_features)
    emb = base.get_output_embeddings().weight.float()
    emb = emb / emb.abs().sum(1).mean()  # unit mean L1 norm (Adam's steps as a vocab head's)
    torch.testing.assert_close(twist.head(h), (h @ lin.weight.T + lin.bias) @ emb.T)
    with pytest.raises(ValueError, match="twist output"):
        build_twist("head", base, head="linear", output="logits")


def test_the_output_head_runs_on_a_2d_input_for_a_sliced_3d_one():
    """output_logits hands the head rows [n, d]: on a non-contiguous slice of positions [B, t, d]
    a linear layer on the CPU runs as a batched matmul that copies the [V, d] weight once per row
    (most of a bfloat16 infilling update's time on SmolLM2, less in float32; scripts/bench_smc.py
    --sections eval). The logits keep their shape and values, the architecture's transform
    included."""
    from smclm.models.twisted_lm import output_logits

    base = _arch("gemma2")  # soft-capped logits: the transform follows the reshaped head
    h = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(0))[:, 2:4]
    assert not h.is_contiguous()
    seen = []
    hook = base.get_output_embeddings().register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].dim())
    )
    with torch.no_grad():
        got = output_logits(base, h)
        want = output_logits(base, h.contiguous()[0])  # one row group, 2-D already
    hook.remove()
    assert seen == [2, 2]
    assert got.shape == (3, 2, 12)
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=0)
    cap = base.config.final_logit_softcapping
    assert got.abs().max() <= cap  # soft-capping applied after the head
