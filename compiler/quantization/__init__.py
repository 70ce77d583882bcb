"""Int8 quantization: calibration-driven QDQ rules, dynamic and weight-only modes, format by measurement.

::

    from compiler.quantization import quantize
    res = quantize("model.onnx", mode="static", calibration="calib.npz", exclude=["Softmax"])
    print(res.summary())          # rules fired, accuracy report (per output, per layer SQNR)
    res.save("model.int8.onnx")

- :mod:`~compiler.quantization.params`: scales and zero points (ONNX QuantizeLinear spec).
- :mod:`~compiler.quantization.select`: which nodes/tensors (analysis), exclusions.
- :mod:`~compiler.quantization.context`: what analyses hand to the rules in ``rules/quantize_*.py``.
- :mod:`~compiler.quantization.driver`: :func:`quantize`.
- :mod:`~compiler.quantization.smooth`: SmoothQuant migration factors.
- :mod:`~compiler.quantization.auto`: ``auto``: build candidates, time them, keep the fastest within budget.
- :mod:`~compiler.quantization.report`: accuracy report.
"""
from compiler.quantization.driver import QuantizeResult, load_model, prepare, quantize
from compiler.quantization.modes import MODES, Mode, check_opset, parse_mode
from compiler.quantization.params import QParams, QuantizationError, QuantizationWarning
from compiler.quantization.report import AccuracyReport, LayerError, OutputError, accuracy_report


def __getattr__(name):
    if name in ("auto_quantize", "AutoResult", "Candidate", "measure_latency"):
        import compiler.quantization.auto as _auto
        return getattr(_auto, name)
    raise AttributeError(f"module 'compiler.quantization' has no attribute {name!r}")


__all__ = ["AccuracyReport", "LayerError", "MODES", "Mode", "OutputError", "QParams", "QuantizationError",
           "QuantizationWarning", "QuantizeResult", "accuracy_report", "auto_quantize", "check_opset", "load_model",
           "measure_latency", "parse_mode", "prepare", "quantize"]
