"""Calibration: run the float model on representative data and record tensor ranges.

::

    from graft.compiler.techniques.calibration import CalibrationData, calibrate
    data = CalibrationData.from_npz("calib.npz", model)          # or from_dir / from_iterable
    table = calibrate(model, data, ["conv1_out", "relu2_out"], method="entropy")
    lo, hi = table.range("conv1_out")

- :mod:`~graft.compiler.techniques.calibration.data`: sources (.npz, directory of .npy, iterable, seeded random
  for smoke tests) and validation against the model's inputs.
- :mod:`~graft.compiler.techniques.calibration.observers`: MinMax / Percentile / Entropy (KL, TensorRT) / MSE.
- :mod:`~graft.compiler.techniques.calibration.ort_runner`: onnxruntime runner exposing intermediates as outputs.
- :mod:`~graft.compiler.techniques.calibration.torch_runner`: the same for torch models (forward hooks on an
  ``fx.GraphModule``).
"""
from graft.compiler.techniques.calibration.data import (CalibrationData, CalibrationDataError, InputSpec, as_calibration_data,
                                       check_feed, input_specs)
from graft.compiler.techniques.calibration.observers import METHODS, Histogram, Observer
from graft.compiler.techniques.calibration.ort_runner import CalibrationRunError, Request, calibrate, instrumented_proto, run_feeds
from graft.compiler.techniques.calibration.table import CalibrationTable, CalibrationWarning

__all__ = ["CalibrationData", "CalibrationDataError", "CalibrationRunError", "CalibrationTable", "CalibrationWarning",
           "Histogram", "InputSpec", "METHODS", "Observer", "Request", "as_calibration_data", "calibrate", "check_feed",
           "input_specs", "instrumented_proto", "run_feeds"]
