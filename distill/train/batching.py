"""Which examples each optimizer step reads: a pure function of (seed, step), optionally grouped by length,
and mixtures of several pools at fixed shares (task data, augmented requests, general text).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence


class BatchStream:
    """Global batch j is a pure function of (seed, j): resumable and identical for any process count.

    With ``lengths`` (``train.group_by_length``), each epoch's shuffled order is cut into windows of
    ``GROUP_WINDOW`` global batches, each window sorted by length and cut into batches, and the full batches
    shuffled: batches of similar lengths, little padding, still random across the epoch."""

    GROUP_WINDOW = 64  # global batches per sorted window (not a knob: any large window gives the saving)

    def __init__(self, n: int, global_batch: int, seed: int, lengths: Sequence[int] | None = None):
        self.n, self.gb, self.seed, self.lengths = n, global_batch, seed, lengths
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            idx = list(range(self.n))
            rng = random.Random(self.seed * 100003 + epoch)
            rng.shuffle(idx)
            if self.lengths is not None:
                idx = self._grouped(idx, rng)
            self._perms = {epoch: idx}
        return self._perms[epoch]

    def _grouped(self, idx: list[int], rng: random.Random) -> list[int]:
        w, gb = self.GROUP_WINDOW * self.gb, self.gb
        ordered = [i for s in range(0, len(idx), w) for i in sorted(idx[s : s + w], key=self.lengths.__getitem__)]
        full = len(ordered) // gb * gb
        batches = [ordered[s : s + gb] for s in range(0, full, gb)]
        rng.shuffle(batches)
        return [i for b in batches for i in b] + ordered[full:]  # a partial batch stays last: batches stay aligned

    def global_batch(self, j: int) -> list[int]:
        out = []
        for pos in range(j * self.gb, (j + 1) * self.gb):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out


class Mixture(Sequence):
    """Training examples from several pools, each extra pool at a fixed share of every global batch (the
    first pool takes the rest): task data with teacher-labelled augmented requests and general text at,
    say, a quarter of each batch however many of each there are. Indexes like one list (the pools one
    after another); ``train`` draws each pool's part of a batch from its own seeded order."""

    def __init__(self, main: Sequence[dict], extra: Sequence[tuple[Sequence[dict], float]] = ()):
        extra = [(d, share) for d, share in extra if len(d) and share > 0]
        if sum(share for _, share in extra) >= 1:
            raise ValueError("the extra pools' shares must leave part of every batch to the main data")
        self.pools = [main, *(d for d, _ in extra)]
        self.shares = [share for _, share in extra]
        self.offsets = [0]
        for d in self.pools:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        p = bisect.bisect_right(self.offsets, i) - 1
        return self.pools[p][i - self.offsets[p]]

    def __iter__(self):
        for pool in self.pools:
            yield from pool

    def counts(self, global_batch: int) -> list[int]:
        """Examples per pool in a global batch: each extra pool its share (at least one), the main the rest."""
        extra = [max(1, round(share * global_batch)) for share in self.shares]
        if global_batch - sum(extra) < 1:
            raise ValueError(f"a global batch of {global_batch} cannot hold the extra pools' shares {self.shares}")
        return [global_batch - sum(extra), *extra]

    def seen(self, global_batch: int, batches: int) -> list[int]:
        """Distinct examples of each pool (the main first) that the first ``batches`` global batches read:
        each pool's stream goes through a whole shuffled epoch before it repeats one, so a pool larger than
        its count times ``batches`` is partly never read."""
        return [min(len(d), k * batches) for d, k in zip(self.pools, self.counts(global_batch), strict=True)]


class MixedStream:
    """``BatchStream`` over a ``Mixture``: one stream per pool at its count per global batch, the extra
    examples spread evenly through the batch (so every process gets its share)."""

    def __init__(self, data: Mixture, global_batch: int, seed: int, group_by_length: bool):
        self.offsets = data.offsets
        self.streams = [
            BatchStream(len(pool), k, seed + 7919 * p, [len(e["input_ids"]) for e in pool] if group_by_length else None)
            for p, (pool, k) in enumerate(zip(data.pools, data.counts(global_batch), strict=True))
        ]

    def global_batch(self, j: int) -> list[int]:
        placed = []
        for p, stream in enumerate(self.streams):
            part = stream.global_batch(j)
            placed += [((q + 0.5) / len(part), p, self.offsets[p] + i) for q, i in enumerate(part)]
        return [i for *_, i in sorted(placed)]


def make_stream(data: Sequence[dict], global_batch: int, seed: int, group_by_length: bool):
    if isinstance(data, Mixture) and len(data.pools) > 1:
        return MixedStream(data, global_batch, seed, group_by_length)
    lengths = [len(e["input_ids"]) for e in data] if group_by_length else None
    return BatchStream(len(data), global_batch, seed, lengths)
