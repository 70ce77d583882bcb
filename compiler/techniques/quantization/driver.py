"""``quantize(model, mode=..., calibration=..., exclude=...)``: the quantization entry point.

Every format but ``auto`` is :func:`~graft.compiler.techniques.quantization.core.quantize_format` (analyses,
then rules, then a report); ``auto`` (:mod:`~graft.compiler.techniques.quantization.auto`) quantizes in
several formats with it, times each and keeps the fastest within the accuracy budget.
"""
from __future__ import annotations

import time

from graft.compiler.techniques.quantization.core import QuantizeResult, attach_report, quantize_format


def quantize(model, mode: str = "static", calibration=None, *, exclude=None, calib_method: str = "minmax",
             percentile: float = 99.99, activation: str = "uint8", op_types=None, block_size: int = 32,
             min_weight_elements: int = 0, smooth=None, prepare_pipeline: str | None = "optimize",
             simplify_shapes: bool = True, calib_backend: str = "onnxruntime",
             upgrade_opset: bool = False, eval_data=None, report: bool = True, progress: bool = True,
             threads: int = 0, accuracy_target: float | None = None, max_float_layers: int = 8,
             accuracy_metric=None, ort_cpu_forms: bool = True, embedding_min_rows: int = 0,
             embedding_per_row: bool = True, weight_format: str = "dq", symmetric: bool = True,
             accuracy_level: int = 0, quantize_embeddings: bool = False) -> QuantizeResult:
    """Quantize ``model`` to int8 (or int4 weight-only).

    Args:
        model: ``.onnx`` path, zoo name, ``onnx.ModelProto`` or :class:`ir.Model` (not modified).
        mode: ``static`` (= ``static-per-channel``), ``static-per-tensor``, ``dynamic``,
            ``weight-only-int8``, ``weight-only-int4``, or ``auto`` (see :func:`~graft.compiler.techniques.quantization.auto.auto_quantize`).
        calibration: calibration data: an ``.npz`` path, a directory of ``.npy``, a
            :class:`~graft.compiler.techniques.calibration.CalibrationData` or an iterable of feeds. Needed for static
            modes and for dynamic with ``smooth``.
        exclude: node names, op types, name globs or graft patterns to keep in float.
        calib_method: ``minmax``, ``percentile``, ``entropy`` or ``mse``.
        activation: ``uint8`` (asymmetric) or ``int8`` (symmetric) activations, static modes.
        op_types: op types to quantize (static default: Conv, Gemm, MatMul, Add, Mul, pools).
        block_size: weight-only block length along K: a power of two from 16 to 256.
        weight_format: weight-only only — ``"dq"``: standard ONNX ``MatMul(x, DequantizeLinear(q, s,
            axis=0, block_size))``, which onnxruntime fuses into MatMulNBits (computing with int8
            activations unless ``session.qdq_matmulnbits_accuracy_level`` says otherwise);
            ``"matmulnbits"``: onnxruntime's ``com.microsoft.MatMulNBits`` directly (no opset
            requirement). See :mod:`graft.rules.quantize_nbits`.
        symmetric: weight-only only — symmetric blocks (no zero points) or per-block zero points.
        accuracy_level: weight-only ``matmulnbits`` only — MatMulNBits' compute precision (0 unset:
            float32 on CPU; 4: int8 activations, faster, what the fused ``dq`` form runs at).
        quantize_embeddings: weight-only only — also quantize constant tables read by Gather on axis 0
            (GatherBlockQuantized / DequantizeLinear of the gathered rows); rotary tables qualify too.
        min_weight_elements: weights with fewer elements stay float (dynamic / weight-only).
        smooth: dynamic only — SmoothQuant migration strength α in [0, 1], ``"split"`` to split
            outlier channels, ``"outliers"`` for SmoothQuant on the outlier channels only (see
            :mod:`graft.compiler.techniques.quantization.smooth`), or None for none.
        prepare_pipeline: float pipeline run first (None: only shape inference).
        simplify_shapes: make Reshape specs constant where symbolic shapes prove them (float-exact).
        calib_backend: run calibration in ``"onnxruntime"`` or ``"torch"`` (for models captured from torch).
        upgrade_opset: convert the model to the opset the format needs instead of raising.
        eval_data: held-out feeds for the accuracy report (default: the calibration data).
        report: build the accuracy report.
        progress: progress bars.
        threads: onnxruntime intra-op threads for calibration/evaluation (0: default).
        accuracy_target: minimum score on the calibration data; the layers adding the most noise
            are kept in float (at most ``max_float_layers``) until it is met
            (:mod:`graft.compiler.techniques.quantization.fallback`).
        accuracy_metric: ``(float outputs, quantized outputs, feed) -> score`` per sample for
            ``accuracy_target`` (default: the minimum output cosine).
        ort_cpu_forms: dynamic only — rewrite to the exact forms measured faster in onnxruntime
            CPU (:mod:`graft.rules.quantize_ort`: residual Add before LayerNormalization as Sum, which
            keeps onnxruntime from fusing the slower SkipLayerNormalization).
        embedding_min_rows: dynamic only — embedding tables (Gather on axis 0 of a constant 2-D
            table) with fewer rows stay float (MiniLM's 512-row position and 2-row token-type
            tables: 0.6% of the model, three run-time ops each when quantized).
        embedding_per_row: dynamic only — int8 tables with one scale per row (default) or one per
            table (``Gather`` + ``DequantizeLinear``, as onnxruntime's quantize_dynamic writes).

    Returns:
        :class:`QuantizeResult`.

    Raises:
        QuantizationError: unknown mode/option, opset too old (names the opset needed), missing
            calibration data for a static mode, an exclusion that matches nothing.
        CalibrationDataError: calibration data whose names, shapes or dtypes do not fit the model.
    """
    if mode != "auto":
        return quantize_format(model, mode, calibration, exclude=exclude, calib_method=calib_method,
                               percentile=percentile, activation=activation, op_types=op_types, block_size=block_size,
                               min_weight_elements=min_weight_elements, smooth=smooth,
                               prepare_pipeline=prepare_pipeline, simplify_shapes=simplify_shapes,
                               calib_backend=calib_backend, upgrade_opset=upgrade_opset, eval_data=eval_data,
                               report=report, progress=progress, threads=threads, accuracy_target=accuracy_target,
                               max_float_layers=max_float_layers, accuracy_metric=accuracy_metric,
                               ort_cpu_forms=ort_cpu_forms, embedding_min_rows=embedding_min_rows,
                               embedding_per_row=embedding_per_row, weight_format=weight_format,
                               symmetric=symmetric, accuracy_level=accuracy_level,
                               quantize_embeddings=quantize_embeddings)
    from graft.compiler.techniques.quantization.auto import auto_quantize

    t0 = time.perf_counter()
    ar = auto_quantize(model, calibration, exclude=exclude, calib_method=calib_method, eval_data=eval_data,
                       progress=progress, metric=accuracy_metric, percentile=percentile, activation=activation,
                       op_types=op_types, min_weight_elements=min_weight_elements, smooth=smooth,
                       prepare_pipeline=prepare_pipeline, simplify_shapes=simplify_shapes,
                       upgrade_opset=upgrade_opset)
    res = ar.result
    res.auto = ar
    if report:
        attach_report(res, eval_data, calibration, threads)
    res.seconds["total"] = time.perf_counter() - t0
    return res
