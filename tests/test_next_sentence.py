"""task=next_sentence (issue 23; Hu et al. §4.1): the banned list rebuilt per tokenizer (a tiny
GPT-2-style byte-level BPE and SmolLM2's real one), the logit bias applied to p₀ by the model,
the prompt sets, and a training run end to end through the CLI on a tiny GPT-2."""

import pytest
import torch
from conftest import byte_level_tokenizer, run_smclm, save_tiny_gpt2_with
from hydra import compose, initialize_config_module

from smclm.build import build_world
from smclm.errors import ConfigError
from smclm.tasks.next_sentence import (
    BANNED,
    banned_token_ids,
    builtin_prompts,
    load_prompts,
)

# Each should be banned wherever it is one token; with and without a leading space.
MUST_BAN = ["?", "!", "\n", "A", " A", "Z", " Mr", "Mr", " Dr", " St", " etc", " No", '"', "..."]
MUST_KEEP = [" the", " cat", "."]


def gpt2_style_tokenizer():
    """A small GPT-2-style byte-level BPE (Ġ space markers, <|endoftext|> as EOS), trained on
    the built-in prompts and text with the banned strings, so that they are single tokens."""
    corpus = builtin_prompts() * 3
    corpus += [
        'Mr Smith and Dr Who met St Paul. A cat sat. Z is "odd", etc. No way?! ...\nthe cat.'
    ] * 20
    return byte_level_tokenizer(corpus, 400)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 with the GPT-2-style tokenizer, saved for from_pretrained."""
    path = tmp_path_factory.mktemp("next_sentence_gpt2")
    return save_tiny_gpt2_with(gpt2_style_tokenizer(), path)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from smclm.models import gguf

    return AutoTokenizer.from_pretrained(str(gguf.dequantised_dir(gguf.packaged_gguf("smollm2"))))


def one_token(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def check_banned_list(tok):
    v = len(tok)
    banned = set(banned_token_ids(tok, v))
    single = {s: one_token(tok, s) for s in MUST_BAN + MUST_KEEP}
    present = [s for s in MUST_BAN if single[s] is not None]
    assert len(present) >= 10, f"too few of {MUST_BAN} are single tokens: {present}"
    for s in present:
        assert single[s] in banned, f"{s!r} (id {single[s]}) is not banned"
    for s in MUST_KEEP:
        assert single[s] is not None and single[s] not in banned, f"{s!r} is banned"
    assert tok.eos_token_id in banned
    stop = tok("A sentence.", add_special_tokens=False)["input_ids"][-1]
    assert stop == single["."]  # the paper's stop id: the last token of "A sentence."
    assert 0 < len(banned) < v // 2
    return banned


def test_the_banned_list_resolves_on_a_gpt2_style_tokenizer():
    tok = gpt2_style_tokenizer()
    assert tok.convert_ids_to_tokens(one_token(tok, " cat"))[0] == "Ġ"  # GPT-2's space marker
    banned = check_banned_list(tok)
    # every single capital letter (a byte-level token) is banned
    assert {one_token(tok, chr(c)) for c in range(65, 91)} <= banned


def test_the_banned_list_resolves_on_smollm2s_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    banned = check_banned_list(tok)
    assert {0, 1, 2} <= banned  # <|endoftext|>, <|im_start|>, <|im_end|>
    assert one_token(tok, "U.S") is None  # several tokens: no assertion that entries are single
    assert "U.S" in BANNED


def test_the_logit_bias_is_applied_to_p0_everywhere(tiny_gpt2_dir):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["task=next_sentence", f"model.name={tiny_gpt2_dir}", "device=cpu"],
        )
    world = build_world(cfg)
    model, task, tok = world.model, world.task, world.tokenizer
    bias = task.logit_bias
    banned = (bias < 0).nonzero().squeeze(1)
    assert float(bias[banned[0]]) == -50.0 and int(bias.ne(0).sum()) == banned.numel()
    tokens = torch.tensor([[one_token(tok, " cat"), one_token(tok, "?"), task.stop_ids[0]]])
    log_p0, _ = model.forward_full(task.prompt_ids, tokens)  # teacher forcing
    ids = torch.cat([task.prompt_ids[None], tokens[:, :-1]], dim=1)
    with torch.no_grad():
        raw = model.base(input_ids=ids).logits[:, task.prompt_ids.numel() - 1 :].float()
    expected = torch.log_softmax(raw + bias, dim=-1)
    torch.testing.assert_close(log_p0, expected, rtol=0, atol=1e-5)
    assert float(log_p0[0, 1, one_token(tok, "?")]) < float(raw.log_softmax(-1)[0, 1].min()) - 40
    # incremental sampling sees the same p̃₀
    _, dists = model.start(task.prompt_ids, 1)
    torch.testing.assert_close(dists.log_p0[0], expected[0, 0], rtol=0, atol=1e-5)
    # the bias is the model's, not the checkpoint's: the state dict holds no copy of it
    assert not any("smclm" in k for k in model.state_dict())
    # a full (or LoRA) policy, a copy of the LM, gets the same bias: at the start log q = log p̃₀
    from smclm.models.policy import build_policy
    from smclm.models.twisted_lm import TwistedLM

    with_policy = TwistedLM(model.base, None, build_policy("full", model.base))
    with_policy.set_logit_bias(bias)
    log_p0_again, log_q = with_policy.policy_full(task.prompt_ids, tokens)
    torch.testing.assert_close(log_p0_again, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(log_q.detach(), expected, rtol=0, atol=1e-5)


def test_builtin_prompts_are_deterministic_and_the_split_is_disjoint(tmp_path):
    a, b = builtin_prompts(), builtin_prompts()
    assert a == b and len(set(a)) == 60
    train, test = load_prompts("builtin", 50, 10)
    assert len(train) == 50 and len(test) == 10 and not set(train) & set(test)
    assert all(s.endswith(".") and s[0].isupper() for s in a)
    f = tmp_path / "prompts.txt"
    f.write_text("One prompt. \nTwo prompts.\nThree.\n")
    assert load_prompts(str(f), 2, 1) == (["One prompt. ", "Two prompts."], ["Three."])
    with pytest.raises(ConfigError, match=r"has 3 prompts, fewer than task.n_train \+ task.n_test"):
        load_prompts(str(f), 3, 1)


def test_train_next_sentence_end_to_end_from_the_cli(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "run"
    res = run_smclm(
        "train",
        "task=next_sentence",
        f"model.name={tiny_gpt2_dir}",
        "method=ctl",
        "train.updates=1",
        "train.eval_every=1",
        "train.progress=false",
        "smc.n_particles=4",
        "evaluator=bounds",
        "evaluator.particles=[4]",
        "evaluator.n_exact=2",
        "evaluator.proposals=[twist]",
        "exact_samples.n=4",
        "exact_samples.batch_size=256",
        f"exact_samples.cache_dir={tmp_path / 'cache'}",
        "device=cpu",
        f"hydra.run.dir={out}",
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (out / "summary.json").is_file()


def test_a_prompt_index_outside_the_split_is_refused_in_one_line(tiny_gpt2_dir):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "task=next_sentence",
                f"model.name={tiny_gpt2_dir}",
                "task.split=test",
                "task.prompt_index=10",
                "device=cpu",
            ],
        )
    with pytest.raises(ConfigError, match=r"task.prompt_index=10 is outside the 10 test prompts"):
        build_world(cfg)


# -- the tempered target and training on every prompt ---------------------------------------------


def _world(tiny_gpt2_dir, *extra):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["task=next_sentence", f"model.name={tiny_gpt2_dir}", "device=cpu", *extra],
        )
    return cfg, build_world(cfg)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_the_tempered_potential_is_the_samplers_log_p0_to_the_power(tiny_gpt2_dir, tau):
    """task.tau = τ: log φ = (1/τ − 1)·log p̃₀(Z | X) on every finished sample, where log p̃₀ is
    the sampler's own accumulated log p₀ (the stop's probability included, the forced stop at the
    cap too); so p₀·φ = p̃₀^{1/τ}. Checked on p₀ samples of several lengths, for a second prompt
    after Task.for_prompt as well."""
    from smclm.smc.sampler import run_smc

    _, world = _world(tiny_gpt2_dir, "task.output_len=6")
    # 80 allowed tokens as stops, so that this random model stops at every length
    stops = (world.task.logit_bias == 0).nonzero().squeeze(1)[:80].tolist()
    _, world = _world(
        tiny_gpt2_dir,
        f"task.tau={tau}",
        "task.output_len=6",
        f"task.stop=[{','.join(map(str, stops))}]",
    )
    task, model = world.task, world.model
    assert task.log_phi_max == (0.0 if tau <= 1 else None)
    for t in (task, task.for_prompt(task.test_prompts[3])):
        res = run_smc(
            model.with_twist(None),
            t.prompt_ids,
            t.output_len,
            t.bind(),
            64,
            ess_threshold=0.0,
            generator=torch.Generator().manual_seed(0),
            stopping=t.stopping,
        )
        assert len(set(res.lengths.tolist())) >= 3  # several lengths, the cap among them
        assert int(res.lengths.max()) == t.output_len
        expected = (1.0 / tau - 1.0) * res.log_p0
        torch.testing.assert_close(res.log_phi, expected, rtol=1e-4, atol=1e-3)
        # the potential's own teacher-forced pass (the sampler takes log φ from its log p̃₀)
        torch.testing.assert_close(t.log_phi(res.tokens), expected, rtol=1e-4, atol=1e-3)
    # the rebound potential does depend on the prompt
    z = res.tokens[:4]
    assert not torch.allclose(task.log_phi(z), task.for_prompt(task.test_prompts[3]).log_phi(z))


def test_tau_must_be_positive(tiny_gpt2_dir):
    with pytest.raises(ConfigError, match=r"task.tau=0.0 must be a positive number"):
        _world(tiny_gpt2_dir, "task.tau=0")


def test_prompt_index_all_holds_every_train_prompt_and_the_test_split(tiny_gpt2_dir):
    _, world = _world(tiny_gpt2_dir, "task.prompt_index=all")
    task = world.task
    assert len(task.train_prompts) == 50 and len(task.test_prompts) == 10
    assert torch.equal(task.prompt_ids, task.train_prompts[0])
    texts = {world.tokenizer.decode(p) for p in task.train_prompts + task.test_prompts}
    assert len(texts) == 60  # distinct prompts, train and test disjoint
    _, one = _world(tiny_gpt2_dir, "task.prompt_index=7")
    assert len(one.task.train_prompts) == 1 and torch.equal(
        one.task.prompt_ids, task.train_prompts[7]
    )
    with pytest.raises(ConfigError, match=r"task.prompt_index=all .* needs task.split=train"):
        _world(tiny_gpt2_dir, "task.prompt_index=all", "task.split=test")


def test_gfn_trains_on_every_prompt_with_a_replay_buffer_per_prompt(tiny_gpt2_dir):
    """With task.prompt_index=all the trainer draws one prompt per update for all K particles;
    GFlowNet's samples are those of that prompt (its log R is scored under it) and its replay
    buffer is keyed by the prompt."""
    from smclm.methods.base import TrainContext
    from smclm.train import _draw_prompt

    cfg, world = _world(
        tiny_gpt2_dir, "task.prompt_index=all", "method=gfn", "task.output_len=6", "task.tau=0.5"
    )
    task, model, method = world.task, world.model, world.learner
    batch = TrainContext(model, task, 4, torch.Generator().manual_seed(0))
    method.setup(batch, 1e-3)
    assert method.loss_kind == "modified_subtb"
    drawn = []
    for _ in range(12):
        _draw_prompt(batch, task)
        drawn.append(tuple(batch.task.prompt_ids.tolist()))
        method.update(batch)
    assert len(set(drawn)) >= 8  # 12 draws from 50 prompts
    keys = set(method.buffer._heaps)
    assert keys and keys <= set(drawn) and len(keys) >= 6
    # the potential follows the prompt: the tempered log φ of a batch under its own prompt
    z = torch.tensor([[task.stop_ids[0]] * 1 + [task.stop_ids[0]] * 5])
    assert batch.task.log_phi(z).item() != pytest.approx(task.log_phi(z).item())


def test_gfn_with_one_log_z_refuses_many_prompts(tiny_gpt2_dir):
    from smclm.methods.base import TrainContext

    _, world = _world(
        tiny_gpt2_dir, "task.prompt_index=all", "method=gfn", "method.loss=tb", "task.tau=0.5"
    )
    batch = TrainContext(world.model, world.task, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"learns one log Z, but training draws from 50 prompts"):
        world.learner.setup(batch, 1e-3)


def test_training_on_every_prompt_refuses_an_evaluator_that_needs_exact_samples(
    tiny_gpt2_dir, tmp_path
):
    res = run_smclm(
        "train",
        "task=next_sentence",
        f"model.name={tiny_gpt2_dir}",
        "task.prompt_index=all",
        "method=ctl",
        "evaluator=bounds",
        "train.updates=1",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert any("training draws from 50 prompts" in line for line in err), res.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_modified_subtb_takes_the_tempered_prefix_rewards_from_log_p0(tiny_gpt2_dir):
    """Modified SubTB's prefix rewards log φ(z_1:i ⊤) come from its own log p̃₀ when φ is a
    power of p̃₀ (Task.log_phi_from_log_p0); the loss equals the one that calls the potential
    on every prefix + stop."""
    from dataclasses import replace

    from smclm.methods.base import TrainContext

    _, world = _world(tiny_gpt2_dir, "method=gfn", "task.output_len=6", "task.tau=0.7")
    task, model, method = world.task, world.model, world.learner
    batch = TrainContext(model, task, 8, torch.Generator().manual_seed(0))
    method.setup(batch, 1e-3)
    with torch.no_grad():
        res = batch.sample(ess_threshold=0.0)
    log_r = res.log_p0 + res.log_phi
    plain = replace(task, potential=lambda z, c=None: task.potential(z, c))  # no exponent
    assert plain.log_phi_from_log_p0(res.log_p0) is None
    losses = []
    for t in (task, plain):
        batch.task = t
        loss, _, _ = method.batch_loss(batch, res.tokens, log_r, 1.0, None, None)
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-4)
