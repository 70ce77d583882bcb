"""Keep the most sensitive layers in float until an accuracy target is met.

Greedy, measured end to end: run the float and the quantized model on the calibration feeds;
while the score (default: the minimum over outputs and samples of the output cosine; or a
user metric) is below the target, exclude the quantized layer that added the most noise
(lowest added-noise SQNR in the per-layer report, see :mod:`graft.compiler.techniques.quantization.report`),
re-quantize, and measure again. Stops at the target or after ``max_layers`` layers, keeping
the best model seen.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from graft.compiler.techniques.quantization.report import accuracy_report

Metric = Callable[[list[np.ndarray], list[np.ndarray], dict], float]


def cosine_metric(float_outs: list[np.ndarray], quant_outs: list[np.ndarray], feed: dict) -> float:
    """Minimum over outputs of the cosine similarity of the flattened outputs (one sample)."""
    best = 1.0
    for f, q in zip(float_outs, quant_outs):
        f = np.asarray(f, np.float64).ravel()
        q = np.asarray(q, np.float64).ravel()
        nf, nq = np.linalg.norm(f), np.linalg.norm(q)
        c = 1.0 if nf == 0 and nq == 0 else float(f @ q / max(nf * nq, 1e-300))
        best = min(best, c)
    return best


def score(float_model, quant_model, feeds: list[dict], metric: Metric | None = None, threads: int = 0) -> float:
    """The worst per-sample ``metric`` (default :func:`cosine_metric`) of ``quant_model`` against ``float_model``."""
    from graft import ir
    from graft.compiler.techniques.calibration.ort_runner import run_feeds

    metric = metric or cosine_metric
    fr = run_feeds(ir.to_onnx(float_model), feeds, threads=threads)
    qr = run_feeds(ir.to_onnx(quant_model), feeds, threads=threads)
    return min(metric(a, b, f) for a, b, f in zip(fr, qr, feeds))


def fall_back_to_float(res, float_model, qmode, calibration, excluded: set[str], target: float, max_layers: int,
                       rebuild: Callable, metric: Metric | None = None, threads: int = 0, progress: bool = False):
    """Exclude layers greedily until ``score >= target`` (see module docstring).

    Args:
        res: the first :class:`~graft.compiler.techniques.quantization.driver.QuantizeResult`.
        rebuild: ``(excluded, notes) -> QuantizeResult`` re-quantizing with more exclusions.

    Returns:
        the best result; its notes say which layers were kept in float and the scores.
    """
    from graft.compiler.techniques.calibration.data import as_calibration_data

    if calibration is None:
        from graft.rules.quantize_params import QuantizationError

        raise QuantizationError("accuracy_target needs calibration data to measure the quantized model on")
    feeds = list(as_calibration_data(calibration, float_model))
    current = score(float_model, res.model, feeds, metric, threads)
    best, best_score = res, current
    history = [f"{current:.5f}"]
    extra: list[str] = []
    while best_score < target and len(extra) < max_layers:
        rep = accuracy_report(float_model, best.model, feeds, layers=best.layers, threads=threads)
        candidates = [l for l in rep.worst_layers(len(rep.layers)) if l.node not in excluded and l.node not in extra]
        if not candidates:
            break
        extra.append(candidates[0].node)
        nxt = rebuild(set(excluded) | set(extra), list(res.notes))
        s = score(float_model, nxt.model, feeds, metric, threads)
        history.append(f"{s:.5f}")
        if s > best_score:
            best, best_score = nxt, s
    if extra:
        kept = [n for n in extra if n in best.excluded]
        best.notes.append(f"accuracy target {target}: kept {len(kept)} layer(s) in float ({', '.join(kept)}); "
                          f"calibration score by step: {' -> '.join(history)}")
    if best_score < target:
        best.notes.append(f"accuracy target {target} not reached (best calibration score {best_score:.5f})")
    return best
