"""Lower ATen elementwise, comparison, type-conversion, reduction and tensor-creation ops to
ONNX (opset 18).

Type promotion: ONNX binary ops want equal input types, torch promotes. Each
operand is cast to the dtype torch computed for the result (the node's output
dtype, from the captured FakeTensor), and a Python scalar operand becomes a 0-d
constant of that dtype — what torch does with a "wrapped number" (PyTorch docs,
"Type promotion"). Comparisons cast both sides to their promoted type.

- ``add/sub(x, y, alpha) = x ± alpha*y``; ``rsub(x, y, alpha) = y - alpha*x``;
  ``div(x, y, rounding_mode="floor")``: Floor(x / y) for floats, ``(x - Mod(x, y)) / y`` for
  integers (ONNX Mod with fmod=0 takes the divisor's sign, i.e. floor division's remainder);
  ``"trunc"``: Sign(q) * Floor(|q|) for floats, ONNX integer Div (which truncates).
- ``clamp(x, lo, hi)``: Clip (Max/Min for tensor bounds: Clip takes scalars only);
  ``masked_fill(x, m, v) = Where(m, v, x)``; ``rsqrt = 1/Sqrt``.
- ``to``/``_to_copy``/``clone``/``contiguous``/``alias``/``detach``: Cast to the output dtype, or the
  input itself.
- ``mean``/``sum``/``amax``/``amin``/``prod``/``logsumexp`` over ``dim`` (all axes when absent):
  Reduce* with ``keepdims``; ``max.dim``/``min.dim``: ReduceMax/Min, and ArgMax/ArgMin for the indices;
  ``argmax``/``argmin``: ArgMax/ArgMin (over the flattened tensor when ``dim`` is None).
- ``fill(x, v)`` / ``copy(x, src)``: v / src broadcast to x's shape (in x's dtype); ``diff(x, n, d, prepend, append)``: Concat, then n times
  Slice(1:) - Slice(:-1) (Xor for bool).
- ``arange``/``full``/``zeros``/``ones``/``*_like``/``new_*``/``scalar_tensor``: a constant when every
  size is known at capture time, else Range / ConstantOfShape.
"""
from __future__ import annotations

import numpy as np

from graft.ir import DataType, Tensor, Value
from graft.rules.lower_aten_util import cast, const, ints, lowering, operand, out_dtype, promote, rank, refuse, scalar
from graft.rules.lower_aten_nn import passthrough


def _dtype_of(x) -> DataType:
    if isinstance(x, Value):
        return x.dtype
    if isinstance(x, bool):
        return DataType.BOOL
    return DataType.INT64 if isinstance(x, int) else DataType.FLOAT


# --------------------------------------------------------------------------- arithmetic
_ARITH = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
          "minimum": "Min", "fmod": "Mod", "remainder": "Mod"}


def arith(op, a, n):
    """add/sub/mul/div/pow/maximum/minimum/fmod/remainder(x, y[, alpha]) with torch type promotion."""
    base = n.op_type.split(".")[0]
    dt = out_dtype(n)
    x = a.get("self", a.get("input"))
    y = a.get("other", a.get("exponent"))
    if base == "pow" and not isinstance(x, Value):  # pow.Scalar(scalar, tensor exponent)
        x = operand(op, x, dt)
    x, y = operand(op, x, dt), operand(op, y, dt)
    alpha = a.get("alpha", 1)
    if alpha not in (None, 1):
        y = op.Mul(y, const(op, np.array(alpha), dt))
    if base == "remainder":
        if dt.is_float:  # ONNX Mod needs fmod=1 for floats (before opset 28): x - floor(x / y) * y
            return op.Sub(x, op.Mul(op.Floor(op.Div(x, y)), y))
        return op.Mod(x, y, fmod=0)
    if base == "fmod":
        return op.Mod(x, y, fmod=1)
    return getattr(op, _ARITH[base])(x, y)


def rsub(op, a, n):
    """rsub(x, y, alpha) = y - alpha * x."""
    dt = out_dtype(n)
    x, y = operand(op, a["self"], dt), operand(op, a["other"], dt)
    if a.get("alpha", 1) != 1:
        x = op.Mul(x, const(op, np.array(a["alpha"]), dt))
    return op.Sub(y, x)


def div_mode(op, a, n):
    """div(x, y, rounding_mode): true, floor or trunc division."""
    dt = out_dtype(n)
    x, y = operand(op, a["self"], dt), operand(op, a["other"], dt)
    mode = a.get("rounding_mode")
    if mode is None:
        return op.Div(x, y)
    if dt.is_float:
        q = op.Div(x, y)
        return op.Floor(q) if mode == "floor" else op.Mul(op.Sign(q), op.Floor(op.Abs(q)))
    if mode == "trunc":
        return op.Div(x, y)
    return op.Div(op.Sub(x, op.Mod(x, y, fmod=0)), y)


def floor_divide(op, a, n):
    """floor_divide(x, y) = div(x, y, rounding_mode="floor")."""
    return div_mode(op, {**a, "rounding_mode": "floor"}, n)


# --------------------------------------------------------------------------- comparisons / logic
_CMP = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}


def compare(op, a, n):
    """eq/ne/lt/le/gt/ge(x, y) on promoted operands."""
    base = n.op_type.split(".")[0]
    x, y = a["self"], a["other"]
    dt = promote(_dtype_of(x), _dtype_of(y)) if isinstance(y, Value) else \
        (x.dtype if not (isinstance(y, float) and not x.dtype.is_float) else DataType.FLOAT)
    x, y = operand(op, x, dt), operand(op, y, dt)
    if base == "ne":
        return op.Not(op.Equal(x, y))
    return getattr(op, _CMP[base])(x, y)


_LOGIC = {"and": ("And", "BitwiseAnd"), "or": ("Or", "BitwiseOr"), "xor": ("Xor", "BitwiseXor")}


def logic(op, a, n):
    """__and__/bitwise_and/logical_and (and or/xor): And on bool, BitwiseAnd on integers."""
    word = n.op_type.split(".")[0].strip("_").split("_")[-1]  # __xor__ / bitwise_xor / logical_xor -> xor
    dt = out_dtype(n)
    if n.op_type.startswith("logical_"):
        x, y = operand(op, a["self"], DataType.BOOL), operand(op, a["other"], DataType.BOOL)
        return getattr(op, _LOGIC[word][0])(x, y)
    x, y = operand(op, a["self"], dt), operand(op, a["other"], dt)
    return getattr(op, _LOGIC[word][0] if dt == DataType.BOOL else _LOGIC[word][1])(x, y)


def logical_not(op, a, n):
    """logical_not / bitwise_not(x): Not on bool, BitwiseNot on integers."""
    x = a["self"]
    if n.op_type.startswith("logical_") or x.dtype == DataType.BOOL:
        return op.Not(cast(op, x, DataType.BOOL))
    return op.BitwiseNot(x)


def where(op, a, n):
    """where(cond, x, y) -> Where."""
    dt = out_dtype(n)
    return op.Where(cast(op, a["condition"], DataType.BOOL), operand(op, a["self"], dt), operand(op, a["other"], dt))


def masked_fill(op, a, n):
    """masked_fill(x, mask, value) = Where(mask, value, x)."""
    x = a["self"]
    return op.Where(cast(op, a["mask"], DataType.BOOL), operand(op, a["value"], x.dtype), x)


def clamp(op, a, n):
    """clamp(x, min, max) / clamp_min / clamp_max -> Clip."""
    dt = out_dtype(n)
    x = cast(op, a["self"], dt)
    lo = a.get("min")
    hi = a.get("max")
    lo = operand(op, lo, dt) if lo is not None else None
    hi = operand(op, hi, dt) if hi is not None else None
    if any(b is not None and b.shape != () for b in (lo, hi)):
        # ONNX Clip takes scalar bounds only; tensor bounds broadcast: min(max(x, lo), hi), as torch computes
        y = op.Max(x, lo) if lo is not None else x
        return op.Min(y, hi) if hi is not None else y
    if hi is None:
        return op.Clip(x, lo) if lo is not None else x
    return op.Clip(x, lo, hi)


# --------------------------------------------------------------------------- unary
def _unary(onnx_op: str):
    def lower(op, a, n):
        return getattr(op, onnx_op)(cast(op, a["self"], out_dtype(n)))
    lower.__name__ = onnx_op.lower()
    lower.__doc__ = f"{onnx_op}(x)"
    return lower


def rsqrt(op, a, n):
    """rsqrt(x) = 1 / sqrt(x)."""
    return op.Reciprocal(op.Sqrt(cast(op, a["self"], out_dtype(n))))


def square(op, a, n):
    """square(x) = x * x."""
    x = cast(op, a["self"], out_dtype(n))
    return op.Mul(x, x)


def log1p(op, a, n):
    """log1p(x) = log(1 + x)."""
    x = cast(op, a["self"], out_dtype(n))
    return op.Log(op.Add(x, const(op, np.array(1.0), x.dtype if isinstance(x, Value) and x.dtype else out_dtype(n))))


def isnan(op, a, n):
    """isnan(x) -> IsNaN."""
    return op.IsNaN(a["self"])


# --------------------------------------------------------------------------- dtype / copies
def to_dtype(op, a, n):
    """to / _to_copy / type conversions: Cast to the output dtype (the input itself when equal)."""
    x = a["self"]
    dt = out_dtype(n)
    if x.dtype == dt:
        return passthrough(op, x, n)
    return op.Cast(x, to=int(dt))


def identity(op, a, n):
    """clone / contiguous / alias / detach / lift_fresh_copy: the input itself."""
    return passthrough(op, a["self"], n)


# --------------------------------------------------------------------------- reductions
_REDUCE = {"mean": "ReduceMean", "sum": "ReduceSum", "amax": "ReduceMax", "amin": "ReduceMin",
           "max": "ReduceMax", "min": "ReduceMin", "prod": "ReduceProd", "logsumexp": "ReduceLogSumExp"}


def reduce(op, a, n):
    """mean/sum/amax/amin/max/min/prod/logsumexp over dims -> Reduce*(axes, keepdims); the indices of
    ``max.dim``/``min.dim`` -> ArgMax/ArgMin (the first extreme, as torch documents)."""
    base = n.op_type.split(".")[0]
    indices = n.op_type in ("max.dim", "min.dim") and len(n.outputs) > 1 and \
        any(o.num_uses or o.is_graph_output() for o in n.outputs[1:])
    dt = out_dtype(n)
    x = cast(op, a["self"], dt)
    dims = a.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    keep = int(bool(a.get("keepdim", False)))
    onnx_op = getattr(op, _REDUCE[base])
    if not dims:
        return onnx_op(x, keepdims=keep)
    values = onnx_op(x, ints(op, dims), keepdims=keep)
    if not indices:
        return values
    arg = op.ArgMax if base == "max" else op.ArgMin
    return values, arg(a["self"], axis=dims[0], keepdims=keep, select_last_index=0)


def argmax(op, a, n):
    """argmax/argmin(x, dim, keepdim) -> ArgMax/ArgMin (flattened when dim is None)."""
    x = a["self"]
    fn = op.ArgMax if n.op_type.startswith("argmax") else op.ArgMin
    if a["dim"] is None:
        return fn(op.Reshape(x, ints(op, [-1])), axis=0, keepdims=0)
    return fn(x, axis=a["dim"], keepdims=int(bool(a["keepdim"])))


def cumsum(op, a, n):
    """cumsum(x, dim[, dtype]) -> CumSum."""
    return op.CumSum(cast(op, a["self"], out_dtype(n)), const(op, np.array(a["dim"]), DataType.INT64))


def trilu(op, a, n):
    """triu/tril(x, diagonal) -> Trilu."""
    return op.Trilu(a["self"], const(op, np.array(a["diagonal"]), DataType.INT64),
                    upper=int(n.op_type.startswith("triu")))


# --------------------------------------------------------------------------- creation
def arange(op, a, n):
    """arange(start, end, step): a constant, or Range when a bound is known only at run time."""
    dt = out_dtype(n)
    start, end, step = a.get("start", 0), a["end"], a.get("step", 1)
    if not any(isinstance(v, Value) for v in (start, end, step)):
        return const(op, np.arange(start, end, step), dt)
    return op.Range(scalar(op, start, dt), scalar(op, end, dt), scalar(op, step, dt))


def _fill(op, shape, value, dt: DataType, n):
    if isinstance(value, Value):
        refuse("fill value known only at run time")
    if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
        return const(op, np.full(shape, value), dt)
    return op.ConstantOfShape(ints(op, shape) if not isinstance(shape, Value) else shape,
                              value=Tensor(np.array([value]).astype(dt.to_numpy())))


def full(op, a, n):
    """full/zeros/ones/empty/new_*(size, value): a constant, or ConstantOfShape for run-time sizes."""
    base = n.op_type.split(".")[0]
    dt = out_dtype(n)
    value = {"zeros": 0, "ones": 1, "empty": 0, "new_zeros": 0, "new_ones": 1, "new_empty": 0}.get(base)
    if value is None:
        value = a["fill_value"]
    return _fill(op, a["size"], value, dt, n)


def full_like(op, a, n):
    """zeros_like/ones_like/full_like/empty_like(x): constant of x's static shape, else ConstantOfShape(Shape(x))."""
    base = n.op_type.split(".")[0]
    x = a["self"]
    dt = out_dtype(n)
    value = {"zeros_like": 0, "ones_like": 1, "empty_like": 0}.get(base, a.get("fill_value"))
    if x.shape is not None and all(isinstance(d, int) for d in x.shape):
        return const(op, np.full(x.shape, value), dt)
    return op.ConstantOfShape(op.Shape(x), value=Tensor(np.array([value]).astype(dt.to_numpy())))


def fill(op, a, n):
    """fill(x, value) (``x[...] = v``, functionalized): ``value`` broadcast to x's shape."""
    x, v = a["self"], a["value"]
    dt = out_dtype(n)
    if not isinstance(v, Value) and x.shape is not None and all(isinstance(d, int) for d in x.shape):
        return const(op, np.full(x.shape, v), dt)
    shape = ints(op, list(x.shape)) if x.shape is not None and all(isinstance(d, int) for d in x.shape) \
        else op.Shape(x)
    return op.Expand(operand(op, v, dt), shape)


def copy(op, a, n):
    """copy(x, src) (``x[...] = src``, functionalized): src cast to x's dtype and broadcast to x's shape."""
    x, src = a["self"], a["src"]
    dt = out_dtype(n)
    shape = ints(op, list(x.shape)) if x.shape is not None and all(isinstance(d, int) for d in x.shape) \
        else op.Shape(x)
    return op.Expand(operand(op, src, dt), shape)


def diff(op, a, n):
    """diff(x, n, dim, prepend, append): Concat(prepend, x, append), then n times x[1:] - x[:-1]
    along dim (Xor for bool, as torch)."""
    x = a["self"]
    r = rank(x)
    d = a["dim"] + r if a["dim"] < 0 else a["dim"]
    parts = [t for t in (a.get("prepend"), x, a.get("append")) if t is not None]
    if any(rank(t) != r for t in parts):
        refuse("prepend/append of another rank")
    y = op.Concat(*parts, axis=d) if len(parts) > 1 else x
    axes = ints(op, [d])
    for _ in range(a.get("n", 1)):
        hi = op.Slice(y, ints(op, [1]), ints(op, [2**63 - 1]), axes)
        lo = op.Slice(y, ints(op, [0]), ints(op, [-1]), axes)
        y = op.Xor(hi, lo) if x.dtype == DataType.BOOL else op.Sub(hi, lo)
    return y


def item(op, a, n):
    """item(x) / _local_scalar_dense(x): the one element as a 0-d value of the output's type (``.tolist()``,
    ``float(x)`` in forward)."""
    return cast(op, op.Reshape(a["self"], ints(op, [])), out_dtype(n))


def scalar_tensor(op, a, n):
    """scalar_tensor(s) -> a 0-d constant."""
    return operand(op, a["s"], out_dtype(n))


RULES = [
    *lowering(["add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "mul.Tensor", "mul.Scalar", "div.Tensor",
               "div.Scalar", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "maximum.default",
               "minimum.default", "fmod.Tensor", "fmod.Scalar", "remainder.Tensor", "remainder.Scalar"], arith),
    *lowering(["rsub.Scalar", "rsub.Tensor"], rsub),
    *lowering(["div.Tensor_mode", "div.Scalar_mode"], div_mode),
    *lowering("floor_divide.default", floor_divide),
    *lowering([f"{c}.{k}" for c in ("eq", "ne", "lt", "le", "gt", "ge") for k in ("Tensor", "Scalar")], compare),
    *lowering(["__and__.Tensor", "bitwise_and.Tensor", "logical_and.default", "__or__.Tensor", "bitwise_or.Tensor",
               "logical_or.default", "__xor__.Tensor", "bitwise_xor.Tensor", "logical_xor.default"], logic),
    *lowering(["logical_not.default", "bitwise_not.default"], logical_not),
    *lowering(["where.self", "where.ScalarOther", "where.ScalarSelf", "where.Scalar"], where),
    *lowering(["masked_fill.Scalar", "masked_fill.Tensor"], masked_fill),
    *lowering(["clamp.default", "clamp.Tensor", "clamp_min.default", "clamp_max.default"], clamp),
    *lowering("neg.default", _unary("Neg")),
    *lowering("abs.default", _unary("Abs")),
    *lowering("exp.default", _unary("Exp")),
    *lowering("log.default", _unary("Log")),
    *lowering("sqrt.default", _unary("Sqrt")),
    *lowering("reciprocal.default", _unary("Reciprocal")),
    *lowering("sin.default", _unary("Sin")),
    *lowering("cos.default", _unary("Cos")),
    *lowering("erf.default", _unary("Erf")),
    *lowering("floor.default", _unary("Floor")),
    *lowering("ceil.default", _unary("Ceil")),
    *lowering("round.default", _unary("Round")),
    *lowering("sign.default", _unary("Sign")),
    *lowering("rsqrt.default", rsqrt),
    *lowering("square.default", square),
    *lowering("log1p.default", log1p),
    *lowering("isnan.default", isnan),
    *lowering(["to.dtype", "to.dtype_layout", "to.device", "to.other", "_to_copy.default", "type_as.default"],
              to_dtype),
    *lowering(["clone.default", "contiguous.default", "alias.default", "detach.default", "lift_fresh_copy.default"],
              identity),
    *lowering(["mean.dim", "mean.default", "sum.dim_IntList", "sum.default", "amax.default", "amin.default",
               "max.dim", "min.dim", "max.default", "min.default", "prod.dim_int", "prod.default",
               "logsumexp.default"], reduce),
    *lowering(["argmax.default", "argmin.default"], argmax),
    *lowering("cumsum.default", cumsum),
    *lowering(["triu.default", "tril.default"], trilu),
    *lowering(["arange.default", "arange.start", "arange.start_step"], arange),
    *lowering(["full.default", "zeros.default", "ones.default", "empty.memory_format", "new_zeros.default",
               "new_ones.default", "new_full.default", "new_empty.default"], full),
    *lowering(["zeros_like.default", "ones_like.default", "full_like.default", "empty_like.default"], full_like),
    *lowering("scalar_tensor.default", scalar_tensor),
    *lowering(["fill.Scalar", "fill.Tensor"], fill),
    *lowering("copy.default", copy),
    *lowering("diff.default", diff),
    *lowering(["item.default", "_local_scalar_dense.default"], item),
]
