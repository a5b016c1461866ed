"""Sentence continuation (Hu et al., ICLR 2024, §4.1; ``../shared/docs/gfn-paper-spec.md`` §1).

X = a prompt, Z = one sentence: 1–30 tokens then the stop "." (lengths count the stop, README
"Stopping": ``min_len`` = 2, ``output_len`` = 31). The reward is

    log R(Z) = log p̃₀(Z "." | X),   p̃₀(· | ·) ∝ exp(logits + b),   b_v = penalty (−50) on banned v,

the paper's ``vocab_alpha`` penalty. It is applied ONCE, as the task's logit bias b [V]
(:attr:`smclm.tasks.base.Task.logit_bias`), which the model adds in
:func:`smclm.models.twisted_lm.output_logits`, the one place where p₀'s logits (and a ``full`` /
``lora`` policy's) are made: sampling, teacher forcing, rewards and the policy all see p̃₀.
The potential is then φ ≡ 1 on finished sequences (``log_phi_max`` = 0), so σ ∝ p̃₀(Z "." | X)
exactly, restricted to 1–30 tokens before the stop. With ``task.tau`` = τ ≠ 1 the target is the
paper's tempered σ ∝ R^{1/τ} = p̃₀(Z "." | X)^{1/τ}, through the potential
log φ = (1/τ − 1)·log p̃₀(Z "." | X) (:class:`TemperedPotential`; one extra teacher-forced pass
of the base LM per scored batch), so that every sampler, learner and bound sees the tempered
target as an ordinary potential.

The banned list is written as strings (``task.banned``, ``task.banned_runs``,
``task.banned_contains``) and rebuilt for each tokenizer (:func:`banned_token_ids`): a token is
banned when its decoded text, leading spaces and space markers stripped, is one of
``task.banned``, or consists only of the characters of ``task.banned_runs`` and is at least two
characters long, or contains a character of ``task.banned_contains``; so are the tokenizer's EOS
and special tokens and the ids beyond its vocabulary. Unlike the paper's code, nothing asserts
that an entry is a single token.

Prompts: ``task.prompts`` is a text file (one prompt per line, the line break removed as the
paper does; lines 1..n_train are the training prompts, the next n_test the test prompts, the
paper's 950/50 of its 10 000 OpenWebText prompts) or ``builtin``: 60 short English sentences
that smclm composes from word lists with a fixed seed (:func:`builtin_prompts`; 50 train,
10 test; no download). The task conditions on one prompt, ``task.prompt_index`` of
``task.split``, or, with ``task.prompt_index=all``, training draws one training prompt per update
(all K particles share it, as the paper's micro-batches do; :attr:`Task.train_prompts`,
:meth:`Task.for_prompt`, ``smclm.train._draw_prompt``; GFlowNet's replay buffer is kept per
prompt). :attr:`Task.test_prompts` holds the test split for ``evaluator=sentences``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smclm.errors import ConfigError
from smclm.tasks.base import Task, choose_prompt, resolve_stop_ids
from smclm.tasks.plugin import TaskEnv

# The defaults of configs/task/next_sentence.yaml (the paper's illegal_tokens, as strings).
BANNED = (
    ["http", "https", "www", "://", "Â", "~", "^", "|"]
    + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    + ["Mr", "Mrs", "Ms", "Dr", "Prof", "Jr", "Sr", "St", "Av", "Ave", "vs", "etc", "No"]
    + ["US", "U.S", "Inc", "Ltd", "Co", "Mt", "Gen", "Gov", "Sen", "Lt", "Col"]
)
BANNED_RUNS = ".-=_*#~$@%^&|"
BANNED_CONTAINS = '\n\r\t"“”„«»?!'
SPACE_MARKERS = " Ġ▁"  # noqa: RUF001  (GPT-2's byte-level space, SentencePiece's)


def token_texts(tokenizer: Any, n: int) -> list[str]:
    """The decoded text of each of the first n token ids (one batched call)."""
    return list(tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False))


def special_ids(tokenizer: Any) -> set[int]:
    """EOS, the other special tokens and the added tokens marked special."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, tok in added.items() if getattr(tok, "special", False))
    return ids


def banned_token_ids(
    tokenizer: Any,
    vocab_size: int,
    banned: list[str] | tuple[str, ...] = tuple(BANNED),
    runs: str = BANNED_RUNS,
    contains: str = BANNED_CONTAINS,
) -> list[int]:
    """The ids in [0, vocab_size) that the strings ban for this tokenizer (module docstring)."""
    exact, run_chars, bad_chars = set(banned), set(runs), set(contains)
    n_text = min(int(vocab_size), len(tokenizer))
    out = set(special_ids(tokenizer)) | set(range(n_text, int(vocab_size)))
    for i, text in enumerate(token_texts(tokenizer, n_text)):
        core = text.lstrip(SPACE_MARKERS)
        if (
            core in exact
            or (len(core) >= 2 and set(core) <= run_chars)
            or any(c in bad_chars for c in text)
        ):
            out.add(i)
    return sorted(i for i in out if 0 <= i < vocab_size)


def logit_bias(vocab_size: int, ids: list[int], penalty: float) -> Tensor:
    """b [V] float32: ``penalty`` at ``ids``, 0 elsewhere."""
    bias = torch.zeros(int(vocab_size), dtype=torch.float32)
    if ids:
        bias[torch.tensor(ids, dtype=torch.long)] = float(penalty)
    return bias


# -- prompts ---------------------------------------------------------------------------------
_SUBJECTS = ("the old dog", "my sister", "the teacher", "a small bird", "the children",
             "our neighbour", "the farmer", "a young girl", "the cat", "my friend",
             "the baker", "an old man")  # fmt: skip
_VERBS = ("walked to", "looked at", "painted", "cleaned", "waited near", "found",
          "sat beside", "ran past", "talked about", "visited")  # fmt: skip
_OBJECTS = ("the river", "a red house", "the garden", "the little shop", "the station",
            "a quiet park", "the kitchen", "the bridge", "a tall tree", "the market")  # fmt: skip
_TIMES = ("this morning", "after lunch", "last night", "on sunday", "in the rain",
          "before school", "at noon", "yesterday")  # fmt: skip
BUILTIN_SEED = 23


def builtin_prompts(n: int = 60, seed: int = BUILTIN_SEED) -> list[str]:
    """n distinct short English sentences composed from word lists by a seeded RNG (the same
    on every machine: Python's ``random.Random`` is stable across versions for these calls)."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        s = f"{s} {rng.choice(_TIMES)}."
        seen.setdefault(s[0].upper() + s[1:], None)
    return list(seen)


def load_prompts(source: str, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """(train, test) prompts: lines 1..n_train and the next n_test of the file ``source`` (or of
    the built-in set, ``builtin``), each without its line break."""
    n_train, n_test = int(n_train), int(n_test)
    if n_train < 1 or n_test < 0:
        raise ConfigError(f"task.n_train={n_train} must be ≥ 1 and task.n_test={n_test} ≥ 0")
    if str(source) == "builtin":
        lines = builtin_prompts()
        where = "the built-in prompt set"
    else:
        path = Path(str(source)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"task.prompts={source}: no such file; give a text file with one prompt per "
                "line, or task.prompts=builtin"
            )
        lines = [ln.rstrip("\r\n") for ln in path.read_text(encoding="utf-8").splitlines()]
        where = f"task.prompts={source}"
    need = n_train + n_test
    if len(lines) < need:
        raise ConfigError(
            f"{where} has {len(lines)} prompts, fewer than task.n_train + task.n_test = "
            f"{n_train} + {n_test}; lower them or give a longer file"
        )
    train, test = lines[:n_train], lines[n_train:need]
    blank = [i + 1 for i, s in enumerate(lines[:need]) if not s.strip()]
    if blank:
        raise ConfigError(f"{where}: line {blank[0]} is blank; every prompt must have text")
    return train, test


class NoPotential:
    """log φ ≡ 0 on finished sequences: the target is p̃₀(Z "." | X) itself (τ = 1)."""

    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        return torch.zeros(tokens.shape[0], dtype=torch.float32, device=tokens.device)


class TemperedPotential:
    """log φ(Z) = (1/τ − 1)·log p̃₀(Z | X) on finished sequences Z (the stop included), so that
    p₀·φ = p̃₀^{1/τ}: the paper's tempered target σ ∝ R^{1/τ}. log p̃₀ comes from one
    teacher-forced pass of the base LM over [X, Z_<ℓ] through its output head, where the task's
    logit bias is added once the world is built (:func:`smclm.models.twisted_lm.output_logits`):
    the same p̃₀ as the sampler's. Bound to one prompt X; :meth:`for_prompt` rebinds it."""

    def __init__(self, base: Any, prompt_ids: Tensor, tau: float, batch_size: int = 64) -> None:
        self.base, self.prompt_ids, self.tau = base, prompt_ids, float(tau)
        # Task.log_phi_from_log_p0: callers holding log p̃₀ (the sampler, modified SubTB) use it
        self.log_p0_exponent = 1.0 / self.tau - 1.0
        self.batch_size = int(batch_size)

    def for_prompt(self, prompt_ids: Tensor) -> TemperedPotential:
        return TemperedPotential(self.base, prompt_ids, self.tau, self.batch_size)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        from smclm.models.twisted_lm import token_log_probs

        dev = next(self.base.parameters()).device
        p_len = self.prompt_ids.numel()
        out = []
        for i in range(0, tokens.shape[0], self.batch_size):
            z = tokens[i : i + self.batch_size].to(dev)
            prompt = self.prompt_ids.to(dev)[None].expand(z.shape[0], -1)
            ids = torch.cat([prompt, z[:, :-1]], dim=1)
            h = self.base.base_model(input_ids=ids).last_hidden_state[:, p_len - 1 :]
            out.append(token_log_probs(self.base, h, z).sum(1))
        log_p = torch.cat(out).to(tokens.device) if out else tokens.new_zeros(0).float()
        return self.log_p0_exponent * log_p


def next_sentence_task(
    env: TaskEnv,
    *,
    name: str,
    prompt: str,
    output_len: int,
    stop: Any = ".",
    min_len: int = 2,
    prompts: str = "builtin",
    n_train: int = 50,
    n_test: int = 10,
    split: str = "train",
    prompt_index: int | str = 0,
    tau: float = 1.0,
    penalty: float = -50.0,
    banned: list[str] | None = None,
    banned_runs: str = BANNED_RUNS,
    banned_contains: str = BANNED_CONTAINS,
    cond_len: int = 0,
) -> Task:
    """The task of configs/task/next_sentence.yaml. ``prompt`` (the config's placeholder) is not
    used: the prompt is line ``prompt_index`` of ``split`` in ``prompts``; ``prompt_index=all``
    (split train only) trains on every training prompt, one drawn per update (the task's
    ``prompt_ids`` is then the first). ``tau``: the target σ ∝ p̃₀(Z "." | X)^{1/τ}."""
    from smclm.build import encode_prompt

    if cond_len:
        raise ValueError(f"task.cond_len={cond_len}: next_sentence is unconditional")
    if split not in ("train", "test"):
        raise ValueError(f"task.split={split} must be train or test")
    tau = float(tau)
    if not (tau > 0 and math.isfinite(tau)):
        raise ConfigError(f"task.tau={tau} must be a positive number (1: the untempered target)")
    train, test = load_prompts(prompts, n_train, n_test)
    chosen = train if split == "train" else test
    picked = choose_prompt(len(chosen), split, prompt_index)
    every, index = picked is None, picked or 0
    encoded = {
        key: tuple(encode_prompt(env.tokenizer, text, bos=True) for text in texts)
        for key, texts in (("train", train), ("test", test))
    }
    prompt_ids = encoded[split][0 if every else index]
    stop_ids = resolve_stop_ids(env.tokenizer, stop, env.vocab_size)
    if not stop_ids:
        raise ValueError("task.stop must name the stop token(s) of a sentence, e.g. '.'")
    ids = banned_token_ids(
        env.tokenizer,
        env.vocab_size,
        list(BANNED if banned is None else banned),
        str(banned_runs),
        str(banned_contains),
    )
    clash = sorted(set(ids) & set(stop_ids))
    if clash:
        raise ValueError(
            f"the banned list bans the stop token(s) {clash}; remove them from task.banned"
        )
    bias = logit_bias(env.vocab_size, ids, float(penalty)).to(env.device)
    potential: Any = NoPotential() if tau == 1.0 else TemperedPotential(env.base, prompt_ids, tau)
    return Task(
        name,
        prompt_ids,
        int(output_len),
        potential,
        # φ = p̃₀^{1/τ − 1} ≤ 1 when τ ≤ 1; no bound when τ > 1
        log_phi_max=0.0 if tau <= 1.0 else None,
        stop_ids=stop_ids,
        min_len=int(min_len),
        logit_bias=bias,
        train_prompts=encoded["train"] if every else (prompt_ids,),
        test_prompts=encoded["test"],
    )
