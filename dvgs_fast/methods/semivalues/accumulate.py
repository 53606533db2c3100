"""Per-point running statistics of the samples folded so far (float64, Welford updates).

Every sample updates every point once, so the counts are the number of samples folded:

* ``MarginalStats``: one (importance-weighted) marginal per point and sample (permutation
  sampling); value = mean, stderr = sd / sqrt(count) (ddof 1; NaN below 2 samples).
* ``MSRStats``: maximum sample reuse: one utility per sample, an in-sample update for the
  points in the subset and an out-of-sample one for the others; value = mean_in - mean_out,
  stderr = sqrt(var_in / c_in + var_out / c_out) (the two means are independent: disjoint
  samples), counts = min(c_in, c_out) (pyDVL's convention: a value needs both sides).

``history_window`` > 0 keeps the running means after each of the last that many samples (the
look-back of ``HistoryDeviation``).
"""
from __future__ import annotations

import numpy as np


class _Welford:
    def __init__(self, n: int):
        self.count = np.zeros(n, dtype=np.int64)
        self.mean = np.zeros(n)
        self.m2 = np.zeros(n)

    def add(self, x: np.ndarray, where: np.ndarray | None = None) -> None:
        if where is None:
            self.count += 1
            d = x - self.mean
            self.mean += d / self.count
            self.m2 += d * (x - self.mean)
            return
        c = self.count[where] + 1
        self.count[where] = c
        d = x - self.mean[where]
        self.mean[where] += d / c
        self.m2[where] += d * (x - self.mean[where])

    def var_of_mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 1, self.m2 / np.maximum(self.count - 1, 1) / np.maximum(self.count, 1), np.nan)


class _History:
    def __init__(self, n: int, window: int):
        self.buf = np.zeros((window, n)) if window else None
        self.filled = 0

    def push(self, values: np.ndarray) -> None:
        if self.buf is None:
            return
        self.buf[self.filled % len(self.buf)] = values
        self.filled += 1

    def get(self) -> np.ndarray:
        w = len(self.buf)
        if self.filled <= w:
            return self.buf[: self.filled].copy()
        k = self.filled % w
        return np.concatenate([self.buf[k:], self.buf[:k]])


class MarginalStats:
    n_extra = 2            # a permutation also reports (refits, truncated)

    def __init__(self, n: int, history_window: int = 0):
        self.n = n
        self._w = _Welford(n)
        self._h = _History(n, history_window)
        self.samples = 0

    def add_record(self, vec: np.ndarray, extras: tuple = ()) -> None:
        self.add(vec)

    def add(self, vec: np.ndarray) -> None:
        self._w.add(np.asarray(vec, dtype=np.float64))
        self.samples += 1
        self._h.push(self._w.mean)

    def values(self) -> np.ndarray:
        return self._w.mean.copy()

    def stderr(self) -> np.ndarray:
        return np.sqrt(self._w.var_of_mean())

    def counts(self) -> np.ndarray:
        return self._w.count.copy()

    def history(self) -> np.ndarray:
        return self._h.get()


class MSRStats:
    n_extra = 1            # the sample's utility; the vector is its 0/1 membership mask

    def __init__(self, n: int, history_window: int = 0):
        self.n = n
        self._in, self._out = _Welford(n), _Welford(n)
        self._h = _History(n, history_window)
        self.samples = 0

    def add_record(self, mask: np.ndarray, extras: tuple) -> None:
        self.add(mask, extras[0])

    def add(self, mask: np.ndarray, score: float) -> None:
        m = np.asarray(mask) > 0.5
        self._in.add(np.full(int(m.sum()), float(score)), m)
        self._out.add(np.full(int((~m).sum()), float(score)), ~m)
        self.samples += 1
        if self._h.buf is not None:
            self._h.push(self.values())

    def values(self) -> np.ndarray:
        both = (self._in.count > 0) & (self._out.count > 0)
        return np.where(both, self._in.mean - self._out.mean, 0.0)

    def stderr(self) -> np.ndarray:
        return np.sqrt(self._in.var_of_mean() + self._out.var_of_mean())

    def counts(self) -> np.ndarray:
        return np.minimum(self._in.count, self._out.count)

    def history(self) -> np.ndarray:
        return self._h.get()
