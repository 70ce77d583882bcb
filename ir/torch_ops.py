"""ONNX ops as torch functions, for the torch backend (:mod:`graft.ir.torch_backend`).

Each function takes the node's inputs positionally (``None`` for an absent
optional input) and its attributes as keyword arguments with the ONNX defaults,
and follows the ONNX operator spec (https://onnx.ai/onnx/operators/) of the
version it is registered for. Everything is built from differentiable torch
ops, so gradients flow through the emitted ``GraphModule``. Functions for ops
with optional outputs take ``_outputs`` (how many outputs the node has).

Elementwise, shape and reduction ops live here; convolution, pooling,
normalization, resizing and quantization in :mod:`graft.ir.torch_ops_nn`.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Callable

import torch
import torch.nn.functional as F

_REGISTRY: dict[str, list[tuple[int, Callable]]] = {}

# ONNX element type -> torch dtype
ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16,
               6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
               12: torch.uint32, 13: torch.uint64, 14: torch.complex64, 15: torch.complex128,
               16: torch.bfloat16, 17: torch.float8_e4m3fn, 19: torch.float8_e5m2}


class UnsupportedInTorchBackend(NotImplementedError):
    """An ONNX op variant (attribute value, optional output) the torch backend cannot express.

    Raised by the op functions here and in :mod:`graft.ir.torch_ops_nn` while the ``GraphModule`` runs;
    the message names the op and the variant. What to do: compile to the ONNX target instead, or
    rewrite the op into a supported form with a rule before emitting torch. A subclass of
    ``NotImplementedError``, so ``except NotImplementedError`` still catches it.
    """


def onnx_op(name: str, since: int = 1):
    """Register the decorated function as ONNX op ``name`` from opset ``since`` on."""
    def deco(fn):
        _REGISTRY.setdefault(name, []).append((since, fn))
        _REGISTRY[name].sort(key=lambda t: t[0])
        return fn
    return deco


def lookup(op_type: str, opset: int) -> Callable | None:
    """The implementation of ``op_type`` at ``opset`` (latest version not newer than it), or None."""
    import graft.ir.torch_ops_nn  # noqa: F401  (registers the nn ops)

    best = None
    for since, fn in _REGISTRY.get(op_type, ()):
        if since <= opset:
            best = fn
    return best


def supported_ops() -> list[str]:
    import graft.ir.torch_ops_nn  # noqa: F401

    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- helpers
def ints(t) -> list[int]:
    """A 1-D int tensor (or list) as a Python list of ints."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def item(t):
    """A 0-d / 1-element tensor as a Python number (torch scalars for ATen int/float arguments)."""
    return t.reshape(-1)[0].item() if isinstance(t, torch.Tensor) else t


def as_tensor(x):
    """A Python number returned by an ATen op (``sym_size``) as a 0-d tensor."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, bool):
        return torch.tensor(x)
    return torch.tensor(x, dtype=torch.int64 if isinstance(x, int) else torch.float64)


def attr_tensor(spec: dict) -> torch.Tensor:
    """A tensor attribute passed as ``{"data": [...], "dtype": "float32", "shape": [...]}``."""
    return torch.tensor(spec["data"], dtype=getattr(torch, spec["dtype"])).reshape(spec["shape"])


def norm_axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# --------------------------------------------------------------------------- elementwise
def _unary(name, fn, since=1):
    onnx_op(name, since)(fn)


for _name, _fn in {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
                   "Log": torch.log, "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Erf": torch.erf,
                   "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
                   "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos,
                   "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan,
                   "Sinh": torch.sinh, "Cosh": torch.cosh, "Not": torch.logical_not, "IsNaN": torch.isnan,
                   "Softsign": F.softsign, "Mish": F.mish, "HardSwish": F.hardswish,
                   "BitwiseNot": torch.bitwise_not}.items():
    _unary(_name, _fn)


@onnx_op("Identity")
def Identity(x):
    return x


@onnx_op("Softplus")
def Softplus(x):
    return F.softplus(x)


@onnx_op("HardSigmoid")
def HardSigmoid(x, *, alpha=0.2, beta=0.5):
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


@onnx_op("LeakyRelu")
def LeakyRelu(x, *, alpha=0.01):
    return F.leaky_relu(x, alpha)


@onnx_op("Elu")
def Elu(x, *, alpha=1.0):
    return F.elu(x, alpha)


@onnx_op("Selu")
def Selu(x, *, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@onnx_op("Celu")
def Celu(x, *, alpha=1.0):
    return F.celu(x, alpha)


@onnx_op("ThresholdedRelu")
def ThresholdedRelu(x, *, alpha=1.0):
    return torch.where(x > alpha, x, torch.zeros_like(x))


@onnx_op("PRelu")
def PRelu(x, slope):
    return torch.where(x < 0, x * slope, x)


@onnx_op("Gelu", since=20)
def Gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


@onnx_op("IsInf")
def IsInf(x, *, detect_negative=1, detect_positive=1):
    return (torch.isposinf(x) & bool(detect_positive)) | (torch.isneginf(x) & bool(detect_negative))


@onnx_op("Clip", since=1)
def Clip_1(x, *, min=-3.4028234663852886e38, max=3.4028234663852886e38):
    return torch.clamp(x, min, max)


@onnx_op("Clip", since=11)
def Clip(x, lo=None, hi=None):
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))
    return x


def _binary(name, fn):
    onnx_op(name)(fn)


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq,
                   "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
                   "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
                   "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
                   "BitwiseXor": torch.bitwise_xor}.items():
    _binary(_name, _fn)


@onnx_op("Div")
def Div(a, b):
    if not a.is_floating_point() and not a.is_complex():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates
    return a / b


@onnx_op("Pow")
def Pow(a, b):
    return torch.pow(a, b).to(a.dtype)


@onnx_op("Mod")
def Mod(a, b, *, fmod=0):
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


# Variadic ops fold their inputs left to right with the binary op (multidirectional broadcasting).
@onnx_op("Max")
def Max(*xs):
    return functools.reduce(torch.maximum, xs)


@onnx_op("Min")
def Min(*xs):
    return functools.reduce(torch.minimum, xs)


@onnx_op("Sum")
def Sum(*xs):
    return functools.reduce(operator.add, xs)


@onnx_op("Mean")
def Mean(*xs):
    return Sum(*xs) / len(xs)


@onnx_op("Where")
def Where(cond, a, b):
    return torch.where(cond, a, b)


@onnx_op("Cast")
def Cast(x, *, to, saturate=1):
    return x.to(ONNX_DTYPES[int(to)])


@onnx_op("CastLike")
def CastLike(x, like, *, saturate=1):
    return x.to(like.dtype)


@onnx_op("Dropout")
def Dropout(x, ratio=None, training_mode=None, *, seed=0, _outputs=1):
    if _outputs > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


# --------------------------------------------------------------------------- softmax family
def _coerced(fn, x, axis):
    """Opset < 13: softmax over the 2-D view [prod(shape[:axis]), prod(shape[axis:])]."""
    axis = norm_axis(axis, x.dim())
    shape = x.shape
    return fn(x.reshape(int(math.prod(shape[:axis])), -1), -1).reshape(shape)


@onnx_op("Softmax", since=1)
def Softmax_1(x, *, axis=1):
    return _coerced(torch.softmax, x, axis)


@onnx_op("Softmax", since=13)
def Softmax(x, *, axis=-1):
    return torch.softmax(x, axis)


@onnx_op("LogSoftmax", since=1)
def LogSoftmax_1(x, *, axis=1):
    return _coerced(torch.log_softmax, x, axis)


@onnx_op("LogSoftmax", since=13)
def LogSoftmax(x, *, axis=-1):
    return torch.log_softmax(x, axis)


# --------------------------------------------------------------------------- matmul
@onnx_op("MatMul")
def MatMul(a, b):
    return torch.matmul(a, b)


@onnx_op("Gemm")
def Gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    if transA:
        a = a.transpose(0, 1)
    if transB:
        b = b.transpose(0, 1)
    y = torch.matmul(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@onnx_op("Einsum")
def Einsum(*xs, equation):
    return torch.einsum(equation, *xs)


# --------------------------------------------------------------------------- shape ops
@onnx_op("Shape")
def Shape(x, *, start=0, end=None):
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


@onnx_op("Size")
def Size(x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@onnx_op("Reshape", since=5)
def Reshape(x, shape, *, allowzero=0):
    dims = ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@onnx_op("Flatten")
def Flatten(x, *, axis=1):
    axis = norm_axis(axis, x.dim())
    return x.reshape(int(math.prod(x.shape[:axis])), int(math.prod(x.shape[axis:])))


@onnx_op("Transpose")
def Transpose(x, *, perm=None):
    return x.permute(*(perm if perm is not None else range(x.dim() - 1, -1, -1)))


@onnx_op("Squeeze", since=1)
def Squeeze_1(x, *, axes=None):
    return Squeeze(x, axes)


@onnx_op("Squeeze", since=13)
def Squeeze(x, axes=None):
    if axes is None or (isinstance(axes, torch.Tensor) and axes.numel() == 0):
        return x.squeeze()
    dims = sorted({norm_axis(a, x.dim()) for a in ints(axes)}, reverse=True)
    for d in dims:
        x = x.squeeze(d)
    return x


@onnx_op("Unsqueeze", since=1)
def Unsqueeze_1(x, *, axes):
    return Unsqueeze(x, axes)


@onnx_op("Unsqueeze", since=13)
def Unsqueeze(x, axes):
    ax = ints(axes)
    rank = x.dim() + len(ax)
    for d in sorted(norm_axis(a, rank) for a in ax):
        x = x.unsqueeze(d)
    return x


@onnx_op("Concat")
def Concat(*xs, axis):
    return torch.cat(xs, dim=axis)


@onnx_op("Split", since=1)
def Split_1(x, split=None, *, axis=0, _outputs=1, num_outputs=None, **_):
    return Split(x, split, axis=axis, _outputs=_outputs, num_outputs=num_outputs)


@onnx_op("Split", since=13)
def Split(x, split=None, *, axis=0, num_outputs=None, _outputs=1):
    dim = x.shape[axis]
    if split is not None:
        sizes = ints(split)
    else:
        n = num_outputs or _outputs
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    return tuple(torch.split(x, sizes, dim=axis))


def _slice_axis(x, axis, start, end, step):
    dim = x.shape[axis]
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = max(0, min(start, dim)), max(0, min(end, dim))
        return x.narrow(axis, start, max(end - start, 0))[(slice(None),) * axis + (slice(None, None, step),)]
    start, end = max(0, min(start, dim - 1)), max(-1, min(end, dim - 1))
    idx = torch.arange(start, end, step, device=x.device)
    return x.index_select(axis, idx)


@onnx_op("Slice", since=1)
def Slice_1(x, *, starts, ends, axes=None):
    return Slice(x, starts, ends, axes)


@onnx_op("Slice", since=10)
def Slice(x, starts, ends, axes=None, steps=None):
    s, e = ints(starts), ints(ends)
    ax = ints(axes) if axes is not None else list(range(len(s)))
    st = ints(steps) if steps is not None else [1] * len(s)
    for a, b, c, d in zip(ax, s, e, st):
        x = _slice_axis(x, norm_axis(a, x.dim()), b, c, d)
    return x


@onnx_op("Gather")
def Gather(x, idx, *, axis=0):
    axis = norm_axis(axis, x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


@onnx_op("GatherElements")
def GatherElements(x, idx, *, axis=0):
    axis = norm_axis(axis, x.dim())
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@onnx_op("GatherND")
def GatherND(x, idx, *, batch_dims=0):
    if batch_dims:
        raise UnsupportedInTorchBackend("GatherND with batch_dims > 0 is not supported by the torch backend")
    k = idx.shape[-1]
    return x[tuple(idx[..., i] for i in range(k))]


@onnx_op("ScatterElements")
def ScatterElements(x, idx, upd, *, axis=0, reduction="none"):
    axis = norm_axis(axis, x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if reduction == "none":
        return x.scatter(axis, idx, upd)
    return x.scatter_reduce(axis, idx, upd, {"add": "sum", "mul": "prod"}.get(reduction, reduction))


@onnx_op("ScatterND")
def ScatterND(x, idx, upd, *, reduction="none"):
    out = x.clone()
    k = idx.shape[-1]
    key = tuple(idx[..., i] for i in range(k))
    if reduction == "none":
        out[key] = upd
    elif reduction == "add":
        out = out.index_put(key, upd, accumulate=True)
    else:
        raise UnsupportedInTorchBackend(f"ScatterND reduction={reduction!r} is not supported by the torch "
                                        f"backend")
    return out


@onnx_op("Expand")
def Expand(x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape))))


@onnx_op("Tile")
def Tile(x, repeats):
    return x.repeat(*ints(repeats))


@onnx_op("ConstantOfShape")
def ConstantOfShape(shape, *, value=None):
    v = attr_tensor(value) if value is not None else torch.zeros(1)
    return torch.full(tuple(ints(shape)), v.reshape(-1)[0].item(), dtype=v.dtype)


@onnx_op("Range")
def Range(start, limit, delta):
    return torch.arange(item(start), item(limit), item(delta), dtype=start.dtype)


@onnx_op("Trilu")
def Trilu(x, k=None, *, upper=1):
    k = int(item(k)) if k is not None else 0
    return torch.triu(x, k) if upper else torch.tril(x, k)


@onnx_op("CumSum")
def CumSum(x, axis, *, exclusive=0, reverse=0):
    a = norm_axis(int(item(axis)), x.dim())
    if reverse:
        x = x.flip(a)
    y = torch.cumsum(x, a)
    if exclusive:
        y = y - x
    return y.flip(a) if reverse else y


@onnx_op("NonZero")
def NonZero(x):
    return torch.stack(torch.nonzero(x, as_tuple=True)) if x.dim() else torch.nonzero(x).T


@onnx_op("TopK", since=10)
def TopK(x, k, *, axis=-1, largest=1, sorted=1, _outputs=2):
    v, i = torch.topk(x, int(item(k)), dim=axis, largest=bool(largest), sorted=bool(sorted))
    return v, i


@onnx_op("OneHot")
def OneHot(indices, depth, values, *, axis=-1):
    d = int(item(depth))
    idx = torch.where(indices < 0, indices + d, indices).long()
    hot = F.one_hot(idx.clamp(0, d - 1), d) * ((idx >= 0) & (idx < d)).unsqueeze(-1)
    out = torch.where(hot.bool(), values[1], values[0])
    return out.movedim(-1, norm_axis(axis, out.dim()))


# --------------------------------------------------------------------------- reductions
def _reduce(fn, x, axes, keepdims, noop_with_empty_axes):
    ax = ints(axes) if axes is not None else []
    if not ax:
        if noop_with_empty_axes:
            return x
        ax = list(range(x.dim()))
    ax = sorted(norm_axis(a, x.dim()) for a in ax)
    return fn(x, ax, bool(keepdims))


_REDUCERS = {
    "ReduceMean": lambda x, a, k: x.mean(a, keepdim=k),
    "ReduceSum": lambda x, a, k: x.sum(a, keepdim=k),
    "ReduceMax": lambda x, a, k: x.amax(a, keepdim=k),
    "ReduceMin": lambda x, a, k: x.amin(a, keepdim=k),
    "ReduceProd": lambda x, a, k: _prod(x, a, k),
    "ReduceL1": lambda x, a, k: x.abs().sum(a, keepdim=k),
    "ReduceL2": lambda x, a, k: (x * x).sum(a, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, a, k: (x * x).sum(a, keepdim=k),
    "ReduceLogSumExp": lambda x, a, k: torch.logsumexp(x, a, keepdim=k),
    "ReduceLogSum": lambda x, a, k: x.sum(a, keepdim=k).log(),
}


def _prod(x, axes, keepdim):
    for a in sorted(axes, reverse=True):
        x = x.prod(a, keepdim=keepdim)
    return x


def _make_reduce(name, fn):
    def attr_form(x, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        return _reduce(fn, x, axes, keepdims, noop_with_empty_axes)

    def input_form(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        return _reduce(fn, x, axes, keepdims, noop_with_empty_axes)

    attr_form.__name__ = attr_form.__qualname__ = f"{name}_1"
    input_form.__name__ = input_form.__qualname__ = name
    globals()[attr_form.__name__] = attr_form  # module-level names keep the GraphModule picklable
    globals()[name] = input_form
    onnx_op(name, 1)(attr_form)
    onnx_op(name, 13 if name == "ReduceSum" else 18)(input_form)


for _name, _fn in _REDUCERS.items():
    _make_reduce(_name, _fn)


def _arg(fn, x, axis, keepdims, select_last_index):
    axis = norm_axis(axis, x.dim())
    if select_last_index:
        n = x.shape[axis]
        return (n - 1) - fn(x.flip(axis), axis, bool(keepdims))
    return fn(x, axis, bool(keepdims))


@onnx_op("ArgMax")
def ArgMax(x, *, axis=0, keepdims=1, select_last_index=0):
    return _arg(torch.argmax, x, axis, keepdims, select_last_index)


@onnx_op("ArgMin")
def ArgMin(x, *, axis=0, keepdims=1, select_last_index=0):
    return _arg(torch.argmin, x, axis, keepdims, select_last_index)
