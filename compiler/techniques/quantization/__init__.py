"""Int8 quantization: calibration-driven QDQ rules, dynamic and weight-only modes, format by measurement.

::

    from graft.compiler.techniques.quantization import quantize
    res = quantize("model.onnx", mode="static", calibration="calib.npz", exclude=["Softmax"])
    print(res.summary())          # rules fired, accuracy report (per output, per layer SQNR)
    res.save("model.int8.onnx")

- :mod:`~graft.rules.quantize_params`: scales and zero points (ONNX QuantizeLinear spec).
- :mod:`~graft.compiler.techniques.quantization.select`: which nodes/tensors (analysis), exclusions.
- :mod:`~graft.rules.quantize_context`: what analyses hand to the rules in ``rules/quantize_*.py``.
- :mod:`~graft.compiler.techniques.quantization.driver`: :func:`quantize`, the entry point.
- :mod:`~graft.compiler.techniques.quantization.core`: quantizing in one format (what every mode but ``auto`` runs).
- :mod:`~graft.compiler.techniques.quantization.smooth`: SmoothQuant migration factors.
- :mod:`~graft.compiler.techniques.quantization.auto`: ``auto``: build candidates, time them, keep the fastest within budget.
- :mod:`~graft.compiler.techniques.quantization.report`: accuracy report.
"""
from graft.compiler.techniques.quantization.core import QuantizeResult, load_model, prepare
from graft.compiler.techniques.quantization.driver import quantize
from graft.compiler.techniques.quantization.modes import MODES, Mode, check_opset, parse_mode
from graft.rules.quantize_params import QParams, QuantizationError, QuantizationWarning
from graft.compiler.techniques.quantization.report import AccuracyReport, LayerError, OutputError, accuracy_report


def __getattr__(name):
    if name in ("auto_quantize", "AutoResult", "Candidate", "measure_latency"):
        import graft.compiler.techniques.quantization.auto as _auto
        return getattr(_auto, name)
    raise AttributeError(f"module 'graft.compiler.techniques.quantization' has no attribute {name!r}")


__all__ = ["AccuracyReport", "LayerError", "MODES", "Mode", "OutputError", "QParams", "QuantizationError",
           "QuantizationWarning", "QuantizeResult", "accuracy_report", "auto_quantize", "check_opset", "load_model",
           "measure_latency", "parse_mode", "prepare", "quantize"]
