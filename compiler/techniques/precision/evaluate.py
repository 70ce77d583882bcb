"""Running the converted model: outputs per feed, and where an overflow starts.

Two backends:

- ``torch``: the model as a ``torch.fx.GraphModule`` (:func:`graft.ir.to_torch`), whose float16 and
  bfloat16 ops compute in that type on the CPU. This is the honest measure of what the lower
  precision costs, so the accuracy report and overflow tracing use it when torch is installed.
- ``onnxruntime``: what a user deploys. Its CPU provider has float16 kernels for few ops; for the
  others its ``InsertCastTransformer`` computes in float32 and then removes the Cast pairs it
  made, input roundings included (onnxruntime#20346), so on the CPU a float16 model mostly
  computes in float32: its errors understate float16's and overflows do not show.
"""
from __future__ import annotations

import numpy as np

from graft import ir
from graft.ir.dtypes import DataType
from graft.rules.precision import BOUNDARY, PRECISION_META
from graft.compiler.techniques.precision.ranges import session

BACKENDS = ("torch", "onnxruntime")


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def io_feeds(model: ir.Model, feeds: list[dict]) -> list[dict]:
    """``feeds`` cast to the converted model's input types (float16/bfloat16 inputs without keep_io_types)."""
    types = {v.name: v.dtype for v in model.graph.inputs}
    out = []
    for f in feeds:
        g = {}
        for k, a in f.items():
            a = np.asarray(a)
            t = types.get(k)
            g[k] = a.astype(t.to_numpy()) if t is not None and a.dtype.kind == "f" and a.dtype != t.to_numpy() else a
        out.append(g)
    return out


def _as_float32(a) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "f" or a.dtype == DataType.BFLOAT16.to_numpy() else a


def _torch_arg(a: np.ndarray):
    import torch

    if a.dtype == DataType.BFLOAT16.to_numpy():
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def run(model: ir.Model, feeds: list[dict], backend: str, extra: list[str] = ()) -> list[dict[str, np.ndarray]]:
    """Per feed, graph output (and ``extra`` main-graph value) name → array (float types as float32).

    Raises:
        whatever the backend raises when it cannot build or run the model.
    """
    feeds = io_feeds(model, feeds)
    if extra:
        from graft.compiler.techniques.calibration import instrumented_proto

        proto, _ = instrumented_proto(model, list(extra))
    else:
        proto = ir.to_onnx(model)
    names = [o.name for o in proto.graph.output]
    if backend == "onnxruntime":
        sess = session(proto)
        return [{n: _as_float32(a) for n, a in zip(names, sess.run(names, f))} for f in feeds]
    if backend != "torch":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    import torch

    from graft.compiler.techniques.numeric import to_numpy

    module = ir.to_torch(ir.from_onnx(proto) if extra else model)
    order = [v.name for v in model.graph.inputs if v.const is None]
    outs = []
    with torch.no_grad():
        for f in feeds:
            y = module(*[_torch_arg(np.asarray(f[n])) for n in order])
            y = y if isinstance(y, (tuple, list)) else (y,)
            outs.append({n: _as_float32(to_numpy(t)) for n, t in zip(names, y)})
    return outs


def newly_bad(low: np.ndarray, ref: np.ndarray) -> int:
    """Values that are inf/NaN in ``low`` where ``ref`` is finite (or NaN where ``ref`` is not)."""
    low, ref = np.asarray(low), np.asarray(ref)
    if low.shape != ref.shape or low.dtype.kind != "f":
        return 0
    with np.errstate(invalid="ignore"):
        return int(np.count_nonzero((~np.isfinite(low) & np.isfinite(ref)) | (np.isnan(low) & ~np.isnan(ref))))


def trace_overflow(model: ir.Model, low: ir.Model, feed: dict, output: str, backend: str) -> ir.Node | None:
    """The node of the converted ``low`` where ``output``'s non-finite values start on ``feed``.

    Walks back from the output through inputs that are newly non-finite (compared with the float32
    ``model`` in onnxruntime) to the first node whose inputs are all fine. A boundary Cast into the
    lower type there means its reader needed the float32 value: the reader is returned.
    """
    g = low.graph
    names = [o.name for n in g for o in n.outputs if o.name and o.dtype is not None and o.dtype.is_float]
    low_vals = run(low, [feed], backend, names)[0]
    ref_names = [o.name for n in model.graph for o in n.outputs if o.name and o.dtype == DataType.FLOAT]
    ref_vals = run(model, [feed], "onnxruntime", ref_names)[0]

    def ref_of(v: ir.Value):
        r = ref_vals.get(v.name)
        p = v.producer
        if r is None and p is not None and p.op_type == "Cast" and p.meta.get(PRECISION_META) == BOUNDARY:
            return ref_of(p.inputs[0])
        return r

    def bad(v: ir.Value) -> bool:
        lo, r = low_vals.get(v.name), ref_of(v)
        return lo is not None and r is not None and newly_bad(lo, r) > 0

    v = next((o for o in g.outputs if o.name == output), None)
    prev = None
    seen = set()
    while v is not None and v.producer is not None and v.producer.graph is g and v not in seen:
        seen.add(v)
        p = v.producer
        nxt = next((u for u in p.inputs if u is not None and u.producer is not None and u.producer.graph is g
                    and bad(u)), None)
        if nxt is None:
            return prev if p.meta.get(PRECISION_META) == BOUNDARY else p
        prev, v = p, nxt
    return prev
