"""The GFlowNet replay buffer (baselines-spec B3/B4.5): per prompt, the top-k sequences by
untempered log R = log σ̃, de-duplicated with Hu et al.'s rule.

One buffer per key (the prompt; for conditional tasks the o tokens, so a key is a tuple of ints).
Each key holds at most ``capacity`` entries in a min-heap ordered by log R, so the lowest-reward
entry is the one evicted. Adding a sequence s with log R = r (``add``):

1. an exact duplicate of an entry is skipped;
2. otherwise, if its token edit distance to an entry e is < ``sim_tolerance``·(|s| + |e|), the
   two are near-duplicates and only the higher-reward one is kept: s is skipped when
   r ≤ log R(e), else e is replaced by s (the first such entry only, as the reference does);
3. otherwise s is pushed; when the key is full, the lowest-reward entry (possibly s) is popped.

Sampling is uniform with replacement (Hu's next-sentence buffer). log R is stored untempered and
re-tempered by the caller at the current τ_R. ``sim_tolerance=0`` keeps exact de-duplication only.

Variable-length outputs (stopping tasks): ``add_batch(..., lengths=ℓ)`` stores each finished
sequence z_1:ℓ without its padding (its stop included), so de-duplication compares the sequences
themselves, as Hu's does, and the tolerance uses their own lengths; ``sample(..., width=T,
pad_id=…)`` pads the drawn entries back to T columns with the task's pad id (the first stop id),
the form the sampler returns. The per-prefix rewards of modified SubTB are not stored: the
learner recomputes them from the tokens (they are a deterministic function of them).
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import torch
from torch import Tensor

Key = tuple[int, ...]


def edit_distances(
    a: np.ndarray, others: np.ndarray, lengths: np.ndarray | None = None
) -> np.ndarray:
    """Levenshtein distance between token sequence a [L] and each row of others [M, L'] → [M].

    One dynamic-programming row per token of a, vectorised over the M rows; the insertion chain
    along a row is a cumulative minimum: d[j] = min_k≤j (tmp[k] + j − k). ``lengths`` [M]: row m
    is others[m, :lengths[m]] (the rest is padding, never read into the answer): the DP column
    j holds the distance to the row's first j tokens, so the answer is column lengths[m].
    """
    m, width = others.shape
    ar = np.arange(width + 1)
    prev = np.broadcast_to(ar, (m, width + 1)).copy()
    for i, tok in enumerate(a, start=1):
        cost = (others != tok).astype(np.int64)
        tmp = np.empty_like(prev)
        tmp[:, 0] = i
        tmp[:, 1:] = np.minimum(prev[:, 1:] + 1, prev[:, :-1] + cost)
        prev = np.minimum.accumulate(tmp - ar, axis=1) + ar
    if lengths is None:
        return prev[:, -1]
    return prev[np.arange(m), lengths]


class ReplayBuffer:
    """Top-``capacity`` sequences per key by untempered log R, with near-duplicate removal."""

    def __init__(self, capacity: int = 50, sim_tolerance: float = 0.25) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.sim_tolerance = float(sim_tolerance)
        self._heaps: dict[Key, list[tuple[float, tuple[int, ...]]]] = {}

    def __len__(self) -> int:
        return sum(len(h) for h in self._heaps.values())

    def size(self, key: Key = ()) -> int:
        return len(self._heaps.get(key, ()))

    def add(self, key: Key, tokens: Tensor | list[int], log_r: float) -> bool:
        """Offer one sequence; returns whether it is in the buffer afterwards."""
        seq = tuple(int(x) for x in (tokens.tolist() if isinstance(tokens, Tensor) else tokens))
        log_r = float(log_r)
        heap = self._heaps.setdefault(key, [])
        if any(s == seq for _, s in heap):
            return False
        if heap and self.sim_tolerance > 0:
            lens = np.array([len(s) for _, s in heap], dtype=np.int64)
            if (lens == lens[0]).all():  # fixed length (every entry of a fixed-length task)
                others = np.array([s for _, s in heap], dtype=np.int64)
                dist = edit_distances(np.array(seq, dtype=np.int64), others)
            else:  # variable lengths: pad with -1 (never a token) and read each row's column
                others = np.full((len(heap), int(lens.max())), -1, dtype=np.int64)
                for i, (_, s) in enumerate(heap):
                    others[i, : len(s)] = s
                dist = edit_distances(np.array(seq, dtype=np.int64), others, lens)
            near = np.nonzero(dist < self.sim_tolerance * (len(seq) + lens))[0]
            if near.size:
                i = int(near[0])
                if heap[i][0] >= log_r:
                    return False
                heap[i] = (log_r, seq)
                heapq.heapify(heap)
                return True
        if len(heap) >= self.capacity:
            popped = heapq.heappushpop(heap, (log_r, seq))
            return popped[1] != seq
        heapq.heappush(heap, (log_r, seq))
        return True

    def add_batch(
        self, keys: list[Key], tokens: Tensor, log_r: Tensor, lengths: Tensor | None = None
    ) -> None:
        """Offer rows tokens [N, T] with log R [N] (untempered), row i under keys[i]. lengths
        [N] (stopping tasks): row i is the finished sequence tokens[i, :lengths[i]], stored
        without the padding after it."""
        toks, rs = tokens.detach().cpu().tolist(), log_r.detach().double().cpu().tolist()
        if lengths is not None:
            toks = [s[:ell] for s, ell in zip(toks, lengths.detach().cpu().tolist())]
        for k, s, r in zip(keys, toks, rs):
            self.add(k, s, r)

    def entries(self, key: Key = ()) -> list[tuple[float, tuple[int, ...]]]:
        """(log R, tokens) of a key, highest log R first."""
        return sorted(self._heaps.get(key, ()), reverse=True)

    def sample(
        self,
        key: Key,
        n: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        width: int | None = None,
        pad_id: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """n entries of a key, uniformly with replacement: tokens [n, T] (long), log R [n].
        Entries of different lengths (stopping tasks) are padded with ``pad_id`` to ``width``
        columns (default: the longest drawn)."""
        heap = self._heaps.get(key)
        if not heap:
            raise ValueError(f"the replay buffer has no entries for key {key}")
        idx = torch.randint(0, len(heap), (n,), generator=generator, device=generator.device)
        rows = [heap[i] for i in idx.tolist()]
        seqs = [list(s) for _, s in rows]
        cols = max(len(s) for s in seqs) if width is None else width
        if any(len(s) != cols for s in seqs):
            if pad_id is None:
                raise ValueError("entries of different lengths need a pad_id to be padded")
            if any(len(s) > cols for s in seqs):
                raise ValueError(f"a buffered sequence is longer than width={cols}")
            seqs = [s + [pad_id] * (cols - len(s)) for s in seqs]
        tokens = torch.tensor(seqs, dtype=torch.long, device=device)
        log_r = torch.tensor([r for r, _ in rows], dtype=torch.float32, device=device)
        return tokens, log_r

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "sim_tolerance": self.sim_tolerance,
            "heaps": {k: list(h) for k, h in self._heaps.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.sim_tolerance = float(state["sim_tolerance"])
        self._heaps = {tuple(k): [tuple(e) for e in h] for k, h in state["heaps"].items()}
