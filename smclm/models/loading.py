"""Loading the frozen base LM (Hugging Face name or local directory, or the in-process toy world)
and building the twist the config asks for."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from smclm.errors import UserError
from smclm.models.twist import Head, HeadTwist, SeparateTwist
from smclm.models.twisted_lm import check_output_head, hidden_dim, vocab_size

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(UserError):
    pass


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device={name} but CUDA is not available here; use device=auto or cpu"
        )
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bfloat16 on a GPU that supports it, float32 otherwise."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"model.dtype={name} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_architecture(config: Any, suffixes: str | tuple[str, ...], what: str, kind: str) -> None:
    """Refuse a checkpoint whose saved architecture is not of the expected kind (one line)."""
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(suffixes) for a in archs):
        raise ModelLoadError(
            f"{what} is a {archs[0]}, not {kind}; give {kind} there "
            "(did you swap model.name and task.classifier?)"
        )


def load_pretrained(
    name: str,
    key: str,
    model_cls: Any,
    suffixes: str | tuple[str, ...],
    kind: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, Any]:
    """A frozen model of ``model_cls`` (an ``AutoModelFor…``) and its tokenizer from a Hub name or
    a local directory, refused with one line (naming ``key``) when it is missing, cannot be
    loaded, or its saved architecture does not end with ``suffixes`` (it is not ``kind``)."""
    from transformers import AutoConfig, AutoTokenizer

    path = os.path.expanduser(name)
    # A Hub name is "name" or "org/name"; anything path-like must be an existing directory.
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not os.path.isdir(path):
        raise ModelLoadError(
            f"{key}={name}: no such directory; give an existing directory or a Hugging Face "
            "model name"
        )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise for a sub-second step
    try:
        config = AutoConfig.from_pretrained(path)
        check_architecture(config, suffixes, f"{key}={name}", kind)
        tok = AutoTokenizer.from_pretrained(path)
        model = model_cls.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not load {key}={name} ({first}); give a local directory with "
            "config.json and weights, or a Hub name while online (HF_HUB_OFFLINE unset)"
        ) from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return _frozen(model, dtype, device), tok


def prompt_prefix(tokenizer: Any) -> list[int]:
    """The special tokens a prompt starts with: ``[bos_token_id]`` when the tokenizer puts a BOS
    in front of text it encodes with its special tokens (Llama 2/3, Mistral), else ``[]`` (the
    GPT-2 family, GPT-Neo, SmolLM2, the toy world). End-of-text and other special tokens are
    never added: the prompt is continued, not closed."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    try:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer that cannot encode "a" (the toy one): no BOS rule to read
        return []
    if with_special[:1] == [bos] and plain[:1] != [bos]:
        return [int(bos)]
    return []


def _frozen(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_base_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    toy: dict[str, Any] | None = None,
    gguf_file: str | None = None,
) -> tuple[nn.Module, Any]:
    """A frozen causal LM and its tokenizer (the ``model`` config's name, dtype, toy, gguf_file).

    name: a Hub name, a local directory, 'toy' (the in-process toy world), or a packaged GGUF
    model (``smclm.models.gguf.PACKAGED``: 'smollm2'). gguf_file: a GGUF file inside the
    directory ``name``. GGUF checkpoints are dequantised once and cached (see
    :mod:`smclm.models.gguf`); the model is then loaded from the cached directory.
    """
    if name == "toy":
        from smclm.models.toy import build_toy_world

        model, tok = build_toy_world(**(toy or {}))
        return _frozen(model, dtype, device), tok
    from transformers import AutoModelForCausalLM

    from smclm.models.gguf import dequantised_dir, resolve_gguf

    path = name
    gguf = resolve_gguf(name, gguf_file)
    if gguf is not None:
        path = str(dequantised_dir(gguf))
    else:
        local = os.path.expanduser(name)
        ggufs = (
            sorted(f for f in os.listdir(local) if f.endswith(".gguf"))
            if os.path.isdir(local)
            else []
        )
        if ggufs and not os.path.isfile(os.path.join(local, "config.json")):
            raise ModelLoadError(
                f"model.name={name} holds GGUF files but no config.json; load one with "
                f"model=smollm2 model.name={name} model.gguf_file={ggufs[0]}"
            )
    model, tok = load_pretrained(
        path,
        "model.name",
        AutoModelForCausalLM,
        ("ForCausalLM", "LMHeadModel"),
        "a causal LM",
        dtype,
        device,
    )
    try:
        check_output_head(model, f"model.name={name}")
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    return model, tok


def build_twist(
    kind: str,
    base: nn.Module,
    *,
    head: str = "mlp",
    hidden_mult: int = 1,
    n_layers: int = 3,
    squash: str | None = None,
    conditional: bool = False,
    dtype: torch.dtype = torch.float32,
    output: str = "vocab",
) -> nn.Module | None:
    """kind: none (ψ ≡ 1) | head (on the frozen base) | separate (trainable copy of the body).
    output: vocab (the head's last layer maps to V) | embedding (to the base's embedding width,
    scored against its frozen output embeddings; :class:`smclm.models.twist.Head`)."""
    if kind == "none":
        return None
    d = hidden_dim(base)
    vocab = vocab_size(base)
    d_in = 2 * d if conditional else d
    device = next(base.parameters()).device
    emb = None
    if output == "embedding":
        out_layer = base.get_output_embeddings()
        if out_layer is None or getattr(out_layer, "weight", None) is None:
            raise ValueError(
                f"twist.output=embedding: {type(base).__name__} has no output embedding matrix; "
                "use twist.output=vocab"
            )
        emb = out_layer.weight[:vocab]
    h = Head(
        d_in, vocab, kind=head, hidden_mult=hidden_mult, n_layers=n_layers, squash=squash,
        output=output, embedding=emb,
    )  # fmt: skip
    if kind == "head":
        return HeadTwist(h.to(device=device, dtype=dtype), base.base_model if conditional else None)
    if kind == "separate":
        return SeparateTwist(base.base_model, h, dtype=dtype).to(device)
    raise ValueError(f"unknown twist.kind '{kind}'; choose none, head or separate")
