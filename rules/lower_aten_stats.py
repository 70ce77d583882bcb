"""Lower ATen statistics, norms, top-k, einsum and a few more layers to ONNX (opset 18).

- ``var(x, dims, correction)`` = ``sum((x - mean(x))^2) / (N - correction)`` over ``dims`` (all when
  absent), N the number of reduced elements; ``unbiased=True`` is correction 1 (Bessel's correction);
  ``std = sqrt(var)``. N must be known at capture time.
- ``linalg_vector_norm(x, ord, dims)``: ord 2 → ReduceL2, ord 1 → ReduceL1, ±inf → ReduceMax/ReduceMin
  of |x|, other p → ``(sum |x|^p)^(1/p)``.
- ``instance_norm`` with input statistics (what ``nn.InstanceNorm*d`` does unless
  ``track_running_stats``): InstanceNormalization, weight/bias defaulting to 1/0.
- ``prelu(x, w) = max(0, x) + w * min(0, x)``, w per channel (dim 1) or one value: PRelu with w
  shaped ``[C, 1, ..., 1]`` to broadcast from dim 1.
- ``einsum(equation, tensors)``: Einsum; ``topk(x, k, dim, largest, sorted)``: TopK (ONNX's order
  for equal values is the lower index first, torch's is unspecified).
"""
from __future__ import annotations

import math

import numpy as np

from graft.ir import DataType, Value
from graft.rules.lower_aten_util import axis, cast, const, ints, lowering, out_dtype, rank, refuse


def _dims(x, dims) -> list[int]:
    r = rank(x)
    if dims is None or dims == []:
        return list(range(r))
    return sorted({axis(d, r) for d in ([dims] if isinstance(dims, int) else dims)})


def variance(op, a, n):
    """var/std(x, dim, unbiased | correction, keepdim) -> mean of squared deviations / (N - correction)."""
    x = cast(op, a["self"], out_dtype(n))
    dims = _dims(x, a.get("dim"))
    count = 1
    for d in dims:
        size = x.shape[d]
        if not isinstance(size, int):
            refuse("reduced dim known only at run time")
        count *= size
    if "correction" in a:
        corr = a["correction"] if a["correction"] is not None else 1
    else:
        corr = 1 if a.get("unbiased", True) else 0
    if isinstance(corr, Value):
        refuse("correction known only at run time")
    axes = ints(op, dims)
    dev = op.Sub(x, op.ReduceMean(x, axes, keepdims=1))
    total = op.ReduceSum(op.Mul(dev, dev), axes, keepdims=int(bool(a.get("keepdim", False))))
    denom = max(count - corr, 0)
    # torch divides by max(N - correction, 0): 0 gives inf/nan, as here
    var = op.Div(total, const(op, np.array(float(denom)), x.dtype))
    return op.Sqrt(var) if n.op_type.startswith("std") else var


def vector_norm(op, a, n):
    """linalg_vector_norm(x, ord, dim, keepdim) -> ReduceL2 / ReduceL1 / Reduce{Max,Min}(|x|) / (sum |x|^p)^(1/p)."""
    x = a["self"]
    dt = out_dtype(n)
    x = cast(op, x, dt)
    p = float(a.get("ord", 2))
    dims = _dims(x, a.get("dim"))
    keep = int(bool(a.get("keepdim", False)))
    axes = ints(op, dims)
    if p == 2:
        return op.ReduceL2(x, axes, keepdims=keep)
    if p == 1:
        return op.ReduceL1(x, axes, keepdims=keep)
    if math.isinf(p):
        return (op.ReduceMax if p > 0 else op.ReduceMin)(op.Abs(x), axes, keepdims=keep)
    if p == 0:
        refuse("ord=0 (count of non-zeros)")
    powered = op.Pow(op.Abs(x), const(op, np.array(p), dt))
    return op.Pow(op.ReduceSum(powered, axes, keepdims=keep), const(op, np.array(1.0 / p), dt))


def instance_norm(op, a, n):
    """instance_norm(x, weight, bias, running stats, use_input_stats=True, eps) -> InstanceNormalization."""
    if not a["use_input_stats"]:
        refuse("instance_norm on running statistics (track_running_stats in eval mode)")
    x = a["input"]
    c = x.shape[1] if x.shape is not None and len(x.shape) > 1 else None
    if not isinstance(c, int):
        refuse("channel count known only at run time")
    dt = x.dtype or DataType.FLOAT
    w = a["weight"] if a["weight"] is not None else const(op, np.ones(c), dt)
    b = a["bias"] if a["bias"] is not None else const(op, np.zeros(c), dt)
    return op.InstanceNormalization(x, w, b, epsilon=float(a["eps"]))


def prelu(op, a, n):
    """prelu(x, w) -> PRelu(x, w reshaped to [C, 1, ..., 1])."""
    x, w = a["self"], a["weight"]
    r = rank(x)
    if w.shape is not None and len(w.shape) == 1 and w.shape[0] != 1 and r > 2:
        w = op.Reshape(w, ints(op, [-1] + [1] * (r - 2)))
    return op.PRelu(x, w)


def einsum(op, a, n):
    """einsum(equation, tensors) -> Einsum."""
    return op.Einsum(*a["tensors"], equation=a["equation"].replace(" ", ""))


def topk(op, a, n):
    """topk(x, k, dim, largest, sorted) -> TopK (values, int64 indices)."""
    k = a["k"]
    kv = op.Unsqueeze(cast(op, k, DataType.INT64), ints(op, [0])) if isinstance(k, Value) else ints(op, [k])
    return op.TopK(a["self"], kv, axis=a["dim"], largest=int(bool(a["largest"])), sorted=int(bool(a["sorted"])),
                   _outputs=2)


RULES = [
    *lowering(["var.dim", "std.dim", "var.correction", "std.correction", "var.default", "std.default"], variance),
    *lowering("linalg_vector_norm.default", vector_norm),
    *lowering("instance_norm.default", instance_norm),
    *lowering("prelu.default", prelu),
    *lowering("einsum.default", einsum),
    *lowering("topk.default", topk),
]
