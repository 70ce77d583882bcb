"""SmoothQuant migration factors: the analysis behind ``rules.quantize_dynamic.smoothing_rules``.

For an activation x read by MatMuls with constant weights W_1..W_m (Xiao et al. 2023,
"SmoothQuant", §4, Eq. 4):
    s_k = max|x_k|^α / max_i max_n |W_i[k, n]|^(1-α)
and x W_i = (x / s) (diag(s) W_i). α = 0 leaves the activation's range alone, α = 1 moves it
all into the weights. Channel maxima come from calibration (per-channel max |x| on the last
axis).

With ``alpha="auto"`` α is chosen per activation from a grid by simulating the dynamic int8
MatMul in numpy on the captured calibration activations — uint8 per-tensor activations from
each sample's own min/max (DynamicQuantizeLinear-11), int8 symmetric weights per column —
and keeping the α whose *worst* sample has the highest SQNR of the MatMul outputs (the worst
sample, not the average: rare inputs with outlier tokens are what break a per-tensor scale).
"No smoothing" is one of the candidates, so a group is only smoothed where it helps.
"""
from __future__ import annotations

import numpy as np

import ir
from compiler.quantization.context import node_key

ALPHA_GRID = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_CAPTURE = 64


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


def _factors(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    a = np.maximum(amax.astype(np.float64), 1e-5)
    w = np.maximum(wmax.astype(np.float64), 1e-5)
    s = a ** alpha / w ** (1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    # never scale a channel up: an input whose values exceed the calibrated maxima in a
    # channel with s < 1 would otherwise blow up the per-tensor range at run time
    return np.maximum(s, 1.0)


def _dyn_quant(x: np.ndarray) -> np.ndarray:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / 255.0 if hi > lo else 1.0
    z = np.clip(np.rint(-lo / s), 0, 255)
    return (np.clip(np.rint(x / s) + z, 0, 255) - z) * s


def _wq(w: np.ndarray, per_channel: bool) -> np.ndarray:
    s = np.abs(w).max(axis=0) / 127.0 if per_channel else np.array(np.abs(w).max() / 127.0)
    s = np.where(s > 0, s, 1.0)
    return np.rint(w / s) * s


def simulated_worst_sqnr(samples: list[np.ndarray], weights: list[np.ndarray], s: np.ndarray | None,
                         per_channel: bool = True) -> float:
    """Worst per-sample SQNR (dB) of x W_i under dynamic int8, with smoothing divisor ``s`` (None: none)."""
    wqs = [_wq(w * s[:, None] if s is not None else w, per_channel) for w in weights]
    worst = np.inf
    for x in samples:
        x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
        xq = _dyn_quant(x2 / s if s is not None else x2)
        sig = noise = 0.0
        for w, wq in zip(weights, wqs):
            y = x2 @ w
            sig += float(np.sum(y * y))
            noise += float(np.sum((y - xq @ wq) ** 2))
        worst = min(worst, 10 * np.log10(sig / noise) if noise > 0 else np.inf)
    return float(worst)


def smoothing_factors(model: ir.Model, calibration, alpha, excluded: set[str], *, progress: bool = True,
                      threads: int = 0, per_channel: bool = True):
    """Calibrate the MatMul activations and compute SmoothQuant divisors.

    Args:
        alpha: a float in [0, 1], or ``"auto"`` (per activation, see module docstring).

    Returns:
        (calibration table, {activation name: s}) — activations where no smoothing is best are absent.

    Raises:
        QuantizationError: alpha outside [0, 1] or not ``"auto"``.
    """
    from compiler.calibration import Request, calibrate
    from compiler.quantization.params import QuantizationError

    auto = alpha == "auto"
    if not auto and not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise QuantizationError(f"smooth must be a migration strength in [0, 1] or 'auto', got {alpha!r}")
    groups = matmul_groups(model, excluded)
    reqs = {x: Request(channel_axis=-1, capture=MAX_CAPTURE if auto else 0) for x in groups}
    table = calibrate(model, calibration, reqs, progress=progress, threads=threads)
    out: dict[str, np.ndarray] = {}
    for x, nodes in groups.items():
        amax = table.channel_absmax(x)
        if amax is None:
            continue
        weights = [n.inputs[1].constant().astype(np.float64) for n in nodes]
        if any(w.shape[0] != amax.shape[0] for w in weights):
            continue
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        if not auto:
            out[x] = _factors(amax, wmax, float(alpha))
            continue
        samples = table.captures.get(x, [])
        best, best_s = -np.inf, None
        for a in ALPHA_GRID:
            s = None if a is None else _factors(amax, wmax, a)
            score = simulated_worst_sqnr(samples, weights, s, per_channel)
            if score > best + 1e-9:
                best, best_s = score, s
        if best_s is not None:
            out[x] = best_s
    table.captures.clear()
    return table, out
