"""Calibrate an ONNX model in onnxruntime: intermediate tensors become extra graph outputs.

The model is exported from the IR with every tensor a rule asked about added to the graph
outputs (typed from the IR, after :func:`graft.ir.shapes.infer_shapes`), run once per feed
of the :class:`~graft.compiler.techniques.calibration.data.CalibrationData` with a progress bar, and each
requested tensor's values go to its :class:`~graft.compiler.techniques.calibration.observers.Observer`.
onnxruntime runs with basic graph optimizations only (constant folding and the like): a
graph output is never fused away, so the observed values are the float model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import onnx

from graft import ir
from graft.compiler.techniques.calibration.data import CalibrationData, as_calibration_data
from graft.compiler.techniques.calibration.observers import Observer
from graft.compiler.techniques.calibration.table import CalibrationTable

@dataclass(frozen=True)
class Request:
    """What to keep for one tensor: a histogram, per-channel max |x| along ``channel_axis``,
    raw values of the first ``capture`` feeds."""

    histogram: bool = False
    channel_axis: int | None = None
    capture: int = 0


class CalibrationRunError(RuntimeError):
    """onnxruntime could not run the model on a calibration feed (names the sample and the reason)."""


def _session(data: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def instrumented_proto(model: ir.Model, names: Iterable[str]) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` as a ModelProto whose outputs also include ``names`` (float tensors only).

    Returns:
        (proto, the names actually exposed, in order).
    """
    proto = ir.to_onnx(model)
    values = {}
    for g in [model.graph]:
        for v in g.inputs:
            values[v.name] = v
        for n in g:
            for o in n.outputs:
                values[o.name] = o
    existing = {o.name for o in proto.graph.output}
    exposed = []
    for name in dict.fromkeys(names):
        v = values.get(name)
        if v is None or v.dtype is None or not v.dtype.is_float:
            continue
        exposed.append(name)
        if name in existing:
            continue
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, int(v.dtype), None))
    return proto, exposed


class _OrtRunner:
    """Runs the instrumented model in onnxruntime."""

    name = "onnxruntime"

    def __init__(self, model: ir.Model, tensors, threads: int):
        proto, self.exposed = instrumented_proto(model, tensors)
        self.sess = _session(proto.SerializeToString(), threads)

    def __call__(self, feed: dict) -> list[np.ndarray]:
        return self.sess.run(self.exposed, feed)


def calibrate(model: ir.Model, data, tensors: Mapping[str, Request] | Iterable[str], *, method: str = "minmax",
              percentile: float = 99.99, progress: bool = True, threads: int = 0,
              backend: str = "onnxruntime") -> CalibrationTable:
    """Run ``model`` on ``data`` and observe ``tensors``.

    Args:
        model: the float model (types filled, e.g. by ``graft.ir.shapes.infer_shapes``).
        data: a :class:`CalibrationData`, an ``.npz`` path, a directory of ``.npy``, or an iterable.
        tensors: names to observe, or name → :class:`Request`.
        method: default range method of the table; histogram methods get histograms for all tensors.
        progress: show a tqdm progress bar.
        threads: onnxruntime intra-op threads (0: its default).
        backend: ``"onnxruntime"`` (ONNX input) or ``"torch"`` (torch input: the model runs as a
            ``torch.fx.GraphModule``, see :mod:`graft.compiler.techniques.calibration.torch_runner`).

    Returns:
        a :class:`CalibrationTable`.

    Raises:
        CalibrationDataError: a feed does not fit the model's inputs.
        CalibrationRunError: the backend fails on a feed.
        ValueError: unknown backend.
    """
    from tqdm.auto import tqdm

    data = as_calibration_data(data, model)
    if not isinstance(tensors, Mapping):
        tensors = {t: Request() for t in tensors}
    need_hist = method != "minmax"
    if backend == "onnxruntime":
        runner = _OrtRunner(model, tensors, threads)
    elif backend == "torch":
        from graft.compiler.techniques.calibration.torch_runner import TorchRunner

        runner = TorchRunner(model, tensors)
    else:
        raise ValueError(f"calibration backend must be 'onnxruntime' or 'torch', got {backend!r}")
    exposed = runner.exposed
    observers = {n: Observer(n, histogram=need_hist or tensors[n].histogram, channel_axis=tensors[n].channel_axis)
                 for n in exposed}
    table = CalibrationTable(observers, method=method, percentile=percentile, source=data.source,
                             synthetic=data.synthetic)
    total = data.length if data.length is not None else None
    bar = tqdm(total=total, desc=f"calibrating ({runner.name})", unit="batch", disable=not progress, leave=False)
    n = 0
    try:
        for i, feed in enumerate(data):
            try:
                outs = runner(feed)
            except Exception as e:  # each backend raises its own exception types
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CalibrationRunError(f"{data.source}, sample {i}: {runner.name} failed on the float model: "
                                          f"{msg}") from None
            for name, arr in zip(exposed, outs):
                observers[name].update(arr)
                cap = tensors[name].capture
                if cap and len(table.captures.get(name, ())) < cap:
                    table.captures.setdefault(name, []).append(np.array(arr))
            n += 1
            bar.update(1)
    finally:
        bar.close()
    if n == 0:
        from graft.compiler.techniques.calibration.data import CalibrationDataError

        raise CalibrationDataError(f"{data.source}: holds no samples")
    table.samples = n
    return table


def run_feeds(proto: onnx.ModelProto | bytes, feeds: Iterable[Mapping[str, np.ndarray]], names: list[str] | None = None,
              threads: int = 0) -> list[list[np.ndarray]]:
    """Run ``proto`` on each feed (basic optimizations); returns the outputs per feed."""
    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    sess = _session(data, threads)
    names = names or [o.name for o in sess.get_outputs()]
    return [sess.run(names, dict(f)) for f in feeds]


__all__ = ["CalibrationData", "CalibrationRunError", "Request", "calibrate", "instrumented_proto", "run_feeds"]
