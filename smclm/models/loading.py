"""Loading the frozen base LM (Hugging Face name or local directory, or the in-process toy world)
and building the twist the config asks for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
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
    """``auto`` = bfloat16 on a GPU that supports it, float32 otherwise: the dtype a model is
    loaded in. On a CPU, ``model.dtype=auto`` then decides with the loaded model
    (:func:`auto_cpu_dtype`: bfloat16 only where it is native, pays and agrees with float32)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"model.dtype={name} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cast_floating(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model's floating parameters and saved (persistent) floating buffers cast to ``dtype``,
    in place (tied weights stay tied). Non-persistent buffers keep their dtype: they are constants
    the model computed itself, such as Llama's rotary frequencies ``inv_freq``, which in bfloat16
    shift the phase at position 100 by up to ~0.4 rad (SmolLM2's log p₀ moved 1.5x more per
    token with them cast than without)."""
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in list(mod._buffers.items()):
            if b is None or not b.is_floating_point() or name in mod._non_persistent_buffers_set:
                continue
            mod._buffers[name] = b.to(dtype)
    return model


# -- model.dtype=auto on a CPU ------------------------------------------------------------------
# bfloat16 pays on a CPU only where its matrix units are native (AVX512-BF16, AMX; elsewhere
# torch emulates it: SmolLM2 ran 2x slower in bfloat16 than in float32 on an AVX2-only EPYC) and
# only for models whose passes are mostly matrix products. Measured on 2 cores (float32, a
# teacher-forced pass of 32 sequences of 16 tokens), the share of the time that is matrix products
# was 5% for the toy world (0.09M parameters), 8% at 0.8M, 22% at 5M, 48% at 24M and 54% for
# SmolLM2's shape (135M): below ~20M parameters even a 3x faster product gains little, and the
# casts that bfloat16 adds around the float32 log-softmax cost more.
BF16_MIN_PARAMS = 20_000_000
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class BF16Tolerance:
    """How close per-token log p₀ and log q (nats) of a bfloat16 model must be to float32's.

    What smclm estimates (KL, log Ẑ bounds) are averages over sequences of sums over T tokens of
    such log-probabilities, with standard errors of ~0.1 nats. bfloat16's per-token errors are
    rounding noise of mean ~0 (SmolLM2: signed mean ≤ 0.007 nats/token, mean |Δ| 0.03-0.05):
    ``mean`` bounds the systematic part, which is what would bias an estimate (≤ 0.02 nats/token:
    ≤ 0.1 nats, one standard error, on a 5-token task; T = 2 for infilling); ``mean_abs`` bounds
    the noise, which averages out over sequences; ``max_abs``: no token's probability moves by
    more than a factor e."""

    max_abs: float = 1.0
    mean_abs: float = 0.1
    mean: float = 0.02

    def check(self, d: torch.Tensor) -> tuple[bool, dict[str, float]]:
        """(within the tolerance, {max_abs, mean_abs, mean}) of the differences ``d``."""
        stats = {
            "max_abs": float(d.abs().max()),
            "mean_abs": float(d.abs().mean()),
            "mean": float(d.mean()),
        }
        ok = (
            stats["max_abs"] <= self.max_abs
            and stats["mean_abs"] <= self.mean_abs
            and abs(stats["mean"]) <= self.mean
        )
        return ok, stats


BF16_TOLERANCE = BF16Tolerance()
# the load-time probe: a short everyday text (38 SmolLM2 tokens), teacher-forced
BF16_PROBE_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she found a big red ball under a tree."
)


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has native bfloat16 matrix instructions (a flag of ``CPU_BF16_FLAGS`` in
    /proc/cpuinfo; False where that cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}
    return any(f in flags for f in CPU_BF16_FLAGS)


def probe_ids(tokenizer: Any, vocab: int, text: str = BF16_PROBE_TEXT) -> torch.Tensor:
    """The probe's token ids [1, L]: ``text`` encoded, or (a tokenizer that cannot encode it, such
    as the toy world's) 32 fixed pseudo-random ids."""
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        unk = getattr(tokenizer, "unk_token_id", None)
        if len(ids) >= 2 and (unk is None or unk not in ids) and max(ids) < vocab:
            return torch.tensor([ids], dtype=torch.long)
    except Exception:
        pass
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, 32), generator=gen)


def probe_head(base: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """A float32 MLP twist head (:class:`smclm.models.twist.Head`) on the base whose output layer
    has small random weights N(0, std²) (zero-initialised, log ψ ≡ 0 would make log q = log p₀),
    drawn without touching torch's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Head(hidden_dim(base), vocab_size(base), "mlp")
        with torch.no_grad():
            head.net[-1].weight.normal_(0.0, std)
    device = next(base.parameters()).device
    return head.to(device=device, dtype=torch.float32).eval()


@torch.no_grad()
def token_log_pq(
    base: nn.Module, ids: torch.Tensor, head: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced per-token log p₀(ids[:, t] | ids[:, <t]) [B, L-1] (float32, as the sampler
    computes it: :func:`smclm.models.twisted_lm.output_logits`, then log-softmax in float32) and,
    with a twist ``head``, log q = log_softmax(log p₀ + log ψ) at the same tokens (None without)."""
    import torch.nn.functional as F

    from smclm.models.twisted_lm import output_logits

    device = next(base.parameters()).device
    ids = ids.to(device)
    h = base.base_model(input_ids=ids[:, :-1]).last_hidden_state
    log_p0_all = F.log_softmax(output_logits(base, h), dim=-1)
    target = ids[:, 1:, None]
    log_p0 = log_p0_all.gather(-1, target).squeeze(-1)
    if head is None:
        return log_p0, None
    log_q_all = F.log_softmax(log_p0_all + head(h).float(), dim=-1)
    return log_p0, log_q_all.gather(-1, target).squeeze(-1)


def auto_cpu_dtype(
    base: nn.Module,
    tokenizer: Any,
    *,
    min_params: int | None = None,
    tolerance: BF16Tolerance | None = None,
    has_bf16: bool | None = None,
) -> tuple[torch.dtype, str]:
    """``model.dtype=auto`` on a CPU, for a base loaded in float32: bfloat16 when (a) the CPU has
    native bfloat16 (:func:`cpu_has_bf16`), (b) the model has at least ``min_params`` parameters
    (default ``BF16_MIN_PARAMS``) and (c) the probe agrees: per-token log p₀ of
    ``BF16_PROBE_TEXT`` and log q with a random twist head (:func:`probe_head`), bfloat16 against
    float32, within ``tolerance`` (default ``BF16_TOLERANCE``); else float32. Casts ``base`` in
    place (:func:`cast_floating`) when bfloat16 is chosen, and leaves it exactly as it was
    otherwise. Returns (the dtype, one line saying why)."""
    min_params = BF16_MIN_PARAMS if min_params is None else min_params
    tolerance = BF16_TOLERANCE if tolerance is None else tolerance
    if has_bf16 is None:
        has_bf16 = cpu_has_bf16()
    if not has_bf16:
        return torch.float32, (
            f"this CPU has no native bfloat16 ({' or '.join(CPU_BF16_FLAGS)} not in "
            "/proc/cpuinfo): bfloat16 would be emulated and slower"
        )
    n = sum(p.numel() for p in base.parameters())
    if n < min_params:
        return torch.float32, (
            f"{n / 1e6:.3g}M parameters < {min_params / 1e6:g}M: too small for bfloat16 to pay"
        )
    ids = probe_ids(tokenizer, vocab_size(base))
    head = probe_head(base)
    ref_p0, ref_q = token_log_pq(base, ids, head)
    params = [p for p in base.parameters() if p.is_floating_point()]
    kept = [p.data for p in params]  # float32 weights, restored if the probe fails
    buffers = [
        (mod, name, b)
        for mod in base.modules()
        for name, b in mod._buffers.items()
        if b is not None and b.is_floating_point()
    ]
    cast_floating(base, torch.bfloat16)
    p0, q = token_log_pq(base, ids, head)
    assert q is not None and ref_q is not None
    ok_p0, s_p0 = tolerance.check(p0 - ref_p0)
    ok_q, s_q = tolerance.check(q - ref_q)
    shown = (
        f"log p₀ max|Δ| {s_p0['max_abs']:.3f}, mean|Δ| {s_p0['mean_abs']:.3f}, mean Δ "
        f"{s_p0['mean']:+.3f}; log q max|Δ| {s_q['max_abs']:.3f}, mean|Δ| {s_q['mean_abs']:.3f}, "
        f"mean Δ {s_q['mean']:+.3f} nats over {ref_p0.numel()} probe tokens"
    )
    limits = (
        f"tolerance max|Δ| ≤ {tolerance.max_abs}, mean|Δ| ≤ {tolerance.mean_abs}, "
        f"|mean Δ| ≤ {tolerance.mean}"
    )
    if ok_p0 and ok_q:
        return torch.bfloat16, (
            f"native bfloat16 CPU, {n / 1e6:.3g}M parameters, and bfloat16 agrees with float32: "
            f"{shown} ({limits})"
        )
    for p, data in zip(params, kept):
        p.data = data
    for mod, name, b in buffers:
        mod._buffers[name] = b
    return torch.float32, f"bfloat16 disagrees with float32 on the probe: {shown} ({limits})"


def dtype_name(dtype: torch.dtype) -> str:
    """``float32``, ``bfloat16``, …: a torch dtype as ``model.dtype`` spells it."""
    return str(dtype).replace("torch.", "")


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
    model = cast_floating(model.to(device=device), dtype).eval()
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
