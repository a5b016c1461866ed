"""Resampling schemes for Sequential Monte Carlo.

Every resampler maps unnormalised log-weights of shape ``[N]`` (``N`` particles) to a
LongTensor of ``n`` ancestor indices in ``[0, N)``; ``n`` may differ from ``N`` (conditional
SMC draws ``N - 1``). Log-weights ``[G, N]`` are G independent particle systems (one per row:
the sampler's batched runs); the result is then ``[G, n]``, row g drawn from row g's weights
alone, with indices local to the row. A 1-D input is the case G = 1 (the same draws, bit for
bit, as the row of a ``[1, N]`` input).  All schemes work by inverse-CDF lookup: uniform points in ``[0, 1)``
are located in the normalised cumulative weights with right-sided ``searchsorted``, so a
zero-weight particle (log-weight ``-inf``), whose CDF interval is empty, is never selected.
The returned ancestors are sorted in ascending order (``multinomial_unsorted``: in draw order).

``arrange_in_place`` permutes an ancestor vector so that surviving particles keep their own
slot, which lets the caller copy only the cache rows that actually change; ``arrange_rows`` does
the same without validation and also returns those rows (what the sampler uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "RESAMPLERS",
    "Resampler",
    "arrange_in_place",
    "arrange_rows",
    "draw_checked_positive",
    "get_resampler",
    "multinomial",
    "multinomial_unsorted",
    "stratified",
    "systematic",
]

Resampler = Callable[[Tensor, int, torch.Generator | None], Tensor]

# Internal precision for the CDF and the uniform points.
_DTYPE = torch.float64
# Largest float64 strictly below 1: uniform points are clamped to it so that rounding in
# ``(k + u) / n`` can never produce a point equal to 1.
_BELOW_ONE = float(
    torch.nextafter(torch.tensor(1.0, dtype=_DTYPE), torch.tensor(0.0, dtype=_DTYPE))
)


def _normalised_cdf(log_w: Tensor, checked: bool = False) -> tuple[Tensor, Tensor | None]:
    """Validate log-weights and build their normalised CDF (``checked``: the caller has already
    found every entry finite with every normalised weight positive; then there is nothing to
    validate and no zero-weight interval to empty, and ``last`` is None: the last particle).

    Args:
        log_w: ``[N]`` unnormalised log-weights (floating point; ``-inf`` means zero weight),
            or ``[G, N]``: G independent rows.

    Returns:
        ``(cdf, last)``: ``cdf`` is ``[N]`` float64, non-decreasing, with ``cdf[i] == 1``
        exactly for every ``i`` at or after the last positive-weight particle; ``last`` is a
        0-d LongTensor holding the index of that last positive-weight particle (for ``[G, N]``:
        ``cdf`` ``[G, N]`` and ``last`` ``[G]``, row by row).

    Raises:
        TypeError: if ``log_w`` is not floating point.
        ValueError: if ``log_w`` is not 1-D or 2-D and non-empty, or a row contains NaN or
            ``+inf``, or has every entry equal to ``-inf``.
    """
    if not torch.is_floating_point(log_w):
        raise TypeError(f"log-weights must be a floating-point tensor, got dtype {log_w.dtype}")
    if log_w.dim() not in (1, 2) or log_w.numel() == 0:
        raise ValueError(
            "log-weights must be a non-empty [N] (or [G, N]) tensor, got shape "
            f"{tuple(log_w.shape)}"
        )
    lw = log_w.detach().to(_DTYPE)
    # Normalised weights; the largest is >= 1/N, so at least one entry is positive. Any NaN,
    # any +inf or an all -inf row makes every entry of the row (and so its total) NaN.
    w = torch.softmax(lw, dim=-1)
    cdf = torch.cumsum(w, dim=-1)
    if checked:  # positive weights: the zero-weight handling below would change nothing
        return cdf / cdf[..., -1:], None
    # A single host sync in the common case; only on failure do we work out which case it is.
    if not math.isfinite(cdf[..., -1].sum().item()):
        where = "" if lw.dim() == 1 else " (in some row)"
        if bool(torch.isnan(lw).any()):
            raise ValueError(f"log-weights contain NaN{where}; cannot resample")
        if bool(torch.isposinf(lw).any()):
            raise ValueError(f"log-weights contain +inf{where}; cannot resample")
        raise ValueError(
            f"all log-weights{where} are -inf (every particle has zero weight); cannot resample"
        )
    positive = w > 0
    # The running count of positive weights first reaches its maximum at the last one.
    last = torch.cumsum(positive, dim=-1).argmax(dim=-1)
    # Make zero-weight entries repeat the previous CDF value *exactly* (a parallel scan, as on
    # GPU, does not guarantee that adding 0.0 reproduces the same rounded sum) and make the
    # CDF monotone: zero them, then take the running maximum.  Their CDF intervals are then
    # empty, so right-sided searchsorted can never land on them.
    cdf = torch.cummax(torch.where(positive, cdf, 0.0), dim=-1).values
    # Dividing by the total makes every entry from the last positive weight on exactly 1
    # (they all equal cdf[-1] now, and x / x == 1 in IEEE arithmetic).
    cdf = cdf / cdf[..., -1:]
    return cdf, last


def _uniform(
    shape: int | tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Draw float64 uniforms of ``shape`` in ``[0, 1)`` from ``generator`` onto ``device``.

    The draw happens on the generator's device (so a CPU generator also works for CUDA
    weights) and the result is moved to ``device``.
    """
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, dtype=_DTYPE, device=gen_device)
    return u.to(device)


def _check_n(n: int) -> int:
    """Validate the number of draws ``n`` (a non-negative integer)."""
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"number of draws must be a non-negative integer, got {n!r}")
    return int(n)


def _invert(cdf: Tensor, last: Tensor | None, points: Tensor) -> Tensor:
    """Map points in ``[0, 1)`` to particle indices.

    Args:
        cdf: ``[N]`` (or ``[G, N]``) normalised CDF from :func:`_normalised_cdf`.
        last: 0-d (or ``[G]``) index of the last positive-weight particle (None: the last
            particle, every weight positive).
        points: ``[n]`` (or ``[G, n]``) float64 points.

    Returns:
        ``[n]`` (or ``[G, n]``) LongTensor; index ``i`` is chosen iff ``cdf[i-1] <= p < cdf[i]`` (with
        ``cdf[-1] := 0``), so zero-weight particles (empty intervals) are never chosen.
    """
    points = points.clamp(0.0, _BELOW_ONE)
    idx = torch.searchsorted(cdf, points, right=True)
    # Points are < 1 == cdf[last], so idx <= last already; the clamp is a last-resort guard.
    return idx if last is None else torch.minimum(idx, last[..., None]).to(torch.long)


def multinomial(log_w: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Multinomial resampling: ``n`` i.i.d. draws from the normalised weights.

    Implemented by inverse-CDF lookup of ``n`` uniforms (not ``torch.multinomial``).

    Args:
        log_w: ``[N]`` unnormalised log-weights, any float dtype; ``-inf`` is zero weight.
        n: number of draws.
        generator: source of all randomness (for reproducibility).

    Returns:
        ``[n]`` LongTensor of ancestor indices in ``[0, N)``, sorted ascending, on
        ``log_w.device``.

    Raises:
        ValueError: if all log-weights are ``-inf`` or any is NaN / ``+inf``.
    """
    # The inverse CDF is monotone, so sorting the ancestors equals sorting the points first.
    return torch.sort(multinomial_unsorted(log_w, n, generator), dim=-1).values


def multinomial_unsorted(log_w: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """:func:`multinomial` without the sort: the same multiset of ancestors in draw order.

    For callers that only need the counts (e.g. followed by :func:`arrange_rows`).
    """
    n = _check_n(n)
    cdf, last = _normalised_cdf(log_w)
    return _invert(cdf, last, _points("multinomial", cdf, n, generator))


def _points(scheme: str, cdf: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """The ``n`` points in ``[0, 1)`` per row of ``cdf`` that ``scheme`` locates in it:
    i.i.d. uniforms (multinomial), ``(k + u) / n`` with one ``u`` per row (systematic) or one
    per point (stratified)."""
    if scheme == "multinomial":
        return _uniform((*cdf.shape[:-1], n), generator, cdf.device)
    u = _uniform((*cdf.shape[:-1], 1 if scheme == "systematic" else n), generator, cdf.device)
    return (torch.arange(n, dtype=_DTYPE, device=cdf.device) + u) / n


def draw_checked_positive(
    log_w: Tensor, n: int, scheme: str, generator: torch.Generator | None = None
) -> Tensor:
    """``scheme``'s ancestors for log-weights [G, N] that the caller has already checked: every
    entry finite, and every normalised weight positive (no ``-inf``, nothing that underflows;
    the sampler knows both from its weight statistics). The same indices as the checked
    resampler, bit for bit (multinomial: in draw order, as :func:`multinomial_unsorted`), from
    the same draws of ``generator``; it skips the validation (a host sync) and the zero-weight
    handling, which with positive weights change nothing: the CDF of positive weights is
    already non-decreasing, its last entry is exactly 1 and the clamped points lie below it,
    so every located index is already below N."""
    get_resampler(scheme)  # an unknown name raises, listing the choices
    cdf, last = _normalised_cdf(log_w, checked=True)
    return _invert(cdf, last, _points(scheme, cdf, _check_n(n), generator))


def systematic(log_w: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Systematic resampling: a single ``u ~ U[0, 1/n)`` and points ``u + k/n``, ``k < n``.

    Each particle ``i`` receives either ``floor(n w_i)`` or ``ceil(n w_i)`` copies.

    Args:
        log_w: ``[N]`` unnormalised log-weights, any float dtype; ``-inf`` is zero weight.
        n: number of draws.
        generator: source of all randomness (for reproducibility).

    Returns:
        ``[n]`` LongTensor of ancestor indices in ``[0, N)``, sorted ascending, on
        ``log_w.device``.

    Raises:
        ValueError: if all log-weights are ``-inf`` or any is NaN / ``+inf``.
    """
    n = _check_n(n)
    cdf, last = _normalised_cdf(log_w)
    return _invert(cdf, last, _points("systematic", cdf, n, generator))


def stratified(log_w: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Stratified resampling: one uniform per stratum, points ``(k + u_k) / n``, ``k < n``.

    Args:
        log_w: ``[N]`` unnormalised log-weights, any float dtype; ``-inf`` is zero weight.
        n: number of draws.
        generator: source of all randomness (for reproducibility).

    Returns:
        ``[n]`` LongTensor of ancestor indices in ``[0, N)``, sorted ascending, on
        ``log_w.device``.

    Raises:
        ValueError: if all log-weights are ``-inf`` or any is NaN / ``+inf``.
    """
    n = _check_n(n)
    cdf, last = _normalised_cdf(log_w)
    return _invert(cdf, last, _points("stratified", cdf, n, generator))


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "systematic": systematic,
    "stratified": stratified,
}


def get_resampler(name: str) -> Resampler:
    """Look up a resampling scheme by name (a key of :data:`RESAMPLERS`).

    Raises:
        ValueError: for an unknown name; the message lists the valid names.
    """
    try:
        return RESAMPLERS[name]
    except (KeyError, TypeError):
        choices = ", ".join(RESAMPLERS)
        raise ValueError(f"unknown resampling scheme {name!r}; choose one of: {choices}") from None


def arrange_in_place(ancestors: Tensor, n_particles: int) -> Tensor:
    """Permute an ancestor vector so that surviving particles stay in their own slot.

    After resampling the particles are exchangeable, so any permutation of the ancestor
    vector describes the same particle system.  This returns the permutation in which every
    index ``i`` that occurs in ``ancestors`` sits at position ``i`` (``out[i] == i``); the extra
    copies fill the remaining positions in ascending order of position, with ascending
    ancestor values.  The caller then only needs to copy state rows where ``out[i] != i``.

    Args:
        ancestors: ``[N]`` integer tensor of ancestor indices in ``[0, N)``.
        n_particles: ``N``; must equal ``len(ancestors)``.

    Returns:
        ``[N]`` LongTensor on ``ancestors.device``, a permutation of ``ancestors`` (same
        multiset) with ``out[i] == i`` for every ``i`` in ``set(ancestors)``.

    Raises:
        ValueError: if the shape does not match ``n_particles`` or an index is out of range.
        TypeError: if ``ancestors`` is not an integer tensor.
    """
    if (
        ancestors.dtype.is_floating_point
        or ancestors.dtype.is_complex
        or ancestors.dtype == torch.bool
    ):
        raise TypeError(f"ancestors must be an integer tensor, got dtype {ancestors.dtype}")
    if ancestors.dim() != 1 or ancestors.shape[0] != n_particles:
        raise ValueError(
            f"ancestors must have shape [{n_particles}] (n_particles), got {tuple(ancestors.shape)}"
        )
    anc = ancestors.to(torch.long)
    if n_particles == 0:
        return anc.clone()
    if bool((anc < 0).any()) or bool((anc >= n_particles).any()):
        raise ValueError(f"ancestor indices must lie in [0, {n_particles})")
    return arrange_rows(anc)[0]


def arrange_rows(ancestors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`arrange_in_place` without validation (and without sorting: the input may be in any
    order), plus the rows that change.

    Args:
        ancestors: ``[N]`` LongTensor of indices in ``[0, N)``, in any order.

    Returns:
        ``(out, dst, src)``: ``out`` as :func:`arrange_in_place` returns it; ``dst`` the slots
        whose entry changes (``out[dst] != dst``, ascending) and ``src = out[dst]``. ``dst`` and
        ``src`` are disjoint (``src`` holds surviving indices, which keep their own slot), and
        the number of distinct ancestors is ``N - len(dst)``.
    """
    n = ancestors.shape[0]
    counts = torch.bincount(ancestors, minlength=n)
    # Slots of surviving indices keep their own index; the others (exactly as many as there
    # are extra copies, count - 1 per surviving index) receive the extra copies in ascending
    # order of slot and of value.
    dst = torch.nonzero(counts == 0).squeeze(1)
    src = torch.repeat_interleave(counts.sub_(1).clamp_(min=0), output_size=dst.shape[0])
    out = torch.arange(n, device=ancestors.device).index_copy_(0, dst, src)
    return out, dst, src
