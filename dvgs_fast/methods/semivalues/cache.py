"""Utilities cached by subset hash.

A subset S of the N source points is keyed by a 128-bit *set* hash: the XOR of two random
64-bit keys per member (Zobrist hashing). XOR does not depend on order, so a permutation's
prefixes are hashed incrementally (``np.bitwise_xor.accumulate``: O(N) for all N prefixes
instead of O(N^2)), and two samplers reaching the same subset by different routes share one
entry. Two different subsets collide with probability ~2^-128 per pair.

Caching pays where subsets repeat: small games (every subset of N <= 20 points is reached many
times), MSR on small N, and the short prefixes of many permutations. A cached utility also makes
the utility a function of the subset alone, also across float rounding of differently batched
refits. The cache is bounded (``max_entries``; further subsets are computed but not stored).
"""
from __future__ import annotations

import numpy as np

Key = tuple[int, int]


class SubsetHasher:
    """Set hashes of subsets of range(n), from keys drawn with a fixed seed."""

    def __init__(self, n: int, seed: int = 0):
        g = np.random.default_rng(np.random.SeedSequence([int(seed) & (2 ** 63 - 1), 0x5EED]))
        self.keys = g.integers(0, np.iinfo(np.uint64).max, size=(2, n), dtype=np.uint64, endpoint=True)

    def of_indices(self, idx: np.ndarray) -> Key:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return (0, 0)
        return (int(np.bitwise_xor.reduce(self.keys[0, idx])), int(np.bitwise_xor.reduce(self.keys[1, idx])))

    def of_masks(self, masks: np.ndarray) -> list[Key]:
        """One key per row of a [B, n] boolean matrix."""
        m = np.asarray(masks, dtype=bool)
        out = []
        for row in m:
            out.append(self.of_indices(np.flatnonzero(row)))
        return out

    def of_prefixes(self, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys of perm[:1], perm[:2], ..., perm[:n] as two uint64 arrays."""
        perm = np.asarray(perm, dtype=np.int64)
        return (np.bitwise_xor.accumulate(self.keys[0, perm]), np.bitwise_xor.accumulate(self.keys[1, perm]))


class UtilityCache:
    """subset key -> utility, with a hit counter (reported in ``result.info``; the refits done
    are ``info["utility_refits"]``)."""

    def __init__(self, max_entries: int = 250_000):        # ~50 MB of dict entries
        self.max_entries = int(max_entries)
        self._d: dict[Key, float] = {}
        self.hits = 0

    def get(self, key: Key) -> float | None:
        v = self._d.get(key)
        if v is not None:
            self.hits += 1
        return v

    def put(self, key: Key, value: float) -> None:
        if key in self._d or len(self._d) < self.max_entries:
            self._d[key] = float(value)

    def __contains__(self, key: Key) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_entries": len(self._d)}
