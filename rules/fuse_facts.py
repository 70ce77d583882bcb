"""Facts the transformer fusions read from the graph: scalar constants, shape expressions, equal dims.

The fusion rules (:mod:`graft.rules.fuse_attention`, :mod:`graft.rules.fuse_gelu`,
:mod:`graft.rules.fuse_layernorm`) never take a model type or a head count from the user:
every fact comes from the graph, through these helpers.

- **Scalars up to broadcasting.** A constant with one element is a scalar whatever its rank,
  so ``[0.]``, ``[[0.]]`` and ``0.`` are all 0 — as long as its rank does not exceed the
  tensor it is combined with (then broadcasting leaves that tensor's shape alone; ONNX
  docs/Broadcasting.md).
- **Shape expressions.** The shape input of a ``Reshape`` is either a constant or, in
  dynamic exports, ``Concat(Unsqueeze(Gather(Shape(u), i)), ..., [-1], [16])``.
  :func:`shape_tokens` reads it as a list of tokens: an ``int`` (a literal entry, ``-1`` and
  ``0`` included) or a :class:`Dim` (dim ``i`` of value ``u`` at run time).
- **Equal dims.** :func:`same_dim` proves two dims equal: the same value and axis, the same
  static size, the same symbolic name from shape inference (ONNX shape inference gives one
  symbol to dims it knows are equal), or an axis that a MatMul / per-channel Add / scalar Mul
  carries through unchanged (the leading axes of ``x @ W`` are those of ``x``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.ir import Value


@dataclass(frozen=True)
class Dim:
    """Dim ``axis`` of ``value`` at run time (``Gather(Shape(value), axis)``)."""

    value: Value
    axis: int

    def __repr__(self):
        return f"dim({self.value.name!r}, {self.axis})"


# --------------------------------------------------------------------------- constants
def scalar(value: Value | None, max_rank: int | None = None) -> float | None:
    """The number held by a one-element constant ``value`` (any rank up to ``max_rank``), else None."""
    if value is None:
        return None
    arr = value.constant()
    if arr is None or arr.size != 1 or arr.dtype.kind not in "fiu":
        return None
    if max_rank is not None and arr.ndim > max_rank:
        return None
    return float(arr.reshape(()))


def is_scalar(value: Value | None, number: float, *, rtol: float = 1e-6, max_rank: int | None = None) -> bool:
    """True when ``value`` is a one-element constant equal to ``number`` (relative tolerance ``rtol``:
    exporters write 1/sqrt(2) and 1.702 in float32)."""
    got = scalar(value, max_rank)
    return got is not None and abs(got - number) <= rtol * max(1.0, abs(number))


def all_zero(value: Value | None) -> bool:
    """True when ``value`` is a constant whose every element is 0 (any shape)."""
    arr = None if value is None else value.constant()
    return arr is not None and arr.dtype.kind in "fiub" and not np.any(arr)


def rank(value: Value | None) -> int | None:
    if value is None:
        return None
    arr = value.constant()
    if arr is not None:
        return arr.ndim
    return None if value.shape is None else len(value.shape)


# --------------------------------------------------------------------------- shape expressions
def shape_tokens(value: Value, depth: int = 0) -> list | None:
    """The entries of the 1-D int64 tensor ``value`` as tokens (``int`` or :class:`Dim`), or None
    when it is built by ops this reader does not follow.

    Follows constants, Concat(axis 0), Unsqueeze / Squeeze / Reshape / Cast of one entry,
    Gather of a Shape with constant indices, Shape (with start/end, ONNX Shape-15) of a value of
    known rank, and Slice of such a list with constant starts/ends (step 1).
    """
    if depth > 16:
        return None
    arr = value.constant()
    if arr is not None:
        if arr.dtype.kind not in "iu" or arr.ndim > 1:
            return None
        return [int(x) for x in arr.reshape(-1)]
    p = value.producer
    if p is None:
        return None
    op = p.op_type
    if p.domain not in ("", "ai.onnx"):
        return None
    if op == "Concat":
        if p.attrs.get("axis", 0) not in (0, -1):
            return None
        out = []
        for i in p.inputs:
            t = None if i is None else shape_tokens(i, depth + 1)
            if t is None:
                return None
            out.extend(t)
        return out
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity"):
        t = shape_tokens(p.inputs[0], depth + 1)
        return t if t is not None and len(t) == 1 else None
    if op == "Shape":
        src = p.inputs[0]
        r = rank(src)
        if r is None:
            return None
        start, end = p.attrs.get("start", 0), p.attrs.get("end", r)
        start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
        return [Dim(src, i) for i in range(max(0, start), min(r, end))]
    if op == "Gather":
        if p.attrs.get("axis", 0) != 0:
            return None
        idx = p.inputs[1].constant()
        if idx is None or idx.ndim > 1:
            return None
        sp = p.inputs[0].producer
        if sp is not None and sp.op_type == "Shape" and sp.domain in ("", "ai.onnx") and \
                sp.attrs.get("start", 0) == 0 and all(int(i) >= 0 for i in idx.reshape(-1)):
            # Gather(Shape(u), i): dim i of u, whether or not u's rank is known
            return [Dim(sp.inputs[0], int(i)) for i in idx.reshape(-1)]
        data = shape_tokens(p.inputs[0], depth + 1)
        if data is None:
            return None
        n = len(data)
        try:
            return [data[int(i) + n if int(i) < 0 else int(i)] for i in idx.reshape(-1)]
        except IndexError:
            return None
    if op == "Slice":
        data = shape_tokens(p.inputs[0], depth + 1)
        ins = list(p.inputs) + [None] * (5 - len(p.inputs))
        consts = [None if v is None else v.constant() for v in ins[1:]]
        if data is None or consts[0] is None or consts[1] is None:
            return None
        if consts[2] is not None and [int(a) for a in consts[2].reshape(-1)] not in ([0], [-1]):
            return None
        if consts[3] is not None and [int(s) for s in consts[3].reshape(-1)] != [1]:
            return None
        n = len(data)
        s, e = int(consts[0].reshape(-1)[0]), int(consts[1].reshape(-1)[0])
        s, e = (s + n if s < 0 else s), (e + n if e < 0 else e)
        return data[max(0, min(n, s)):max(0, min(n, e))]
    return None


# --------------------------------------------------------------------------- equal dims
def carriers(value: Value) -> list[Value]:
    """Values whose leading axes (all but the last) are ``value``'s: walking up through
    MatMul by a 2-D constant, Add of a constant of rank <= 1, and Mul / Div by a scalar."""
    out = [value]
    v = value
    for _ in range(4):
        p = v.producer
        if p is None or p.domain not in ("", "ai.onnx"):
            break
        ins = p.inputs
        nxt = None
        if p.op_type == "MatMul" and len(ins) == 2:
            w = ins[1].constant()
            if w is not None and w.ndim == 2:
                nxt = ins[0]
        elif p.op_type in ("Add", "Mul", "Div") and len(ins) == 2:
            for a, b in ((ins[0], ins[1]), (ins[1], ins[0])):
                c = b.constant()
                if c is not None and c.ndim <= 1 and (p.op_type == "Add" or c.size == 1):
                    nxt = a
                    break
        if nxt is None:
            break
        out.append(nxt)
        v = nxt
    return out


def same_dim(token, value: Value, axis: int) -> bool:
    """True when ``token`` (an int or :class:`Dim`) is provably dim ``axis`` of ``value``."""
    shape = value.shape
    have = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
    if isinstance(token, int):
        return isinstance(have, int) and token == have
    if not isinstance(token, Dim):
        return False
    if token.value is value and token.axis == axis:
        return True
    other = token.value.shape
    theirs = other[token.axis] if other is not None and -len(other) <= token.axis < len(other) else None
    if have is not None and theirs is not None and have == theirs:
        return True  # equal static sizes, or one symbol from shape inference
    r = None if shape is None else len(shape)
    if r is not None and 0 <= axis < r - 1 and token.axis == axis:
        return token.value in carriers(value) or value in carriers(token.value)
    return False


def dims_equal(a: Value, i: int, b: Value, j: int) -> bool:
    """True when dim ``i`` of ``a`` is provably dim ``j`` of ``b``."""
    return same_dim(Dim(a, i), b, j)


def static_dim(value: Value, axis: int) -> int | None:
    """Dim ``axis`` of ``value`` when it is a static size, else None (a constant's shape counts)."""
    arr = value.constant()
    shape = arr.shape if arr is not None else value.shape
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def import_contrib_domain(model, domain: str = "com.microsoft", version: int = 1) -> int:
    """Add the opset import for ``domain`` when a node of it exists and the model lacks one (ONNX
    requires it, and shape inference stops at an op of an unimported domain). onnxruntime's
    contrib ops are all version 1. Returns 1 when it added the import, else 0."""
    if domain in model.opset_imports:
        return 0
    if any(n.domain == domain for n in model.all_nodes()):
        model.opset_imports[domain] = version
        return 1
    return 0
