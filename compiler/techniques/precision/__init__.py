"""Mixed precision: float32 → float16 / bfloat16 as rules, decided per node by schema and measurement.

::

    from graft.compiler.techniques.precision import convert_precision
    res = convert_precision(model, "fp16", calibration="calib.npz")   # model: a float32 ir.Model
    print(res.summary())          # converted / kept (with reasons), Casts, size, accuracy vs float32

- :mod:`~graft.compiler.techniques.precision.support`: which tensors may change type (ONNX schemas).
- :mod:`~graft.compiler.techniques.precision.ranges`: ranges measured in float32 (onnxruntime), saturable constants.
- :mod:`~graft.compiler.techniques.precision.reductions`: measured error of normalizations/reductions.
- :mod:`~graft.compiler.techniques.precision.analysis`: the per-node decision, with reasons.
- :mod:`~graft.compiler.techniques.precision.runtime`: which ops onnxruntime CPU can run in the type.
- :mod:`~graft.compiler.techniques.precision.driver`: :func:`convert_precision` and its report.
- :mod:`graft.rules.precision`: the rules (convert_precision, fold_cast_pair) and the plan they read.
"""
from graft.compiler.techniques.precision.driver import (PRECISIONS, OutputError, PrecisionReport, PrecisionResult,
                                                        convert_precision, parse_precision)
from graft.rules.precision import PrecisionError

__all__ = ["OutputError", "PRECISIONS", "PrecisionError", "PrecisionReport", "PrecisionResult", "convert_precision",
           "parse_precision"]
