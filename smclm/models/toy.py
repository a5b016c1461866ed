"""The offline toy world: a tiny, peaked GPT-Neo causal LM with its own word-level tokenizer.

Everything is built in-process from a config and a seed (no files, no network), so tests can
enumerate all ``V**T`` continuations exactly (``V`` about 8-16, ``T <= 6``).

Weights come from a local ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched):
GPT-Neo blocks get variance-preserving Gaussian weights (residual branches scaled by 0.5), and the
token embeddings are ``V`` orthonormal, zero-mean directions ``e_i``. The untied output head is
``table @ E / sqrt(d)``, so that when the residual stream points along ``e_i`` the logits are about
``table[:, i]``: a noisy bigram skeleton where each token has one random favoured successor
(+1.0), ``U(-0.5, 0.5)`` noise, and a Zipf-like prior ``-0.35 * log(1 + id)`` (later words in
``TOY_WORDS`` are rarer); attention and MLPs add context dependence. The peaking transform is
the final layer norm weight, set to ``sharpness``: it multiplies every logit by exactly
``sharpness``. Because the embeddings are orthonormal the logits stay bounded, so no token gets
vanishing probability. Measured with the default ``sharpness=4.0``, ``seed=0`` and ``V=12`` over
1000 random contexts: mean next-token entropy 1.33 nats (uniform is ``log 12 = 2.48``), smallest
next-token probability 4e-5; P(at least 2 of T outputs are "bad") for T = 4, 5, 6 is 6.3e-4,
1.5e-3, 2.0e-3 after the prompt "the cat" and 6.5e-3, 1.0e-2, 1.4e-2 after "the".
"""

from __future__ import annotations

import math
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

TOY_WORDS: tuple[str, ...] = (
    "the", "cat", "dog", "sat", "on", "a", "mat", "and",
    "ran", "bad", "big", "end", "red", "sad", "hat", "sun",
)  # fmt: skip

_UNK = "<unk>"  # deliberately NOT in the vocabulary: unknown words make the tokenizer raise


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or not 2 <= vocab_size <= len(TOY_WORDS):
        raise ValueError(f"vocab_size must be between 2 and {len(TOY_WORDS)}, got {vocab_size!r}")


def build_toy_tokenizer(vocab_size: int = 12) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the first ``vocab_size`` words of ``TOY_WORDS`` (ids in order).

    Text is split on whitespace; no special tokens are ever added; decoding joins words with
    single spaces. ``eos_token`` and ``pad_token`` are the last word of the vocabulary (a real
    token, so ``skip_special_tokens=True`` drops it). An unknown word makes encoding raise
    (the WordLevel unk token is absent from the vocabulary); use :func:`encode_toy_prompt` for a
    clear ``ValueError``.
    """
    _check_vocab_size(vocab_size)
    words = TOY_WORDS[:vocab_size]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=_UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=words[-1],
        pad_token=words[-1],
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )


def encode_toy_prompt(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Encode ``text`` to token ids, raising ``ValueError`` for any word outside the vocabulary.

    This is the checked path for turning prompts into ids for the toy world.
    """
    vocab = tokenizer.get_vocab()
    for word in text.split():
        if word not in vocab:
            known = ", ".join(sorted(vocab, key=vocab.__getitem__))
            raise ValueError(f"word {word!r} is not in the toy vocabulary (known: {known})")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _toy_config(
    vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, max_positions: int
) -> GPTNeoConfig:
    eos = vocab_size - 1
    return GPTNeoConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        attention_types=[[["global"], num_layers]],
        max_position_embeddings=max_positions,
        window_size=max_positions,
        intermediate_size=4 * hidden_size,
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
        use_cache=True,
    )


_PEAK, _NOISE, _ZIPF, _BRANCH, _POS = 1.0, 0.5, 0.35, 0.5, 0.3


def _orthonormal_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` unit rows, zero-mean (so LayerNorm keeps them) and orthonormal when ``n < d``."""
    a = torch.randn(d, n, generator=gen)
    a = a - a.mean(dim=0, keepdim=True)
    if n < d:
        a = torch.linalg.qr(a).Q
    return (a / a.norm(dim=0, keepdim=True)).T.contiguous()


@torch.no_grad()
def _init_weights(model: GPTNeoForCausalLM, sharpness: float, seed: int) -> None:
    """Deterministically set every parameter from a local generator (see the module docstring)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cfg = model.config
    d, v = cfg.hidden_size, cfg.vocab_size
    head_dim = d // cfg.num_heads
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if ".ln_" in name:  # layer norms: identity
            param.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            param.zero_()
        elif "wpe" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * _POS)
        elif "wte" not in name and "lm_head" not in name:  # variance-preserving linear layers
            std = 1.0 / math.sqrt(param.shape[1])
            if "q_proj" in name:  # GPT-Neo does not scale q.k; fold 1/sqrt(head_dim) in here
                std /= math.sqrt(head_dim)
            if "out_proj" in name or "c_proj" in name:  # residual branches stay small
                std *= _BRANCH
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    # Bigram skeleton: token i favours successor succ[i]; U(-0.5,0.5) noise; Zipf-like prior by id.
    emb = _orthonormal_rows(v, d, gen)  # (v, d) unit rows
    succ = torch.randint(0, v, (v,), generator=gen)
    table = _NOISE * (2 * torch.rand(v, v, generator=gen) - 1)  # table[j, i]: logit of j after i
    table[succ, torch.arange(v)] += _PEAK
    table -= _ZIPF * torch.log1p(torch.arange(v, dtype=torch.float32))[:, None]
    model.transformer.wte.weight.copy_(emb * math.sqrt(d))
    model.lm_head.weight.copy_(table @ emb / math.sqrt(d))
    # The peaking transform: logits = lm_head(ln_f(h)) is linear in ln_f's weight (bias 0), so
    # setting that weight to `sharpness` multiplies every logit by exactly `sharpness`.
    model.transformer.ln_f.weight.fill_(float(sharpness))


def build_toy_model(
    vocab_size: int = 12,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 64,
    sharpness: float = 4.0,
    seed: int = 0,
) -> GPTNeoForCausalLM:
    """Build the toy GPT-Neo causal LM (float32, eval mode) with bit-identical weights per seed.

    Building does not consume or change the global torch RNG. ``sharpness`` multiplies all
    logits (larger = more peaked); the eos/pad id is ``vocab_size - 1``, matching the tokenizer.
    """
    _check_vocab_size(vocab_size)
    if sharpness <= 0:
        raise ValueError(f"sharpness must be positive, got {sharpness!r}")
    config = _toy_config(vocab_size, hidden_size, num_layers, num_heads, max_positions)
    with torch.random.fork_rng(devices=[]):  # construction-time init would touch the global RNG
        model = GPTNeoForCausalLM(config)
    model = model.to(torch.float32)
    _init_weights(model, sharpness, seed)
    return model.eval()


def build_toy_world(**kwargs) -> tuple[GPTNeoForCausalLM, PreTrainedTokenizerFast]:
    """Build the matching ``(model, tokenizer)`` pair; kwargs are those of :func:`build_toy_model`."""
    model = build_toy_model(**kwargs)
    return model, build_toy_tokenizer(model.config.vocab_size)


def save_toy_world(path: str | os.PathLike, **kwargs) -> None:
    """Save the toy model and tokenizer into ``path`` for offline ``Auto*.from_pretrained``."""
    model, tokenizer = build_toy_world(**kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
