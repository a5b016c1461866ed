"""KV caches for particle sampling: growable buffers and in-place reordering after resampling.

``make_kv_cache`` builds the cache that ``TwistedLM.start`` (and a separate twist or policy body)
hands to the model: a ``transformers.DynamicCache`` whose layers keep their keys and values in
pre-allocated buffers ``[B, H, capacity, D]``. A step writes its new keys/values in place (no
``torch.cat`` of the whole cache per token); the capacity doubles when full, so the copies on
growth cost O(1) per token amortised. The model sees ``layer.keys``/``layer.values`` as views of
the first ``seq_len`` positions of the buffers.

After a resample, particle i continues the history of particle ``ancestors[i]``. The caches of
the base model (and of a separate twist model) are reordered in place — never recomputed. Only
rows whose ancestor differs from themselves are copied: with ancestors arranged so that every
surviving particle keeps its own slot (``resampling.arrange_in_place``), that is N − #unique
rows instead of N. For a growable cache they are gathered into a reused scratch buffer
(``index_select``) and written back in place (``index_copy_``) — or, for large rows on CPU,
copied one by one straight from their source rows (half the memory traffic) — and the positions
that all rows share (the prompt, expanded from a batch-1 cache) are skipped. The sampler hands
the changed rows over with ``note_changed_rows`` (it knows them from the arrangement), so that
the caches reordered by the same ancestors do not work them out again.

``cache_kwargs(module, cache)`` is how every incremental forward hands a cache to a model: as
``cache=`` where the model's ``forward`` takes that keyword (transformers ≥ 5.24), else as
``past_key_values=`` (which 5.24 still accepts with a FutureWarning and 5.40 removes). The
keyword is probed once per model class (``inspect.signature``), not per call.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = [
    "GrowableCache",
    "GrowableLayer",
    "cache_keyword",
    "cache_kwargs",
    "changed_rows",
    "make_kv_cache",
    "note_changed_rows",
    "reorder_cache",
]

_CACHE_KEYWORD: dict[type, str] = {}


def cache_keyword(module: Any) -> str:
    """The keyword ``module``'s forward takes the KV cache by: ``cache`` (transformers ≥ 5.24)
    or ``past_key_values`` (older models, remote code), probed once per class."""
    cls = type(module)
    kw = _CACHE_KEYWORD.get(cls)
    if kw is None:
        try:
            params = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):  # no inspectable signature: the current keyword
            params = {}
        kw = "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"
        _CACHE_KEYWORD[cls] = kw
    return kw


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """Keyword arguments handing ``cache`` to ``module``'s forward (with ``use_cache=True``)."""
    return {cache_keyword(module): cache, "use_cache": True}


_SEQ = -2  # the sequence dimension of keys/values [B, H, S, D]
# Rows of at least this many bytes (per key or value tensor) are copied one by one on CPU; rows
# that can be moved as 16-byte units (``_wide``) go through the scratch buffer up to the larger
# size (measured on TinyStories-33M shapes, bf16 and fp32, 2 CPU threads: below it the gather
# is faster than row-by-row copies, above it they are even).
_DIRECT_COPY_MIN = 65536
_DIRECT_COPY_MIN_WIDE = 262144


class GrowableLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in capacity-doubling buffers, written in place.

    ``keys``/``values`` are views ``buffer[..., :seq_len, :]`` of the buffers; positions
    ``[0, shared)`` hold the same keys/values in every row (a prompt expanded from batch 1),
    which lets in-place reordering skip them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._k: Tensor | None = None  # [B, H, capacity, D]
        self._v: Tensor | None = None
        self._len = 0
        self._shared = 0
        self._plain = False  # True after an update under autograd: plain DynamicLayer behaviour

    # -- buffers ---------------------------------------------------------------------------------
    def _set_buffers(self, k: Tensor, v: Tensor, length: int, shared: int) -> None:
        self._len = length
        self._shared = min(shared, length)
        self._repoint(k, v)

    def _repoint(self, k: Tensor, v: Tensor) -> None:
        self._k, self._v = k, v
        self.keys = k.narrow(_SEQ, 0, self._len)
        self.values = v.narrow(_SEQ, 0, self._len)

    @staticmethod
    def _alloc(like: Tensor, batch: int, capacity: int) -> Tensor:
        shape = list(like.shape)
        shape[0], shape[_SEQ] = batch, capacity
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def _adopt(self, keys: Tensor, values: Tensor, capacity: int, shared: int = 0) -> None:
        """Copy keys/values [B, H, S, D] into fresh buffers of the given capacity (≥ S)."""
        length = keys.shape[_SEQ]
        k = self._alloc(keys, keys.shape[0], capacity)
        v = self._alloc(values, values.shape[0], capacity)
        k.narrow(_SEQ, 0, length).copy_(keys)
        v.narrow(_SEQ, 0, length).copy_(values)
        self._set_buffers(k, v, length, shared)

    def _in_sync(self) -> bool:
        """False when ``keys``/``values`` were replaced from outside (then they are adopted)."""
        k, keys = self._k, self.keys
        return k is not None and keys is not None and keys.data_ptr() == k.data_ptr()

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True
        self._adopt(key_states.narrow(_SEQ, 0, 0), value_states.narrow(_SEQ, 0, 0), 0)

    # -- the model's interface --------------------------------------------------------------------
    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Write the new key/value states [B, H, q, D] after the cached ones (in place)."""
        if self._plain or (key_states.requires_grad and torch.is_grad_enabled()):
            # In-place writes would break autograd: behave as a plain DynamicLayer from now on.
            self._plain = True
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif not self._in_sync() or self.keys.shape[_SEQ] != self._len:
            self._adopt(self.keys, self.values, self.keys.shape[_SEQ], self._shared)
        start = self._len
        end = start + key_states.shape[_SEQ]
        k = self._k
        if key_states.shape[0] != k.shape[0]:
            if start > 0:
                raise ValueError(
                    f"batch size {key_states.shape[0]} of the new key states does not match the "
                    f"cache's {k.shape[0]}; reorder the cache to the new batch size first"
                )
            self._adopt(key_states.narrow(_SEQ, 0, 0), value_states.narrow(_SEQ, 0, 0), end)
            k = self._k
        elif end > k.shape[_SEQ]:
            capacity = end if start == 0 else max(end, 2 * k.shape[_SEQ])
            self._adopt(self.keys, self.values, capacity, self._shared)
            k = self._k
        v = self._v
        k.narrow(_SEQ, start, end - start).copy_(key_states)
        v.narrow(_SEQ, start, end - start).copy_(value_states)
        self._len = end
        self.keys = k.narrow(_SEQ, 0, end)
        self.values = v.narrow(_SEQ, 0, end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.shape[_SEQ]

    # -- reordering -----------------------------------------------------------------------------
    def select_rows(self, indices: Tensor) -> None:
        """Row i becomes old row ``indices[i]``; any length of ``indices`` (new buffers)."""
        if not self.is_initialized:
            return
        if not self._in_sync():
            self._adopt(self.keys, self.values, self.keys.shape[_SEQ])
        indices = indices.to(self._k.device)
        old_batch = self._k.shape[0]
        # Room for one more token: the caller (sampling, the exact evaluator) advances next.
        capacity = self._len + 1
        k = self._alloc(self._k, indices.shape[0], capacity)
        v = self._alloc(self._v, indices.shape[0], capacity)
        torch.index_select(self.keys, 0, indices, out=k.narrow(_SEQ, 0, self._len))
        torch.index_select(self.values, 0, indices, out=v.narrow(_SEQ, 0, self._len))
        shared = self._len if old_batch == 1 else self._shared
        self._set_buffers(k, v, self._len, shared)

    def copy_rows(self, rows: RowPlan, scratch: _Scratch) -> None:
        """Rows ``rows.dst`` become copies of rows ``rows.src``, in place."""
        if not self.is_initialized or self._len == 0:
            return
        if not self._in_sync():
            self._adopt(self.keys, self.values, self.keys.shape[_SEQ])
        if self._shared < self._len:  # else every row holds the same positions
            for buf in (self._k, self._v):
                _copy_rows(buf, rows, scratch, self._shared, self._len - self._shared)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        reorder_cache_layers([self], beam_idx, _Scratch())

    def batch_select_indices(self, indices: Tensor) -> None:
        if self._plain:
            super().batch_select_indices(indices)
        elif self.get_seq_length() > 0:
            if indices.dtype == torch.bool:
                indices = torch.nonzero(indices).squeeze(1)
            self.select_rows(indices.to(torch.long))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._plain:
            super().batch_repeat_interleave(repeats)
        elif self.get_seq_length() > 0:
            rows = torch.arange(self._k.shape[0], device=self._k.device)
            self.select_rows(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # validates; leaves views of the buffers
        if self.is_initialized and self._k is not None and not self._plain:
            self._len = self.keys.shape[_SEQ]
            self._shared = min(self._shared, self._len)

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None
        self._len = self._shared = 0
        self._plain = False


def _copy_rows(buf: Tensor, rows: RowPlan, scratch: _Scratch, start: int, length: int) -> None:
    """Rows ``rows.dst`` of ``buf`` [B, H, S, W] become copies of rows ``rows.src``, in place,
    at positions [start, start + length) of the sequence dimension."""
    wide = _wide(buf)
    part = wide.narrow(_SEQ, start, length)
    row_bytes = math.prod(part.shape[1:]) * part.element_size()
    limit = _DIRECT_COPY_MIN if wide is buf else _DIRECT_COPY_MIN_WIDE
    if buf.device.type == "cpu" and row_bytes >= limit and rows.disjoint():
        # Large rows on CPU: copy each changed row straight from its source (one read and one
        # write; index_copy_ through a scratch buffer moves the data twice).
        views = part.unbind(0)
        for d, s in zip(*rows.lists()):
            views[d].copy_(views[s])
    else:
        tmp = scratch.get(part, rows.dst.shape[0])
        torch.index_select(part, 0, rows.src, out=tmp)
        part.index_copy_(0, rows.dst, tmp)


def _wide(buf: Tensor) -> Tensor:
    """``buf`` reinterpreted with 16-byte elements (complex128) where its rows allow it, for
    copying: on CPU, index_select/index_copy_ cost about the same per element whatever its
    size, so moving a float32 cache as 16-byte units takes 1.3-1.8x less time (toy shapes,
    ``scripts/bench_smc.py``). The bytes are moved unchanged."""
    if (
        buf.device.type == "cpu"
        and buf.dtype != torch.complex128
        and buf.is_contiguous()
        and (buf.shape[-1] * buf.element_size()) % 16 == 0
    ):
        return buf.view(torch.complex128)
    return buf


class RowPlan:
    """The rows an ancestor vector [N] changes: ``dst`` (ascending) and ``src = ancestors[dst]``."""

    def __init__(self, dst: Tensor, src: Tensor, disjoint: bool | None = None) -> None:
        self.dst, self.src = dst, src
        self._disjoint = disjoint
        self._lists: tuple[list[int], list[int]] | None = None

    def lists(self) -> tuple[list[int], list[int]]:
        if self._lists is None:
            self._lists = (self.dst.tolist(), self.src.tolist())
        return self._lists

    def disjoint(self) -> bool:
        """No changed row is also a source row (then rows can be copied without a scratch)."""
        if self._disjoint is None:
            dst, src = self.lists()
            self._disjoint = set(dst).isdisjoint(src)
        return self._disjoint


class _LastRows:
    """The plan of the last ancestor vector seen, so that the caches reordered by the same
    ancestors (base model, separate twist, policy) and the sampler, which knows the changed
    rows from the arrangement, work them out once."""

    def __init__(self) -> None:
        self.ancestors: Tensor | None = None
        self.version = -1
        self.plan: RowPlan | None = None

    @staticmethod
    def _version(t: Tensor) -> int:
        # Inference-mode tensors keep no version counter: identity alone identifies them.
        return -2 if t.is_inference() else t._version

    def get(self, ancestors: Tensor) -> RowPlan | None:
        if self.ancestors is ancestors and self._version(ancestors) == self.version:
            return self.plan
        return None

    def set(self, ancestors: Tensor, plan: RowPlan) -> None:
        self.ancestors, self.version, self.plan = ancestors, self._version(ancestors), plan


_LAST = _LastRows()


def note_changed_rows(ancestors: Tensor, dst: Tensor, src: Tensor) -> None:
    """Tell the reorder that follows that ``ancestors`` changes exactly rows ``dst`` to ``src``
    (``src`` disjoint from ``dst``, as :func:`smclm.smc.resampling.arrange_rows`
    guarantees), so it need not work them out again."""
    _LAST.set(ancestors, RowPlan(dst, src, disjoint=True))


def changed_rows(ancestors: Tensor) -> RowPlan:
    """The rows that ``ancestors`` [N] changes (where ``ancestors[i] != i``)."""
    plan = _LAST.get(ancestors)
    if plan is None:
        n = ancestors.shape[0]
        dst = torch.nonzero(ancestors != torch.arange(n, device=ancestors.device)).squeeze(1)
        plan = RowPlan(dst, ancestors[dst])
        _LAST.set(ancestors, plan)
    return plan


class _Scratch:
    """A flat buffer reused (and grown) for the rows gathered during a reorder."""

    def __init__(self) -> None:
        self._flat: Tensor | None = None

    def get(self, like: Tensor, rows: int) -> Tensor:
        shape = (rows, *like.shape[1:])
        numel = rows * math.prod(like.shape[1:])
        flat = self._flat
        if (
            flat is None
            or flat.numel() < numel
            or flat.dtype != like.dtype
            or (flat.device != like.device)
        ):
            flat = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self._flat = flat
        return flat[:numel].view(shape)


class GrowableCache(DynamicCache):
    """``DynamicCache`` with :class:`GrowableLayer` layers (created lazily, one per model layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowableLayer
        self._scratch = _Scratch()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        reorder_cache_layers(self.layers, beam_idx, self._scratch)


def make_kv_cache() -> DynamicCache:
    """The KV cache for incremental sampling (start/advance/reorder): a :class:`GrowableCache`."""
    return GrowableCache()


def reorder_cache_layers(layers: list[GrowableLayer], ancestors: Tensor, scratch: _Scratch) -> None:
    """Apply ancestors [M] to growable layers: in place when M equals the batch size."""
    live = []
    for layer in layers:
        if layer._plain:  # see GrowableLayer.update
            DynamicLayer.reorder_cache(layer, ancestors)
        elif layer.is_initialized and layer._k is not None:
            live.append(layer)
    if not live:
        return
    n_rows = live[0]._k.shape[0]
    if ancestors.shape[0] != n_rows or any(layer._k.shape[0] != n_rows for layer in live):
        for layer in live:
            layer.select_rows(ancestors)
        return
    rows = changed_rows(ancestors.to(live[0]._k.device))
    if rows.dst.shape[0] == 0:
        return
    for layer in live:
        layer.copy_rows(rows, scratch)


def reorder_cache(cache: Any, ancestors: Tensor) -> None:
    """Reorder a transformers ``Cache`` along the batch dimension by ``ancestors`` [N].

    Growable caches (:func:`make_kv_cache`) copy the changed rows in place, or build new buffers
    when the batch size changes (e.g. expanding a batch-1 prompt cache to N particles). Other
    caches copy the changed rows with advanced indexing, and use ``cache.reorder_cache`` (an
    index_select) on a change of batch size or without per-layer key/value tensors.
    """
    if isinstance(cache, GrowableCache):
        reorder_cache_layers(cache.layers, ancestors, cache._scratch)
        return
    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None:
        cache.reorder_cache(ancestors)
        return
    n_rows = layers[0].keys.shape[0]
    if ancestors.shape[0] != n_rows:
        cache.reorder_cache(ancestors)
        return
    rows = changed_rows(ancestors.to(layers[0].keys.device))
    if rows.dst.numel() == 0:
        return
    if rows.dst.numel() > n_rows // 2:
        cache.reorder_cache(ancestors)
        return
    for layer in layers:
        # Advanced indexing on the right makes a copy first, so overlapping src/dst is safe.
        layer.keys[rows.dst] = layer.keys[rows.src]
        layer.values[rows.dst] = layer.values[rows.src]


@torch.no_grad()
def prompt_shared_hidden(body: Any, prompt_ids: Tensor, rest: Tensor) -> Tensor:
    """Last hidden states [N, P+L, d] of a frozen body over [prompt, rest_i] for N rows rest
    [N, L] that share the prompt [P]: the prompt goes through the body once, the rows continue
    from its KV cache (expanded to N), so a row costs L positions instead of P+L. Equal, up to
    floating-point rounding, to the body over the concatenated ids (which one row, or a prompt
    of one token, gets: nothing to share)."""
    n, prompt = rest.shape[0], prompt_ids.to(rest.device)
    if n == 1 or prompt.numel() < 2:
        return body(
            input_ids=torch.cat([prompt[None].expand(n, -1), rest], dim=1)
        ).last_hidden_state
    cache = make_kv_cache()
    kw = cache_kwargs(body, cache)
    h = body(input_ids=prompt[None], **kw).last_hidden_state.expand(n, -1, -1)
    if rest.shape[1] == 0:
        return h
    reorder_cache(cache, torch.zeros(n, dtype=torch.long, device=rest.device))
    return torch.cat([h, body(input_ids=rest, **kw).last_hidden_state], dim=1)
