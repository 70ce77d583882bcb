"""Calibration: run the float model on representative data and record tensor ranges.

::

    from compiler.calibration import CalibrationData, calibrate
    data = CalibrationData.from_npz("calib.npz", model)          # or from_dir / from_iterable
    table = calibrate(model, data, ["conv1_out", "relu2_out"], method="entropy")
    lo, hi = table.range("conv1_out")

- :mod:`~compiler.calibration.data`: sources (.npz, directory of .npy, iterable, seeded random
  for smoke tests) and validation against the model's inputs.
- :mod:`~compiler.calibration.observers`: MinMax / Percentile / Entropy (KL, TensorRT) / MSE.
- :mod:`~compiler.calibration.ort_runner`: onnxruntime runner exposing intermediates as outputs.
- :mod:`~compiler.calibration.torch_runner`: the same for torch models (forward hooks on an
  ``fx.GraphModule``).
"""
from compiler.calibration.data import (CalibrationData, CalibrationDataError, InputSpec, as_calibration_data,
                                       check_feed, input_specs)
from compiler.calibration.observers import METHODS, Histogram, Observer
from compiler.calibration.ort_runner import CalibrationRunError, Request, calibrate, instrumented_proto, run_feeds
from compiler.calibration.table import CalibrationTable, CalibrationWarning

__all__ = ["CalibrationData", "CalibrationDataError", "CalibrationRunError", "CalibrationTable", "CalibrationWarning",
           "Histogram", "InputSpec", "METHODS", "Observer", "Request", "as_calibration_data", "calibrate", "check_feed",
           "input_specs", "instrumented_proto", "run_feeds"]
