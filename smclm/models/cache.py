"""KV-cache reordering after resampling.

After a resample, particle i continues the history of particle ``ancestors[i]``. The caches of
the base model (and of a separate twist model) are reordered in place — never recomputed. Only
rows whose ancestor differs from themselves are copied: with ancestors arranged so that every
surviving particle keeps its own slot (``resampling.arrange_in_place``), that is N − #unique
rows instead of N, which is what keeps SMC within a few percent of plain sampling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def reorder_cache(cache: Any, ancestors: Tensor) -> None:
    """Reorder a transformers ``Cache`` along the batch dimension by ``ancestors`` [N].

    A change of batch size (e.g. expanding a batch-1 prompt cache to N particles) or a cache
    type without per-layer key/value tensors uses ``cache.reorder_cache`` (an index_select).
    """
    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None:
        cache.reorder_cache(ancestors)
        return
    n_rows = layers[0].keys.shape[0]
    if ancestors.shape[0] != n_rows:
        cache.reorder_cache(ancestors)
        return
    ancestors = ancestors.to(layers[0].keys.device)
    dst = torch.nonzero(ancestors != torch.arange(n_rows, device=ancestors.device)).squeeze(1)
    if dst.numel() == 0:
        return
    if dst.numel() > n_rows // 2:
        cache.reorder_cache(ancestors)
        return
    src = ancestors[dst]
    for layer in layers:
        # Advanced indexing on the right makes a copy first, so overlapping src/dst is safe.
        layer.keys[dst] = layer.keys[src]
        layer.values[dst] = layer.values[src]
