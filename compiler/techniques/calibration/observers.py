"""Observers: running statistics of a tensor over calibration batches, and the range methods.

One :class:`Observer` per tensor keeps min/max, counts of non-finite values, optionally a
per-channel max |x| (for SmoothQuant) and a histogram (for the histogram methods). A
:class:`RangeMethod` turns the statistics into the range ``[lo, hi]`` to quantize to:

- ``minmax``: the observed min and max.
- ``percentile``: the ``(100-p)``-th and ``p``-th percentiles of the values (default
  p = 99.99), read off the histogram's cumulative counts.
- ``entropy``: the threshold T minimizing KL(P || Q) between the histogram of |x|
  clipped at T and its 128-level (int8) quantization, as in TensorRT
  (Migacz 2017, "8-bit Inference with TensorRT", GTC; the algorithm in its slide
  "Entropy calibration: pseudocode"). Non-negative tensors use the positive half and
  256 levels (uint8).
- ``mse``: the range ``[a*min, a*max]`` minimizing the expected squared quantization
  error (rounding plus clipping) of the histogram under the target integer grid
  (Banner et al. 2019, "Post training 4-bit quantization of convolutional networks
  for rapid-deployment", §3, solved numerically over a grid of ``a``).

Non-finite values (inf, NaN) are counted and left out of every statistic, so they never
reach a scale; a tensor with no finite values at all ends with range [0, 0], which
:func:`graft.rules.quantize_params.activation_params` maps to a safe scale with a warning.

The histogram is signed and symmetric, ``[-R, R]`` in ``bins`` bins. When a batch exceeds
``R``, ``R`` doubles and adjacent bin pairs merge, which is exact, so batches can arrive in
any order without a first min/max pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("minmax", "percentile", "entropy", "mse")


class Histogram:
    """Counts of values in ``bins`` equal bins over ``[-R, R]`` (``bins`` a multiple of 4)."""

    def __init__(self, bins: int = 4096):
        if bins % 4:
            raise ValueError(f"histogram bins must be a multiple of 4, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.R = 0.0
        self._pending_zeros = 0

    def add(self, x: np.ndarray) -> None:
        """Add finite values ``x`` (any shape)."""
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        amax = float(np.max(np.abs(x)))
        if amax == 0.0:
            if self.R == 0.0:
                self._pending_zeros += x.size
            else:
                self.counts[self.bins // 2] += x.size
            return
        if self.R == 0.0:
            self.R = amax
            self.counts[self.bins // 2] += self._pending_zeros
            self._pending_zeros = 0
        while amax > self.R:
            half = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros(self.bins, dtype=np.float64)
            q = self.bins // 4
            self.counts[q:3 * q] = half
            self.R *= 2.0
        h, _ = np.histogram(x, bins=self.bins, range=(-self.R, self.R))
        self.counts += h

    @property
    def total(self) -> float:
        return float(self.counts.sum()) + self._pending_zeros

    @property
    def width(self) -> float:
        return 2.0 * self.R / self.bins

    def centers(self) -> np.ndarray:
        return -self.R + (np.arange(self.bins) + 0.5) * self.width

    def percentile(self, q: float) -> float:
        """Value below which ``q`` percent of the counts lie (linear within a bin)."""
        if self.R == 0.0:
            return 0.0
        cdf = np.cumsum(self.counts)
        target = q / 100.0 * cdf[-1]
        i = int(np.searchsorted(cdf, target))
        i = min(i, self.bins - 1)
        prev = cdf[i - 1] if i > 0 else 0.0
        frac = 0.0 if self.counts[i] == 0 else (target - prev) / self.counts[i]
        return float(-self.R + (i + min(max(frac, 0.0), 1.0)) * self.width)

    def abs_counts(self) -> np.ndarray:
        """Histogram of |x|: ``bins // 2`` bins over ``[0, R]``."""
        h = self.bins // 2
        return self.counts[h:] + self.counts[:h][::-1]


def _kl_threshold(hist: np.ndarray, width: float, levels: int, start: int | None = None) -> float:
    """TensorRT's entropy calibration on a histogram of non-negative values (bin i covers [i*w, (i+1)*w))."""
    n = len(hist)
    start = levels if start is None else start
    if n <= start or hist.sum() == 0:
        nz = np.nonzero(hist)[0]
        return float((nz[-1] + 1) * width) if len(nz) else 0.0
    best_i, best_kl = n, np.inf
    step = max(1, (n - start) // 512)
    csum = np.cumsum(hist)
    total = csum[-1]
    for i in range(start, n + 1, step):
        p = hist[:i].copy()
        p[i - 1] += total - csum[i - 1]          # outliers fold into the last kept bin
        # quantize the first i bins into `levels` groups, then spread each group's mass
        # evenly over its non-empty bins (empty bins stay empty)
        edges = (np.arange(levels) * i) // levels
        src = hist[:i]
        nonzero = (src > 0).astype(np.float64)
        gsum = np.add.reduceat(src, edges)
        gcnt = np.add.reduceat(nonzero, edges)
        reps = np.diff(np.append(edges, i))
        per_bin = np.where(gcnt > 0, gsum / np.maximum(gcnt, 1), 0.0)
        q = np.repeat(per_bin, reps) * nonzero
        mask = p > 0
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        pn = p[mask] / ps
        qn = q[mask] / qs
        # bins where P has mass but Q has none (only the outlier bin can): smooth Q there
        qn = np.where(qn > 0, qn, 1e-10)
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(best_i * width)


@dataclass
class Observer:
    """Running statistics of one tensor.

    Attributes:
        name: tensor name.
        min, max: over finite values (``inf``/``-inf`` until something finite is seen).
        count: finite values seen; nonfinite: inf/NaN values seen (ignored).
        channel_absmax: max |x| per index of ``channel_axis`` (when requested).
        hist: :class:`Histogram` (when requested).
    """

    name: str
    histogram: bool = False
    channel_axis: int | None = None
    bins: int = 4096

    def __post_init__(self):
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.nonfinite = 0
        self.channel_absmax: np.ndarray | None = None
        self.hist = Histogram(self.bins) if self.histogram else None
        self.batches = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            return
        self.batches += 1
        finite = np.isfinite(x)
        nf = int(x.size - np.count_nonzero(finite))
        if nf:
            self.nonfinite += nf
            xs = np.where(finite, x, 0.0).astype(x.dtype)
            vals = x[finite]
        else:
            xs, vals = x, x
        if vals.size:
            self.min = min(self.min, float(vals.min()))
            self.max = max(self.max, float(vals.max()))
            self.count += int(vals.size)
        if self.channel_axis is not None and x.ndim:
            ax = self.channel_axis % x.ndim
            red = tuple(i for i in range(x.ndim) if i != ax)
            cm = np.abs(xs).max(axis=red).astype(np.float64) if red else np.abs(xs).astype(np.float64)
            if self.channel_absmax is None or self.channel_absmax.shape != cm.shape:
                self.channel_absmax = cm if self.channel_absmax is None else np.maximum(
                    _fit(self.channel_absmax, cm.shape), cm)
            else:
                np.maximum(self.channel_absmax, cm, out=self.channel_absmax)
        if self.hist is not None and vals.size:
            self.hist.add(vals)

    @property
    def seen_finite(self) -> bool:
        return self.count > 0

    def range(self, method: str = "minmax", *, percentile: float = 99.99, symmetric: bool = False,
              num_levels: int = 256) -> tuple[float, float]:
        """The range to quantize to, by ``method`` (see module docstring).

        Args:
            percentile: for ``percentile``.
            symmetric: the target grid is symmetric (int8, zero point 0) — for ``mse``/``entropy``.
            num_levels: integer levels of the target grid (256 for 8 bits).

        Raises:
            ValueError: unknown method, or a histogram method without a histogram.
        """
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
        if not self.seen_finite:
            return 0.0, 0.0
        lo, hi = self.min, self.max
        if method == "minmax":
            return lo, hi
        if self.hist is None:
            raise ValueError(f"tensor {self.name!r}: method {method!r} needs a histogram; observe it with "
                             f"histogram=True")
        h = self.hist
        if method == "percentile":
            p_lo = 0.0 if lo >= 0 else h.percentile(100.0 - percentile)
            p_hi = 0.0 if hi <= 0 else h.percentile(percentile)
            return max(lo, p_lo), min(hi, p_hi)
        if method == "entropy":
            if lo >= 0:
                t = _kl_threshold(h.counts[h.bins // 2:], h.width, 256 if not symmetric else 128)
                return 0.0, min(hi, t)
            t = _kl_threshold(h.abs_counts(), h.width, 128)
            return max(lo, -t), min(hi, t)
        return _mse_range(h, lo, hi, symmetric, num_levels)


def _fit(a: np.ndarray, shape) -> np.ndarray:
    # per-channel stats of tensors whose channel count varies between batches cannot be merged
    raise ValueError(f"per-channel statistics changed shape from {a.shape} to {shape} between batches")


def _mse_range(h: Histogram, lo: float, hi: float, symmetric: bool, num_levels: int,
               candidates: int = 100) -> tuple[float, float]:
    c = h.centers()
    n = h.counts
    keep = n > 0
    c, n = c[keep], n[keep]
    best, best_err = (lo, hi), np.inf
    for a in np.linspace(1.0 / candidates, 1.0, candidates):
        clo, chi = min(lo * a, 0.0), max(hi * a, 0.0)
        if symmetric:
            amax = max(-clo, chi)
            s = amax / ((num_levels - 2) / 2) if amax > 0 else 1.0
            q = np.clip(np.rint(c / s), -(num_levels // 2 - 1), num_levels // 2 - 1)
            deq = q * s
        else:
            s = (chi - clo) / (num_levels - 1) if chi > clo else 1.0
            z = np.clip(np.rint(-clo / s), 0, num_levels - 1)
            q = np.clip(np.rint(c / s) + z, 0, num_levels - 1)
            deq = (q - z) * s
        err = float(np.sum(n * (c - deq) ** 2))
        if err < best_err:
            best_err, best = err, (clo if lo < 0 else lo, chi if hi > 0 else hi)
    return best
