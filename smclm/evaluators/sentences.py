"""Metrics and ``generate`` baselines of the sentence-continuation experiment (Hu et al., ICLR
2024, §4.1, Figure 3), as the paper's code computes them (``../shared/docs/gfn-paper-spec.md``
§1.4). A library module: nothing here is wired into the CLI yet.

Metrics (:func:`sentence_metrics`), per test prompt X and its n samples z⁽¹⁾..z⁽ⁿ⁾ (token ids up to
and including the stop, the prompt excluded):

* log-likelihood of each sample, log p̃₀(Z "." | X) = Σ_t log p̃₀(z_t | X, z_<t) with the task's
  logit bias (next_sentence: −50 on the banned tokens), the stop's probability included, the
  forced stop at the cap NOT corrected (the paper's scoring). It is computed by the model's own
  teacher-forced pass (:meth:`smclm.models.twisted_lm.TwistedLM.sequence_log_probs` with the
  twist and policy dropped), i.e. through :func:`smclm.models.twisted_lm.output_logits`, where the
  bias lives once the world is built: the same p̃₀ as sampling and training;
* ``max_log_lik`` and ``mean_log_lik`` over the n samples;
* ``mean_len``: the mean number of tokens of a sample, the stop counted (smclm's ℓ);
* ``diversity`` = 1 − mean over pairs i < j of cos(e_i, e_j), e_i the embedding of sample i's text
  with every "." removed (the paper's ``SequenceDiversity``); NaN when n < 2.

Each is averaged over the prompts (NaN-free prompts only for diversity). The embedder is
pluggable (:class:`Embedder`): the paper's ``sentence-transformers/all-mpnet-base-v2`` through
``sentence_transformers`` when it imports and the model loads (:func:`paper_embedder`), else
:func:`lm_embedding_embedder`, the mean of the base LM's input token embeddings, which is NOT the
paper's embedder: its diversity values are not comparable with the paper's. The result records
the embedder's name.

Baselines (:func:`generate_baseline`): the base model's own Hugging Face ``generate``, n samples
per prompt, each ending at a stop: ``min_new_tokens`` = task.min_len − 1 (1 for next_sentence, as
the paper), ``max_new_tokens`` = task.output_len, ``eos_token_id`` = the stop ids (also the pad),
``forced_eos_token_id`` = the stop ids (HF forces a stop at the last step; the paper's setting),
and the task's logit bias added by :class:`LogitBiasProcessor` (then renormalised: the processor
returns log_softmax(scores + b), so a beam's score is Σ log p̃₀ and a sample's law is p̃₀). HF
applies custom processors after its own min-length / forced-stop processors and before its
temperature and top-p warpers, so nucleus is top-p of p̃₀ and T = τ samples p̃₀(·)^{1/τ} step by
step. The methods (:data:`BASELINES`):

* ``beam``: 5n beams, ``length_penalty`` 0, one sequence returned and repeated n times;
* ``diverse_beam``: 5n beams, n groups, ``diversity_penalty`` 1.0, n returned. transformers 5
  moved group beam search out of the library to the Hub repository
  ``transformers-community/group-beam-search`` (``custom_generate``), which runs remote code: it is
  attempted only with ``trust_remote_code=True`` and only works where that repository is reachable
  or cached; otherwise :class:`BaselineUnavailable` says so. Nothing imitates it;
* ``nucleus``: top-p 0.95 at T = 1;
* ``sample``: ancestral sampling at T = 1; ``sample_tempered``: at T = τ (the ``tau`` argument;
  the paper's ``temp_end``);
* ``greedy``: one sequence, repeated n times.

The paper's "[fair]" beam variants (n beams instead of 5n) are ``beams_per_sample=1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from smclm.errors import UserError

PAPER_EMBEDDER = "sentence-transformers/all-mpnet-base-v2"
GROUP_BEAM_REPO = "transformers-community/group-beam-search"
BASELINES = ("beam", "diverse_beam", "nucleus", "sample", "sample_tempered", "greedy")


class BaselineUnavailable(UserError):
    """A baseline that cannot run here (diverse beam search without its Hub code)."""


# -- embeddings and diversity -------------------------------------------------------------------
@dataclass
class Embedder:
    """A sentence embedder: ``fn(texts) -> [n, d]`` and the name recorded with the metrics."""

    name: str
    fn: Callable[[list[str]], Tensor]

    def __call__(self, texts: list[str]) -> Tensor:
        return self.fn(texts)


def paper_embedder(device: str | torch.device = "cpu") -> Embedder | None:
    """The paper's ``all-mpnet-base-v2`` through ``sentence_transformers``; None when the package
    does not import or the model does not load (offline without it in the cache)."""
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(PAPER_EMBEDDER, device=str(device))
    except Exception:  # ImportError, OSError (no Hub), anything the loader raises
        return None

    def fn(texts: list[str]) -> Tensor:
        return st.encode(texts, convert_to_tensor=True).float().cpu()

    return Embedder(PAPER_EMBEDDER, fn)


def lm_embedding_embedder(base: Any, tokenizer: Any) -> Embedder:
    """NOT the paper's embedder: the mean of the base LM's input token embeddings over the text's
    tokens (an empty text embeds to 0, cosine 0 with everything)."""
    table = base.get_input_embeddings()

    def fn(texts: list[str]) -> Tensor:
        rows = []
        with torch.no_grad():
            for text in texts:
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
                if not ids:
                    rows.append(torch.zeros(table.weight.shape[1]))
                    continue
                idx = torch.tensor(ids, dtype=torch.long, device=table.weight.device)
                rows.append(table(idx).float().mean(0).cpu())
        return torch.stack(rows)

    return Embedder("lm-input-embedding-mean (offline; NOT the paper's all-mpnet-base-v2)", fn)


def default_embedder(base: Any, tokenizer: Any) -> Embedder:
    """The paper's embedder when available, else :func:`lm_embedding_embedder`."""
    device = next(base.parameters()).device
    return paper_embedder(device) or lm_embedding_embedder(base, tokenizer)


def cosine_diversity(emb: Tensor) -> float:
    """1 − mean over pairs i < j of cos(e_i, e_j) for embeddings emb [n, d]; NaN when n < 2."""
    n = emb.shape[0]
    if n < 2:
        return math.nan
    e = F.normalize(emb.double(), dim=-1)
    sim = e @ e.T
    i, j = torch.triu_indices(n, n, offset=1)
    return float(1.0 - sim[i, j].mean())


def sentence_texts(tokenizer: Any, samples: Sequence[Sequence[int]]) -> list[str]:
    """Each sample decoded (stop included), with every "." removed, as the paper embeds it."""
    texts = tokenizer.batch_decode([list(s) for s in samples], skip_special_tokens=False)
    return [t.replace(".", "") for t in texts]


def diversity(tokenizer: Any, samples: Sequence[Sequence[int]], embedder: Embedder) -> float:
    """The paper's diversity of one prompt's samples (module docstring)."""
    if len(samples) < 2:
        return math.nan
    return cosine_diversity(embedder(sentence_texts(tokenizer, samples)))


# -- log-likelihoods -----------------------------------------------------------------------------
def check_samples(samples: Sequence[Sequence[int]], stop_ids: Sequence[int]) -> None:
    """Each sample is non-empty, ends in a stop id and has no earlier stop."""
    stops = set(int(i) for i in stop_ids)
    for k, s in enumerate(samples):
        s = [int(t) for t in s]
        if not s or s[-1] not in stops or any(t in stops for t in s[:-1]):
            raise ValueError(
                f"sample {k} {s[:40]} must end in a stop id {sorted(stops)} with no earlier stop"
            )


def sample_log_likelihoods(
    model: Any, prompt_ids: Tensor, samples: Sequence[Sequence[int]], stop_ids: Sequence[int]
) -> Tensor:
    """log p̃₀(z | X) [n] (float32, CPU) of each sample z (ids up to and including its stop),
    from one teacher-forced pass of the TwistedLM ``model``'s base (its logit bias included).
    Shorter samples are padded after their stop; causal attention keeps the pad out."""
    check_samples(samples, stop_ids)
    if not samples:
        return torch.zeros(0)
    p0 = model.with_twist(None)
    device = p0.device
    lengths = torch.tensor([len(s) for s in samples])
    tokens = torch.full((len(samples), int(lengths.max())), int(stop_ids[0]), dtype=torch.long)
    for k, s in enumerate(samples):
        tokens[k, : len(s)] = torch.tensor([int(t) for t in s], dtype=torch.long)
    with torch.no_grad():
        lp = p0.sequence_log_probs(prompt_ids.to(device), tokens.to(device), proposal="p0")
    live = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    return (lp["log_p0"].float().cpu() * live).sum(1)


def sentence_metrics(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Tensor],
    samples: Sequence[Sequence[Sequence[int]]],
    stop_ids: Sequence[int],
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """The experiment's metrics (module docstring) of ``samples[i]``, the samples of prompt
    ``prompts[i]`` (token ids [P_i]): averages over prompts, the embedder's name and the
    per-prompt values under ``per_prompt``."""
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts but samples for {len(samples)}")
    if embedder is None:
        embedder = default_embedder(model.base, tokenizer)
    rows = []
    for prompt, group in zip(prompts, samples, strict=True):
        if not group:
            raise ValueError("every prompt needs at least one sample")
        ll = sample_log_likelihoods(model, prompt, group, stop_ids)
        rows.append(
            {
                "max_log_lik": float(ll.max()),
                "mean_log_lik": float(ll.mean()),
                "mean_len": sum(len(s) for s in group) / len(group),
                "diversity": diversity(tokenizer, group, embedder),
                "n": len(group),
            }
        )
    out: dict[str, Any] = {}
    for key in ("max_log_lik", "mean_log_lik", "mean_len", "diversity"):
        vals = [r[key] for r in rows if not math.isnan(r[key])]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    out.update(embedder=embedder.name, n_prompts=len(rows), per_prompt=rows)
    return out


# -- generate baselines -----------------------------------------------------------------------
class LogitBiasProcessor:
    """A ``LogitsProcessor`` returning log_softmax(scores + b): the task's p̃₀ whether ``scores``
    are logits (sampling) or log-probabilities (beam search)."""

    def __init__(self, bias: Tensor | None) -> None:
        self.bias = None if bias is None else bias.detach().float()

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        x = scores.float()
        if self.bias is not None:
            x = x + self.bias.to(x.device)[: x.shape[-1]]
        return torch.log_softmax(x, dim=-1)


def generate_kwargs(method: str, n: int, tau: float | None, beams_per_sample: int):
    """The ``generate`` arguments of one baseline (see the module docstring) and how many
    sequences it returns (1: repeated n times)."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; pick one of {', '.join(BASELINES)}")
    kw: dict[str, Any] = dict(do_sample=False, num_beams=1, top_k=0, top_p=1.0, temperature=1.0)
    returned = n
    if method == "beam":
        kw.update(num_beams=beams_per_sample * n, length_penalty=0.0, num_return_sequences=1)
        returned = 1
    elif method == "diverse_beam":
        kw.update(
            num_beams=beams_per_sample * n,
            num_beam_groups=n,
            diversity_penalty=1.0,
            num_return_sequences=n,
        )
    elif method == "greedy":
        returned = 1
    else:
        kw.update(do_sample=True, num_return_sequences=n)
        if method == "nucleus":
            kw.update(top_p=0.95)
        elif method == "sample_tempered":
            if tau is None or not tau > 0:
                raise ValueError(f"sample_tempered needs a temperature tau > 0, not {tau}")
            kw.update(temperature=float(tau))
    return kw, returned


def generate_baseline(
    model: Any,
    task: Any,
    prompt_ids: Tensor,
    method: str,
    n: int,
    *,
    tau: float | None = None,
    beams_per_sample: int = 5,
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> list[list[int]]:
    """n samples of ``method`` for one prompt (ids [P]) from the base of the TwistedLM ``model``
    through HF ``generate``: token id lists ending at their first stop (module docstring)."""
    from transformers import LogitsProcessorList

    if n < 1:
        raise ValueError(f"n={n} must be ≥ 1")
    stop_ids = [int(i) for i in task.stop_ids]
    if not stop_ids:
        raise ValueError(f"task '{task.name}' has no stop tokens; the baselines need one")
    kw, returned = generate_kwargs(method, n, tau, beams_per_sample)
    if method == "diverse_beam":
        if not trust_remote_code:
            raise BaselineUnavailable(
                f"diverse beam search: transformers 5 moved group beam search to the Hub "
                f"repository {GROUP_BEAM_REPO} (custom_generate), which runs remote code; it is "
                "not run without trust_remote_code=True (and needs the Hub or a cached copy)"
            )
        kw.update(custom_generate=GROUP_BEAM_REPO, trust_remote_code=True)
    base = model.base
    device = next(base.parameters()).device
    ids = prompt_ids.to(device)[None]
    kw.update(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        min_new_tokens=max(int(task.min_len) - 1, 0),
        max_new_tokens=int(task.output_len),
        eos_token_id=stop_ids,
        forced_eos_token_id=stop_ids,
        pad_token_id=stop_ids[0],
        logits_processor=LogitsProcessorList(
            [LogitBiasProcessor(getattr(task, "logit_bias", None))]
        ),
    )
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            out = base.generate(**kw)
        except BaselineUnavailable:
            raise
        except Exception as e:
            if method != "diverse_beam":
                raise
            raise BaselineUnavailable(
                f"diverse beam search: the Hub repository {GROUP_BEAM_REPO} that transformers 5 "
                f"needs for it could not be loaded ({type(e).__name__}: {str(e)[:200]})"
            ) from e
    seqs = out.sequences if hasattr(out, "sequences") else out
    stops = set(stop_ids)
    result = []
    for row in seqs[:, ids.shape[1] :].tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), None)
        if cut is None:
            raise RuntimeError(f"{method}: generate returned a sequence without a stop: {row}")
        result.append(row[: cut + 1])
    if len(result) != returned:
        raise RuntimeError(f"{method}: generate returned {len(result)} sequences, not {returned}")
    return result * n if returned == 1 else result


def generate_baselines(
    model: Any,
    task: Any,
    prompts: Sequence[Tensor],
    n: int,
    *,
    methods: Sequence[str] = BASELINES,
    tau: float | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> tuple[dict[str, list[list[list[int]]]], dict[str, str]]:
    """Every available baseline on every prompt: ({method: samples per prompt}, {method: why it
    was skipped}) (``sample_tempered`` is skipped without a tau; diverse beam when unavailable)."""
    done: dict[str, list[list[list[int]]]] = {}
    skipped: dict[str, str] = {}
    for method in methods:
        if method == "sample_tempered" and tau is None:
            skipped[method] = "no tau given"
            continue
        try:
            done[method] = [
                generate_baseline(
                    model,
                    task,
                    p,
                    method,
                    n,
                    tau=tau,
                    seed=seed + k,
                    trust_remote_code=trust_remote_code,
                )
                for k, p in enumerate(prompts)
            ]
        except BaselineUnavailable as e:
            skipped[method] = str(e)
    return done, skipped
