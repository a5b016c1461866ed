"""Metrics and ``generate`` baselines of the sentence-continuation experiment (Hu et al., ICLR
2024, §4.1, Figure 3), as the paper's code computes them (``../shared/docs/gfn-paper-spec.md``
§1.4). Wired into the CLI as ``evaluator=sentences`` (end of this docstring).

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

``evaluator=sentences`` (:class:`SentenceEvaluator`, called by :class:`smclm.evaluate.Evaluator`
on the trainer's schedule and by ``smclm eval``): for each test prompt of the task
(``task.test_prompts``; the task's own prompt when it has none), n samples from the run's own
sampler (:func:`run_sampler`: the policy, else twisted SMC with the learned twist, else p₀;
``smclm eval`` without ``run=``: p₀), all ending at the stop (:func:`draw_sentences`), their
metrics as ``sent/<metric>``, the mean SIS/SMC log Ẑ of the sampler's runs (``sent/log_z_hat``,
a stochastic lower bound on log Z of the task's (tempered) target) and the requested baselines as
``sent/<baseline>/<metric>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from smclm.errors import UserError
from smclm.smc.sampler import run_smc

log = logging.getLogger(__name__)

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


# -- evaluator=sentences ------------------------------------------------------------------------
SAMPLERS = ("auto", "policy", "twisted_smc", "p0")
EMBEDDERS = ("auto", "paper", "lm")
METRICS = ("max_log_lik", "mean_log_lik", "diversity", "mean_len")


def run_sampler(model: Any) -> str:
    """The sampler a run has: its policy (GFlowNet, PPO), else twisted SMC with its learned
    twist, else plain p₀."""
    if model.policy is not None:
        return "policy"
    return "twisted_smc" if model.twist is not None else "p0"


def resolve_sampler(sampler: str, model: Any, untrained: bool) -> str:
    """``evaluator.sampler`` checked against the model; ``auto``: :func:`run_sampler`, or p₀
    for ``smclm eval`` without ``run=`` (``untrained``: the configured twist is untrained)."""
    from smclm.errors import ConfigError

    if sampler not in SAMPLERS:
        raise ConfigError(f"evaluator.sampler={sampler} must be one of {', '.join(SAMPLERS)}")
    if sampler == "auto":
        sampler = "p0" if untrained else run_sampler(model)
    if sampler == "policy" and model.policy is None:
        raise ConfigError("evaluator.sampler=policy, but the model has no policy; use auto")
    if sampler == "twisted_smc" and model.twist is None:
        raise ConfigError("evaluator.sampler=twisted_smc, but the model has no twist; use auto")
    return sampler


def draw_sentences(
    model: Any,
    task: Any,
    n: int,
    sampler: str,
    *,
    n_particles: int,
    resampling: str,
    ess_threshold: float,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], float]:
    """n finished samples of ``task``'s prompt (id lists ending at their stop) and the run's
    log Ẑ. ``policy`` / ``p0``: n independent draws (one SIS run of n particles: the policy's
    proposal, or p₀'s); ``twisted_smc``: one SMC run of ``n_particles`` with the learned twist
    (resampling as configured), then n draws (with replacement) from its final weights."""
    if sampler == "twisted_smc":
        proposal_model, k, threshold = model, int(n_particles), float(ess_threshold)
    else:
        proposal_model = model.with_twist(None, keep_policy=sampler == "policy")
        k, threshold = int(n), 0.0
    res = run_smc(
        proposal_model,
        task.prompt_ids,
        task.output_len,
        task.bind(),
        k,
        resampling=resampling,
        ess_threshold=threshold,
        generator=generator,
        stopping=task.stopping,
    )
    if sampler == "twisted_smc":
        idx = torch.multinomial(res.normalized_weights, n, replacement=True, generator=generator)
    else:
        idx = torch.arange(n)
    if res.lengths is None:  # only fixed-length tasks have none; SentenceEvaluator refuses them
        raise ValueError(f"task '{task.name}' does not stop; sentences need a stop token")
    lengths = res.lengths.tolist()
    rows = res.tokens.tolist()
    return [rows[i][: lengths[i]] for i in idx.tolist()], float(res.log_z_hat)


class SentenceEvaluator:
    """``evaluator=sentences`` (configs/evaluator/sentences.yaml): the experiment's metrics of
    the run's own sampler on the task's test prompts, and of the ``generate`` baselines (computed
    once: they sample p₀, which training does not change). Settings are checked at construction,
    before anything is sampled."""

    def __init__(
        self,
        ev: Any,
        model: Any,
        tokenizer: Any,
        task: Any,
        *,
        smc: Any,
        seed: int = 0,
        untrained: bool = False,
    ) -> None:
        from smclm.errors import ConfigError

        if not getattr(task, "stop_ids", ()):
            raise ConfigError(
                f"evaluator=sentences needs a task that stops (task.stop); task '{task.name}' "
                "has fixed-length outputs: use task=next_sentence, or evaluator=exact|bounds"
            )
        self.model, self.tokenizer, self.task = model, tokenizer, task
        # n_samples and n_prompts are range-checked with every key (smclm.config.RANGES)
        self.n = int(ev.get("n_samples", 8))
        baselines = list(ev.get("baselines") or [])
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(
                f"evaluator.baselines={baselines}: unknown {', '.join(map(str, unknown))}; "
                f"pick from {', '.join(BASELINES)}"
            )
        self.baselines = baselines
        self.sampler = resolve_sampler(str(ev.get("sampler", "auto")), model, untrained)
        self.embedder_kind = str(ev.get("embedder", "auto"))
        if self.embedder_kind not in EMBEDDERS:
            raise ConfigError(
                f"evaluator.embedder={self.embedder_kind} must be one of {', '.join(EMBEDDERS)}"
            )
        taus = ev.get("tau")
        if taus is None:
            taus = getattr(task, "tau", None)
            taus = [] if taus is None else [taus]
        elif not isinstance(taus, (int, float)):
            taus = list(taus)
        else:
            taus = [taus]
        if any(not (isinstance(t, (int, float)) and t > 0) for t in taus):
            raise ConfigError(f"evaluator.tau={ev.get('tau')} must be a positive number or a list")
        self.taus = [float(t) for t in taus]
        n_prompts = ev.get("n_prompts")
        prompts = list(getattr(task, "test_prompts", ()) or ()) or [task.prompt_ids]
        if n_prompts is not None:
            prompts = prompts[: int(n_prompts)]
        self.prompts = prompts
        self.n_particles = int(smc.n_particles)
        self.resampling, self.ess_threshold = str(smc.resampling), float(smc.ess_threshold)
        self.seed = int(seed)
        self._embedder: Embedder | None = None
        self._baselines: dict[str, Any] | None = None

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            base = self.model.base
            if self.embedder_kind == "lm":
                self._embedder = lm_embedding_embedder(base, self.tokenizer)
            elif self.embedder_kind == "paper":
                found = paper_embedder(next(base.parameters()).device)
                if found is None:
                    raise UserError(
                        f"evaluator.embedder=paper: {PAPER_EMBEDDER} did not load (install "
                        "sentence-transformers and cache the model, or use evaluator.embedder=auto)"
                    )
                self._embedder = found
            else:
                self._embedder = default_embedder(base, self.tokenizer)
        return self._embedder

    def prompt_task(self, prompt: Tensor) -> Any:
        """The task conditioned on one test prompt."""
        if torch.equal(prompt.cpu(), self.task.prompt_ids.cpu()):
            return self.task
        return self.task.for_prompt(prompt)

    @torch.no_grad()
    def __call__(self, step: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        stop_ids = list(self.task.stop_ids)
        samples, log_z = [], []
        for prompt in self.prompts:
            group, lz = draw_sentences(
                self.model,
                self.prompt_task(prompt),
                self.n,
                self.sampler,
                n_particles=self.n_particles,
                resampling=self.resampling,
                ess_threshold=self.ess_threshold,
                generator=generator,
            )
            samples.append(group)
            log_z.append(lz)
        m = sentence_metrics(
            self.model, self.tokenizer, self.prompts, samples, stop_ids, self.embedder
        )
        out: dict[str, Any] = {f"sent/{k}": m[k] for k in METRICS}
        out.update(
            {
                "sent/log_z_hat": sum(log_z) / len(log_z),
                "sent/embedder": m["embedder"],
                "sent/sampler": self.sampler,
                "sent/n_prompts": len(self.prompts),
                "sent/n_samples": self.n,
            }
        )
        out.update(self.baseline_metrics())
        return out

    def baseline_metrics(self) -> dict[str, Any]:
        """``sent/<baseline>/<metric>`` of each requested baseline (once; cached); a skipped one
        gets ``sent/<baseline>/skipped`` = why, and one warning."""
        if self._baselines is not None:
            return self._baselines
        out: dict[str, Any] = {}
        runs: list[tuple[str, str, float | None]] = []  # (key, method, tau)
        for method in self.baselines:
            if method != "sample_tempered":
                runs.append((method, method, None))
            elif len(self.taus) == 1:
                runs.append((method, method, self.taus[0]))
            else:
                runs += [(f"{method}_tau{t:g}", method, t) for t in self.taus]
            if method == "sample_tempered" and not self.taus:
                out[f"sent/{method}/skipped"] = "no tau (set evaluator.tau or task.tau)"
                log.warning("evaluator=sentences: skipping %s: no tau given", method)
        for key, method, tau in runs:
            done, skipped = generate_baselines(
                self.model,
                self.task,
                self.prompts,
                self.n,
                methods=[method],
                tau=tau,
                seed=self.seed,
            )
            if method in skipped:
                out[f"sent/{key}/skipped"] = skipped[method]
                log.warning("evaluator=sentences: skipping baseline %s: %s", key, skipped[method])
                continue
            m = sentence_metrics(
                self.model,
                self.tokenizer,
                self.prompts,
                done[method],
                list(self.task.stop_ids),
                self.embedder,
            )
            out.update({f"sent/{key}/{k}": m[k] for k in METRICS})
            if tau is not None:
                out[f"sent/{key}/tau"] = tau
        self._baselines = out
        return out
