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
from typing import Callable

import torch
import torch.nn.functional as F

_REGISTRY: dict[str, list[tuple[int, Callable]]] = {}

# ONNX element type -> torch dtype. Absent (refused at conversion): STRING (8), UINT4/INT4 (21/22),
# FLOAT4E2M1 (23), UINT2/INT2 (25/26): torch has no tensor type that computes with them.
ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16,
               6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
               12: torch.uint32, 13: torch.uint64, 14: torch.complex64, 15: torch.complex128,
               16: torch.bfloat16, 17: torch.float8_e4m3fn, 18: torch.float8_e4m3fnuz, 19: torch.float8_e5m2,
               20: torch.float8_e5m2fnuz, 24: torch.float8_e8m0fnu}
_ONNX_TYPE_NAMES = {8: "STRING", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1", 25: "UINT2", 26: "INT2"}


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


# op name -> checks run at conversion time, each ``check(attrs, n_outputs, in_types, opset, in_ranks)
# -> str | None``: ``attrs`` as the op function receives them, ``in_types`` / ``in_ranks`` the ONNX element
# type and the rank of each input (None when absent or unknown). A string is the reason the node is
# refused (it names the attribute and its value).
_CHECKS: dict[str, list[Callable]] = {}


def refuses(*names: str):
    """Register the decorated function as a conversion-time check of ops ``names`` (see ``_CHECKS``)."""
    def deco(fn):
        for name in names:
            _CHECKS.setdefault(name, []).append(fn)
        return fn
    return deco


def refusal(op_type: str, opset: int, attrs: dict, n_outputs: int, in_types: list,
            in_ranks: list | None = None) -> str | None:
    """Why the torch backend cannot run this node (attribute values, optional outputs, input types), or None.

    Called at conversion time, before anything runs, so a model is refused whole instead of failing
    part way through a forward pass.
    """
    for check in _CHECKS.get(op_type, ()):
        why = check(attrs, n_outputs, in_types, opset, in_ranks or [None] * len(in_types))
        if why:
            return why
    return None


def type_name(code: int) -> str:
    """An ONNX element type's name (``INT4``) for messages."""
    t = ONNX_DTYPES.get(code)
    return _ONNX_TYPE_NAMES.get(code, str(t).removeprefix("torch.") if t is not None else f"type {code}")


def lookup(op_type: str, opset: int) -> Callable | None:
    """The implementation of ``op_type`` at ``opset`` (latest version not newer than it), or None.

    The table holds the ops of this module and, once they are imported, of the ``torch_ops_*`` modules
    that register into it (nn, rnn, vision, attn, signal, tensor; :mod:`graft.ir.torch_backend` imports
    them all, ``OP_MODULES``).
    """
    best = None
    for since, fn in _REGISTRY.get(op_type, ()):
        if since <= opset:
            best = fn
    return best


def supported_ops() -> list[str]:
    """The ONNX op types registered (see :func:`lookup` for which modules register)."""
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
                   "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Erf": torch.erf,
                   "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
                   "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos,
                   "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan,
                   "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh,
                   "Atanh": torch.atanh, "Not": torch.logical_not, "IsNaN": torch.isnan,
                   "Softsign": F.softsign, "Mish": F.mish, "HardSwish": F.hardswish}.items():
    _unary(_name, _fn)


@onnx_op("Abs")
def Abs(x):
    return x if x.dtype in _SIGNED_VIEW else torch.abs(x)  # unsigned: already its own absolute value


@onnx_op("Swish", since=24)
def Swish(x, *, alpha=1.0):
    return x * torch.sigmoid(alpha * x)


@onnx_op("Shrink")
def Shrink(x, *, bias=0.0, lambd=0.5):
    """``x + bias`` below ``-lambd``, ``x - bias`` above ``lambd``, else 0 (ONNX Shrink-9), in ``x``'s dtype."""
    out = torch.where(x < -lambd, x.double() + bias, torch.where(x > lambd, x.double() - bias, 0.0))
    return out.to(x.dtype)


@onnx_op("Hardmax", since=1)
def Hardmax_1(x, *, axis=1):
    return _coerced(Hardmax, x, axis)


@onnx_op("Hardmax", since=13)
def Hardmax(x, axis=-1):
    """One-hot of the first maximum along ``axis`` (ONNX Hardmax-13)."""
    idx = torch.argmax(x, dim=axis, keepdim=True)
    return torch.zeros_like(x).scatter(axis, idx, 1.0)


@onnx_op("Identity")
def Identity(x):
    return x


# --------------------------------------------------------------------------- control flow
# The torch backend turns each subgraph into a GraphModule taking the subgraph's own inputs followed by
# the outer-scope values it reads (``captured``); these functions run them with Python control flow.
def If(cond, then_branch, else_branch, *captured):
    """ONNX If whose condition is only known at run time: run ``then_branch`` or ``else_branch`` on the
    first element of ``cond``."""
    branch = then_branch if bool(cond.reshape(-1)[0]) else else_branch
    return branch(*captured)


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def Loop(body, max_trip_count, cond, *args, n_carried):
    """ONNX Loop-16: ``body(i, cond, *carried, *captured) -> (cond, *carried, *scan_elements)`` while
    ``i < max_trip_count`` (when given) and ``cond`` (when given) hold. Returns the final carried values,
    then each scan output stacked along a new first axis."""
    carried, captured = list(args[:n_carried]), args[n_carried:]
    trips = int(item(max_trip_count)) if max_trip_count is not None else None
    flag = cond.reshape(()) if cond is not None else torch.tensor(True)
    scans: list[list] = []
    i = 0
    while bool(flag) and (trips is None or i < trips):
        out = _as_tuple(body(torch.tensor(i, dtype=torch.int64), flag, *carried, *captured))
        flag, carried = out[0].reshape(()), list(out[1:1 + n_carried])
        rest = out[1 + n_carried:]
        if not scans:
            scans = [[] for _ in rest]
        for acc, v in zip(scans, rest):
            acc.append(v)
        i += 1
    return (*carried, *(torch.stack(acc) for acc in scans))


def Scan(body, *args, n_state, n_scan_inputs, input_axes, input_directions, output_axes, output_directions):
    """ONNX Scan-16: for each position t along the scan inputs' axes (reversed where a direction is 1),
    ``body(*state, *slices_t, *captured) -> (*state, *elements_t)``. Returns the final state, then each
    output's elements stacked along its output axis (in reverse order where its direction is 1)."""
    state = list(args[:n_state])
    xs = args[n_state:n_state + n_scan_inputs]
    captured = args[n_state + n_scan_inputs:]
    axes = [norm_axis(a, x.dim()) for a, x in zip(input_axes, xs)]
    steps = xs[0].shape[axes[0]]
    outs: list[list] = []
    for t in range(steps):
        sl = [x.select(a, steps - 1 - t if d else t) for x, a, d in zip(xs, axes, input_directions)]
        res = _as_tuple(body(*state, *sl, *captured))
        state = list(res[:n_state])
        if not outs:
            outs = [[] for _ in res[n_state:]]
        for acc, v in zip(outs, res[n_state:]):
            acc.append(v)
    stacked = []
    for k, acc in enumerate(outs):
        if output_directions[k]:
            acc = acc[::-1]
        stacked.append(torch.stack(acc, norm_axis(output_axes[k], acc[0].dim() + 1)))
    return (*state, *stacked)


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


@onnx_op("PRelu", since=1)
def PRelu_1(x, slope):
    """Opset < 7: a slope of C elements is per channel (axis 1)."""
    if slope.dim() == 1 and slope.numel() > 1 and x.dim() >= 2 and slope.numel() == x.shape[1]:
        slope = slope.reshape(-1, *([1] * (x.dim() - 2)))
    return torch.where(x < 0, x * slope, x)


@onnx_op("PRelu", since=7)
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
        x = _maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = _minimum(x, hi.to(x.dtype))
    return x


# --------------------------------------------------------------------------- unsigned integers
# torch stores uint16/32/64 but has almost no CPU kernels for them. Results stay exact:
# add/sub/mul/bitwise ops run on the same bits viewed as the signed type of the same width (two's
# complement wraps modulo 2^n exactly as unsigned arithmetic does); order comparisons flip the sign bit
# first (an order-preserving map from unsigned to signed); division and remainder widen uint16/32 to
# int64 and use shift-and-correct long division for uint64.
_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _signed(x):
    return x.view(_SIGNED_VIEW[x.dtype])


def _order_key(x):
    """Signed integers ordered as the unsigned values of ``x`` are."""
    s = _signed(x)
    return s ^ torch.iinfo(s.dtype).min


def _bits_op(fn, a, b):
    """``fn`` on the bits of unsigned ``a`` and ``b`` viewed as signed, the result viewed back."""
    dt = a.dtype
    return fn(_signed(a), _signed(b)).view(dt)


def _udiv(a, b):
    """Truncating unsigned division, exact for uint16/32/64."""
    dt = a.dtype
    if dt != torch.uint64:
        return torch.div(a.to(torch.int64), b.to(torch.int64), rounding_mode="floor").to(dt)
    a, b = torch.broadcast_tensors(a, b)
    ai, bi = _signed(a), _signed(b)
    big = bi < 0  # divisor >= 2^63: the quotient is 0 or 1
    safe_b = torch.where(big | (bi == 0), torch.ones_like(bi), bi)
    half = (ai >> 1) & torch.iinfo(torch.int64).max  # logical shift: a // 2, below 2^63
    q = torch.div(half, safe_b, rounding_mode="floor") << 1
    r = ai - q * safe_b
    q = q + (_order_key(r.view(dt)) >= _order_key(safe_b.view(dt))).to(torch.int64)
    q = torch.where(big, (_order_key(a) >= _order_key(b)).to(torch.int64), q)
    return q.view(dt)


# --------------------------------------------------------------------------- binary ops
def _legacy_broadcast(a, b, broadcast, axis):
    """Opset < 7 broadcasting: without ``broadcast`` the shapes must match; with it, ``b``'s dims line up
    with ``a``'s from ``axis`` (default: suffix matching, which numpy broadcasting already does)."""
    if broadcast and axis is not None and b.dim() > 0:
        axis = norm_axis(axis, a.dim())
        b = b.reshape(*b.shape, *([1] * (a.dim() - axis - b.dim())))
    return b


def _make_binary(name, fn, uint_fn=None):
    """Register ``name`` (opset 7+: multidirectional broadcasting) and ``name``_1 (opset 1: ``broadcast``
    and ``axis`` attributes). ``uint_fn`` runs instead of ``fn`` for uint16/32/64 inputs."""
    def op(a, b):
        if uint_fn is not None and a.dtype in _SIGNED_VIEW:
            return uint_fn(a, b)
        return fn(a, b)

    def legacy(a, b, *, broadcast=0, axis=None):
        return op(a, _legacy_broadcast(a, b, broadcast, axis))

    op.__name__ = op.__qualname__ = name
    legacy.__name__ = legacy.__qualname__ = f"{name}_1"
    globals()[name] = op  # module-level names keep the GraphModule picklable
    globals()[legacy.__name__] = legacy
    onnx_op(name, 1)(legacy)
    onnx_op(name, 7)(op)


def _cmp(fn):
    return lambda a, b: fn(_order_key(a), _order_key(b))


for _name, _fn, _ufn in (
        ("Add", torch.add, functools.partial(_bits_op, torch.add)),
        ("Sub", torch.sub, functools.partial(_bits_op, torch.sub)),
        ("Mul", torch.mul, functools.partial(_bits_op, torch.mul)),
        ("Equal", torch.eq, None),
        ("Greater", torch.gt, _cmp(torch.gt)), ("Less", torch.lt, _cmp(torch.lt)),
        ("And", torch.logical_and, None), ("Or", torch.logical_or, None), ("Xor", torch.logical_xor, None)):
    _make_binary(_name, _fn, _ufn)

for _name, _fn, _ufn in (
        ("GreaterOrEqual", torch.ge, _cmp(torch.ge)), ("LessOrEqual", torch.le, _cmp(torch.le)),
        ("BitwiseAnd", torch.bitwise_and, functools.partial(_bits_op, torch.bitwise_and)),
        ("BitwiseOr", torch.bitwise_or, functools.partial(_bits_op, torch.bitwise_or)),
        ("BitwiseXor", torch.bitwise_xor, functools.partial(_bits_op, torch.bitwise_xor))):
    _make_binary(_name, _fn, _ufn)  # added at opset 12/18: no legacy form, registering it is harmless


@onnx_op("BitwiseNot")
def BitwiseNot(x):
    if x.dtype in _SIGNED_VIEW:
        return torch.bitwise_not(_signed(x)).view(x.dtype)
    return torch.bitwise_not(x)


@onnx_op("BitShift")
def BitShift(x, y, *, direction):
    """ONNX BitShift-28: left shifts drop the bits shifted out; right shifts are logical for unsigned and
    arithmetic for signed types. A shift below 0 or of the type's width or more gives the sign fill alone
    (-1 for a right shift of a negative value, else 0). Runs on int64 and truncates back."""
    dt = x.dtype
    width = torch.iinfo(dt).bits
    signed_dt = _SIGNED_VIEW.get(dt, dt)
    v = (x.view(signed_dt) if dt in _SIGNED_VIEW else x).to(torch.int64)
    s = (y.view(signed_dt) if dt in _SIGNED_VIEW else y).to(torch.int64)
    unsigned = not dt.is_signed
    if unsigned and dt not in (torch.uint8, torch.uint64):
        v = v & ((1 << width) - 1)  # the unsigned value (below 2^32), not its sign-extended view
    if dt == torch.uint64:
        s = torch.where(s < 0, torch.full_like(s, 64), s)  # a huge unsigned shift, not a negative one
    bad = (s < 0) | (s >= width)
    k = torch.where(bad, torch.zeros_like(s), s)
    if direction == "LEFT":
        out = torch.where(bad, torch.zeros_like(v), v << k)
    else:
        out = v >> k
        if dt == torch.uint64:  # logical: clear the bits the arithmetic shift copied from bit 63
            out = out & torch.where(k == 0, torch.full_like(k, -1), (torch.ones_like(k) << (64 - k)) - 1)
        fill = torch.where(v < 0, -torch.ones_like(v), torch.zeros_like(v)) if not unsigned else torch.zeros_like(v)
        out = torch.where(bad, fill, out)
    out = out.to(signed_dt)  # truncates to the type's width
    return out.view(dt) if dt in _SIGNED_VIEW else out


@onnx_op("Div", since=1)
def Div_1(a, b, *, broadcast=0, axis=None):
    return Div(a, _legacy_broadcast(a, b, broadcast, axis))


@onnx_op("Div", since=7)
def Div(a, b):
    if a.dtype in _SIGNED_VIEW:
        return _udiv(a, b)
    if not a.is_floating_point() and not a.is_complex():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates
    return a / b


@onnx_op("Pow", since=1)
def Pow_1(a, b, *, broadcast=0, axis=None):
    return Pow(a, _legacy_broadcast(a, b, broadcast, axis))


@onnx_op("Pow", since=7)
def Pow(a, b):
    return torch.pow(a, b).to(a.dtype)


@onnx_op("Mod")
def Mod(a, b, *, fmod=0):
    if a.dtype in _SIGNED_VIEW:  # unsigned: truncation and floor agree
        return _bits_op(torch.sub, a, _bits_op(torch.mul, _udiv(a, b), b))
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def _maximum(a, b):
    if a.dtype in _SIGNED_VIEW:
        return torch.where(_order_key(a) >= _order_key(b), a, b)
    return torch.maximum(a, b)


def _minimum(a, b):
    if a.dtype in _SIGNED_VIEW:
        return torch.where(_order_key(a) <= _order_key(b), a, b)
    return torch.minimum(a, b)


# Variadic ops fold their inputs left to right with the binary op (multidirectional broadcasting).
@onnx_op("Max")
def Max(*xs):
    return functools.reduce(_maximum, xs)


@onnx_op("Min")
def Min(*xs):
    return functools.reduce(_minimum, xs)


@onnx_op("Sum")
def Sum(*xs):
    return functools.reduce(Add, xs)


@onnx_op("Mean")
def Mean(*xs):
    return Sum(*xs) / len(xs)


@onnx_op("Where")
def Where(cond, a, b):
    return torch.where(cond, a, b)


# float8 types → the largest finite value, and the |x| from which round-to-nearest-even overflows
# (True: that value overflows too, the tie going to the next, unrepresentable, even value).
FLOAT8 = {torch.float8_e4m3fn: (448.0, 464.0, False), torch.float8_e4m3fnuz: (240.0, 248.0, True),
          torch.float8_e5m2: (57344.0, 61440.0, True), torch.float8_e5m2fnuz: (57344.0, 61440.0, True)}


def _to_float8(x, dtype, saturate):
    """ONNX Cast-19 to a float8 type: with ``saturate`` out-of-range values (infinities included) become
    ±max; without, they overflow to ±inf (E5M2) or NaN (the others). torch's own conversion saturates
    E4M3FN and overflows E5M2, so both cases are spelled out."""
    xf = x.to(torch.float32)
    mx, bound, tie_overflows = FLOAT8[dtype]
    y = xf.clamp(-mx, mx)  # NaN stays NaN
    if not saturate:
        a = xf.abs()
        over = a >= bound if tie_overflows else a > bound
        special = float("inf") if dtype == torch.float8_e5m2 else float("nan")
        y = torch.where(over, torch.copysign(torch.full_like(y, special), xf), y)
    return y.to(dtype)


def _to_e8m0(x, saturate, round_mode):
    """ONNX Cast-24 to FLOAT8E8M0 (a power of two, the exponent of float32): ``round_mode`` up / down /
    nearest on the float32 mantissa; NaN and ±inf become NaN (0xFF); with ``saturate`` rounding stops at
    2^127 instead of overflowing to NaN (``onnx.numpy_helper.to_float8e8m0``)."""
    f = x.to(torch.float32).view(torch.int32)
    exponent = (f >> 23) & 0xFF
    special = exponent == 0xFF
    if round_mode == "nearest":
        g, r, st = (f & 0x400000) != 0, (f & 0x200000) != 0, (f & 0x1FFFFF) != 0
        up = g & (r | st | (exponent > 0))
    elif round_mode == "up":
        up = (f & 0x7FFFFF) != 0
    else:
        up = torch.zeros_like(special)
    up = up & ~special
    if saturate:
        up = up & (exponent != 0xFE)
    out = torch.where(special, torch.full_like(exponent, 0xFF), exponent + up.to(torch.int32))
    return out.to(torch.uint8).view(torch.float8_e8m0fnu)


def cast_to(x, dtype, saturate=1, round_mode="up"):
    """``x`` converted to torch ``dtype`` as ONNX Cast-25 converts (float8 ``saturate``, FLOAT8E8M0
    ``round_mode``; everything else as torch converts)."""
    if dtype == x.dtype:
        return x
    if dtype in FLOAT8:
        return _to_float8(x, dtype, saturate)
    if dtype == torch.float8_e8m0fnu:
        return _to_e8m0(x, saturate, round_mode)
    if x.dtype in FLOAT8 or x.dtype == torch.float8_e8m0fnu:
        x = x.to(torch.float32)  # exact; torch converts float8 to few types directly
    return x.to(dtype)


@onnx_op("Cast")
def Cast(x, *, to, saturate=1, round_mode="up"):
    return cast_to(x, ONNX_DTYPES[int(to)], saturate, round_mode)


@onnx_op("CastLike")
def CastLike(x, like, *, saturate=1, round_mode="up"):
    return cast_to(x, like.dtype, saturate, round_mode)


@refuses("Cast")
def _cast_check(attrs, n_outputs, in_types, opset, in_ranks):
    to = int(attrs.get("to", 1))
    if to not in ONNX_DTYPES:
        return f"attribute to={type_name(to)} ({to}): torch has no such tensor type"
    return None


def _dropout(x, ratio, training, _outputs):
    if not training or ratio == 0:
        return (x, torch.ones_like(x, dtype=torch.bool)) if _outputs > 1 else x
    keep = torch.rand_like(x, dtype=torch.float32) >= ratio
    y = torch.where(keep, x / (1 - ratio), torch.zeros_like(x))
    return (y, keep) if _outputs > 1 else y


@onnx_op("Dropout", since=1)
def Dropout_1(x, *, ratio=0.5, is_test=0, _outputs=1):
    """Opset < 7: dropout unless ``is_test`` (random: the mask comes from torch's generator)."""
    return _dropout(x, ratio, not is_test, _outputs)


@onnx_op("Dropout", since=7)
def Dropout_7(x, *, ratio=0.5, _outputs=1):
    return _dropout(x, ratio, False, _outputs)  # opsets 7-11 define Dropout as inference only


@onnx_op("Dropout", since=12)
def Dropout(x, ratio=None, training_mode=None, *, seed=0, _outputs=1):
    """ONNX Dropout-13: identity unless ``training_mode`` is true; then each element is zeroed with
    probability ``ratio`` and the rest scaled by ``1/(1 - ratio)`` (random: torch's generator, not the
    ``seed`` attribute's)."""
    training = training_mode is not None and bool(training_mode.reshape(-1)[0])
    return _dropout(x, float(ratio.reshape(-1)[0]) if ratio is not None else 0.5, training, _outputs)


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
def Gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0, broadcast=1):
    """``alpha * A' @ B' + beta * C``; ``broadcast`` (opset < 7) only allowed C to broadcast, which it
    always may here."""
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
    """ONNX GatherND-13: slices of ``x`` at the index tuples in the last axis of ``idx``, the first
    ``batch_dims`` axes of both paired up."""
    k = idx.shape[-1]
    if not batch_dims:
        return x[tuple(idx[..., i] for i in range(k))]
    batch = x.shape[:batch_dims]
    nb = int(math.prod(batch))
    xf = x.reshape(nb, *x.shape[batch_dims:])
    ix = idx.reshape(nb, *idx.shape[batch_dims:])
    b = torch.arange(nb, device=x.device).reshape(nb, *([1] * (ix.dim() - 2)))
    out = xf[(b, *(ix[..., i] for i in range(k)))]
    return out.reshape(*batch, *out.shape[1:])


@onnx_op("ScatterElements")
def ScatterElements(x, idx, upd, *, axis=0, reduction="none"):
    axis = norm_axis(axis, x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if reduction == "none":
        return x.scatter(axis, idx, upd)
    return x.scatter_reduce(axis, idx, upd, {"add": "sum", "mul": "prod"}.get(reduction, reduction))


@onnx_op("ScatterND")
def ScatterND(x, idx, upd, *, reduction="none"):
    """ONNX ScatterND-18: ``x`` with the slices at ``idx`` replaced by (or combined with: add, mul, max,
    min) ``upd``. The index tuples become row numbers of ``x`` viewed as [prod(shape[:k]), rest]."""
    k = idx.shape[-1]
    head = x.shape[:k]
    lin = torch.zeros(idx.shape[:-1], dtype=torch.int64, device=x.device)
    for i in range(k):
        lin = lin * head[i] + torch.where(idx[..., i] < 0, idx[..., i] + head[i], idx[..., i])
    rows = x.reshape(int(math.prod(head)), *x.shape[k:])
    u = upd.reshape(-1, *x.shape[k:])
    lin = lin.reshape(-1)
    if reduction == "none":
        out = rows.index_copy(0, lin, u)
    elif reduction == "add":
        out = rows.index_add(0, lin, u)
    else:
        out = rows.index_reduce(0, lin, u, {"mul": "prod", "max": "amax", "min": "amin"}[reduction])
    return out.reshape(x.shape)


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
    if x.dtype in _SIGNED_VIEW:  # wrapping sums on the bits
        return CumSum(_signed(x), axis, exclusive=exclusive, reverse=reverse).view(x.dtype)
    a = norm_axis(int(item(axis)), x.dim())
    if reverse:
        x = x.flip(a)
    y = torch.cumsum(x, a, dtype=x.dtype)
    if exclusive:
        y = y - x
    return y.flip(a) if reverse else y


@onnx_op("NonZero")
def NonZero(x):
    return torch.stack(torch.nonzero(x, as_tuple=True)) if x.dim() else torch.nonzero(x).T


@onnx_op("TopK", since=1)
def TopK_1(x, *, axis=-1, k, _outputs=2):
    return TopK(x, k, axis=axis)


@onnx_op("TopK", since=10)
def TopK(x, k, *, axis=-1, largest=1, sorted=1, _outputs=2):
    """ONNX TopK-11: the ``k`` largest (smallest) along ``axis``; equal values keep the lower index first,
    so a stable sort is used (torch.topk orders ties arbitrarily)."""
    unsigned = x.dtype in _SIGNED_VIEW
    key = _order_key(x) if unsigned else x
    _, i = torch.sort(key, dim=axis, descending=bool(largest), stable=True)
    i = i.narrow(axis, 0, int(item(k)))
    if unsigned:
        return torch.gather(_signed(x), axis, i).view(x.dtype), i
    return torch.gather(x, axis, i), i


@onnx_op("OneHot")
def OneHot(indices, depth, values, *, axis=-1):
    d = int(item(depth))
    idx = torch.where(indices < 0, indices + d, indices).long()
    hot = F.one_hot(idx.clamp(0, d - 1), d) * ((idx >= 0) & (idx < d)).unsqueeze(-1)
    out = torch.where(hot.bool(), values[1], values[0])
    return out.movedim(-1, norm_axis(axis, out.dim()))


# --------------------------------------------------------------------------- reductions
def _reduce(fn, x, axes, keepdims, noop_with_empty_axes, empty=None):
    ax = ints(axes) if axes is not None else []
    if not ax:
        if noop_with_empty_axes:
            return x
        ax = list(range(x.dim()))
    ax = sorted(norm_axis(a, x.dim()) for a in ax)
    if empty is not None and any(x.shape[a] == 0 for a in ax):
        # a max/min over nothing: the identity of the reduction (ONNX ReduceMax-18: -inf, or the type's
        # lowest value), where torch refuses
        shape = [1 if i in ax else d for i, d in enumerate(x.shape)] if keepdims else \
            [d for i, d in enumerate(x.shape) if i not in ax]
        return torch.full(shape, empty(x.dtype), dtype=x.dtype, device=x.device)
    return fn(x, ax, bool(keepdims))


def _lowest(dtype):
    if dtype == torch.bool:
        return False
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _highest(dtype):
    if dtype == torch.bool:
        return True
    return float("inf") if dtype.is_floating_point else torch.iinfo(dtype).max


_REDUCERS = {
    "ReduceMean": lambda x, a, k: x.mean(a, keepdim=k),
    "ReduceSum": lambda x, a, k: _unsigned_bits(lambda s: _sum(s, a, k), x),
    "ReduceMax": lambda x, a, k: _unsigned_order(lambda s: s.amax(a, keepdim=k), x),
    "ReduceMin": lambda x, a, k: _unsigned_order(lambda s: s.amin(a, keepdim=k), x),
    "ReduceProd": lambda x, a, k: _unsigned_bits(lambda s: _prod(s, a, k), x),
    "ReduceL1": lambda x, a, k: x.abs().sum(a, keepdim=k),
    "ReduceL2": lambda x, a, k: (x * x).sum(a, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, a, k: (x * x).sum(a, keepdim=k),
    "ReduceLogSumExp": lambda x, a, k: torch.logsumexp(x, a, keepdim=k),
    "ReduceLogSum": lambda x, a, k: x.sum(a, keepdim=k).log(),
}


def _sum(x, axes, keepdim):
    # integers keep their type (torch would widen int32 to int64); floats sum as torch sums them
    return x.sum(axes, keepdim=keepdim) if x.is_floating_point() else x.sum(axes, keepdim=keepdim, dtype=x.dtype)


def _unsigned_bits(fn, x):
    """``fn`` (a wrapping sum/product) on uint16/32/64 through the signed view of the same bits."""
    return fn(_signed(x)).view(x.dtype) if x.dtype in _SIGNED_VIEW else fn(x)


def _unsigned_order(fn, x):
    """``fn`` (a max/min that returns elements) on uint16/32/64 through the order-preserving signed key."""
    if x.dtype not in _SIGNED_VIEW:
        return fn(x)
    key = _order_key(x)
    return (fn(key) ^ torch.iinfo(key.dtype).min).view(x.dtype)


def _prod(x, axes, keepdim):
    for a in sorted(axes, reverse=True):
        x = x.prod(a, keepdim=keepdim)
    return x


_EMPTY = {"ReduceMax": _lowest, "ReduceMin": _highest}


def _make_reduce(name, fn):
    empty = _EMPTY.get(name)

    def attr_form(x, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        return _reduce(fn, x, axes, keepdims, noop_with_empty_axes, empty)

    def input_form(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        return _reduce(fn, x, axes, keepdims, noop_with_empty_axes, empty)

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
    if x.dtype in _SIGNED_VIEW:
        x = _order_key(x)
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
