"""Calibrate in torch: the float model runs as a ``torch.fx.GraphModule`` (``ir.to_torch``).

For models that came from torch, calibration should see what torch computes. The IR model
is copied with every requested tensor added to the graph outputs, converted by the torch
backend, and run under ``torch.no_grad()``; the extra outputs feed the observers exactly
as onnxruntime's do (:mod:`graft.compiler.techniques.calibration.ort_runner`).
"""
from __future__ import annotations

import numpy as np

from graft import ir


class TorchRunner:
    """Callable feed → [arrays of the exposed tensors], running an instrumented GraphModule."""

    name = "torch"

    def __init__(self, model: ir.Model, tensors):
        import torch

        copy = ir.from_onnx(ir.to_onnx(model))
        values = {v.name: v for v in copy.graph.inputs}
        for n in copy.graph:
            for o in n.outputs:
                values[o.name] = o
        # float tensors only, as the onnxruntime runner exposes (ort_runner.instrumented_proto)
        self.exposed = [t for t in dict.fromkeys(tensors)
                        if t in values and values[t].dtype is not None and values[t].dtype.is_float]
        outs = list(copy.graph.outputs)
        self._n_orig = len(outs)
        copy.graph.set_outputs(outs + [values[t] for t in self.exposed])
        self.module = ir.to_torch(copy).eval()
        self.inputs = [v.name for v in copy.graph.inputs if v.const is None]
        self._torch = torch

    def __call__(self, feed: dict) -> list[np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.inputs]
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().cpu().numpy() for o in out[self._n_orig:]]
