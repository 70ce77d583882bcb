"""SmoothQuant migration factors: the analysis behind ``graft.rules.quantize_dynamic.smoothing_rules``.

For an activation x read by MatMuls with constant weights W_1..W_m (Xiao et al. 2023,
"SmoothQuant", §4, Eq. 4):
    s_k = max|x_k|^α / max_i max_n |W_i[k, n]|^(1-α)
and x W_i = (x / s) (diag(s) W_i). α = 0 leaves the activation's range alone, α = 1 moves it
all into the weights. Channel maxima come from calibration (per-channel max |x| on the last
axis).

``alpha="split"`` splits outlier channels instead (Zhao et al. 2019, "Improving Neural Network
Quantization without Retraining using Outlier Channel Splitting", §3): a channel whose max
exceeds T = r · median_k max|x_k| (r = ``OUTLIER_RATIO``) is repeated m_k = ceil(max|x_k| / T)
times, each copy carrying x_k / m_k against an unchanged weight row, so its range drops to T
while no weight row grows. T is the lowest threshold ≥ r · median whose copies number at most
``SPLIT_BUDGET`` (8) extra channels: the few massive channels are split, the merely large ones
are not (``SPLIT_BUDGET = None``: every channel above r · median, up to K/8 extra channels, the
largest first). Accuracy constants were chosen on the calibration sentences only
(all-MiniLM-L6-v2, the 40 calibration sentences of ``examples/data/sentences.txt``, minimum
embedding cosine to float): r = 2 gave 0.9935, r = 3, 4, 6 gave 0.9919, 0.9922, 0.9891; budgets
of 4, 8, 16 extra channels gave 0.9924, 0.9934, 0.9933 against 0.9935 without a budget, and
the budget of 8 runs ~1% faster at 1 thread (fewer int8 GEMM columns on long sentences). Only activations with
a massive outlier (max channel above ``MASSIVE_RATIO`` × the median channel) are split: each
split costs three small ops (Gather, Concat, Mul) at run time. This targets what
breaks per-tensor activation scales in transformers — one or two channels carrying "massive
activations" (Sun et al. 2024, "Massive Activations in Large Language Models", §2).

s is never below 1: a channel is only divided, so an input exceeding the calibrated maximum in
some channel cannot blow up the run-time range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft import ir
from graft.rules.quantize_context import node_key

OUTLIER_RATIO = 2.0
MASSIVE_RATIO = 5.0
SPLIT_BUDGET = 8  # max extra channels per split activation (None: every channel above T, up to K/8)
MAX_EXTRA_CHANNELS = 0.125  # split at most K/8 extra channels per activation


@dataclass
class Migration:
    """How one activation's range moves: x' = x[..., index] * a, W' = W[index] * b[:, None].

    ``index`` None means the identity; for every input channel k, Σ_{j: index_j = k} a_j b_j = 1.
    """

    index: np.ndarray | None
    a: np.ndarray
    b: np.ndarray
    channels: int

    @classmethod
    def smooth(cls, s: np.ndarray) -> "Migration":
        return cls(None, 1.0 / s, s.astype(np.float64), len(s))

    @classmethod
    def split(cls, m: np.ndarray) -> "Migration":
        """Channel k repeated m_k times, each copy carrying x_k / m_k."""
        m = np.maximum(np.asarray(m, dtype=np.int64), 1)
        extra = np.repeat(np.arange(len(m)), m - 1)
        index = np.concatenate([np.arange(len(m)), extra])
        a = 1.0 / m[index].astype(np.float64)
        return cls(index, a, np.ones(len(index)), len(m))


def matmul_groups(model: ir.Model, excluded: set[str]) -> dict[str, list]:
    """Activation name → MatMul nodes reading it with a constant 2-D float weight (not excluded)."""
    groups: dict[str, list] = {}
    for n in model.graph:
        if n.op_type != "MatMul" or n.domain != "" or node_key(n) in excluded:
            continue
        x, w = n.inputs
        wa = w.constant() if w is not None else None
        if x is None or x.constant() is not None or wa is None or wa.ndim != 2 or wa.dtype.kind != "f":
            continue
        groups.setdefault(x.name, []).append(n)
    return groups


def _split_counts(amax: np.ndarray) -> np.ndarray:
    a = np.maximum(amax.astype(np.float64), 1e-12)
    t = OUTLIER_RATIO * float(np.median(a))
    if a.max() < MASSIVE_RATIO * float(np.median(a)):
        return np.ones(len(a), dtype=np.int64)  # no massive outlier: the split would cost more than it saves
    if SPLIT_BUDGET is not None:
        # the lowest threshold T >= r * median whose copies fit the budget: every split channel's
        # range falls to T, with at most SPLIT_BUDGET extra channels (bisection on T)
        def extra(th):
            return int(np.sum(np.maximum(np.ceil(a / th) - 1, 0)))
        lo, hi = t, float(a.max())
        if extra(lo) > SPLIT_BUDGET:
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if extra(mid) > SPLIT_BUDGET else (lo, mid)
            t = hi
        return np.where(a > t, np.ceil(a / t), 1).astype(np.int64)
    m = np.where(a > t, np.ceil(a / t), 1).astype(np.int64)
    budget = int(len(a) * MAX_EXTRA_CHANNELS)
    order = np.argsort(-a)
    used = 0
    for k in order:
        if m[k] <= 1:
            break
        if used + m[k] - 1 > budget:
            m[k] = max(1, budget - used + 1)
        used += m[k] - 1
    return m


def _outlier_factors(amax: np.ndarray) -> np.ndarray:
    """SmoothQuant restricted to the outlier channels: s_k = max|x_k| / T above T = r · median, else 1."""
    a = np.maximum(amax.astype(np.float64), 1e-12)
    med = float(np.median(a))
    if a.max() < MASSIVE_RATIO * med:
        return np.ones(len(a))
    return np.maximum(a / (OUTLIER_RATIO * med), 1.0)


def _factors(amax: np.ndarray, wmax: np.ndarray, alpha) -> np.ndarray:
    a = np.maximum(amax.astype(np.float64), 1e-5)
    w = np.maximum(wmax.astype(np.float64), 1e-5)
    s = a ** alpha / w ** (1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    # never scale a channel up: an input whose values exceed the calibrated maxima in a
    # channel with s < 1 would otherwise blow up the per-tensor range at run time
    return np.maximum(s, 1.0)


def smoothing_factors(model: ir.Model, calibration, alpha, excluded: set[str], *, progress: bool = True,
                      threads: int = 0, backend: str = "onnxruntime"):
    """Calibrate the MatMul activations and compute SmoothQuant divisors.

    Args:
        alpha: a migration strength in [0, 1], ``"split"`` (see module docstring), or ``"outliers"``:
            SmoothQuant only on the channels above T = r · median, s_k = max|x_k| / T (one Mul at
            run time instead of split's three ops, but the weight rows grow by s_k; on MiniLM's
            calibration sentences it gave min cosine 0.9647, worse than no migration, 0.9747).

    Returns:
        (calibration table, {activation name: :class:`Migration`}) — only activations that change.

    Raises:
        QuantizationError: alpha outside [0, 1] and not ``"split"``.
    """
    from graft.compiler.techniques.calibration import Request, calibrate
    from graft.rules.quantize_params import QuantizationError

    if alpha not in ("split", "outliers") and not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise QuantizationError(f"smooth must be a migration strength in [0, 1] or 'split', got {alpha!r}")
    groups = matmul_groups(model, excluded)
    table = calibrate(model, calibration, {x: Request(channel_axis=-1) for x in groups}, progress=progress,
                      threads=threads, backend=backend)
    out: dict[str, np.ndarray] = {}
    for x, nodes in groups.items():
        amax = table.channel_absmax(x)
        if amax is None:
            continue
        weights = [n.inputs[1].constant() for n in nodes]
        if any(w.shape[0] != amax.shape[0] for w in weights):
            continue
        wmax = np.max([np.abs(w.astype(np.float64)).max(axis=1) for w in weights], axis=0)
        if alpha == "split":
            counts = _split_counts(amax)
            if np.any(counts > 1):
                out[x] = Migration.split(counts)
            continue
        if alpha == "outliers":
            s = _outlier_factors(amax)
            if np.any(s > 1.0):
                out[x] = Migration.smooth(s)
            continue
        s = _factors(amax, wmax, alpha)
        if np.any(s > 1.0):
            out[x] = Migration.smooth(s)
    return table, out
