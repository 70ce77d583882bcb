"""Read a shape tensor (the ``shape`` input of Reshape or Expand) element by element.

Exporters build target shapes at run time: ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1], [12], [32])``.
Pruning must know, per element, whether it is a literal (which a rewrite may have
to change), a dim read from some tensor at run time (which follows that tensor's
size by itself), or something it cannot see through. Elements are:

- ``int``: a literal, with a :class:`Piece` saying which constant holds it;
- :class:`Dim`: dim ``axis`` of value ``value`` read with ``Shape`` at run time (>= 0);
- ``None``: unknown.

Ops understood (ai.onnx semantics on 1-D int64 shape vectors): Constant / initializer,
Shape (start/end), Gather (constant indices, axis 0), Slice (constant starts/ends,
axis 0, step 1), Concat, Unsqueeze, Squeeze, Reshape, Cast, Identity, ConstantOfShape,
elementwise Add/Sub/Mul/Div/Equal on known elements, and Where with known conditions
(dims are never negative, so ``Equal(dim, -1)`` is false: the ``-1 → 1`` rewrite
exporters put in front of Expand).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.ir import Node, Value


@dataclass(frozen=True)
class Dim:
    """Dim ``axis`` of ``value``, read at run time."""

    value: Value
    axis: int


@dataclass(frozen=True)
class Piece:
    """Where a literal lives: element ``index`` of constant input ``input`` of ``node``
    (``node`` None: the shape input itself is the constant)."""

    node: Node | None
    input: int
    index: int


Elem = "int | Dim | None"


def elements(v: Value | None, shapes: dict, depth: int = 0) -> list | None:
    """The elements of 1-D (or 0-D) int tensor ``v``, or None when its length is unknown."""
    got = _elements(v, shapes, depth)
    return None if got is None else [e for e, _ in got]


def pieces(v: Value | None, shapes: dict) -> list | None:
    """Like :func:`elements` but pairs each literal with its :class:`Piece` (None for non-literals)."""
    return _elements(v, shapes, 0)


def _elements(v, shapes, depth):
    if v is None or depth > 24:
        return None
    arr = v.constant()
    if arr is not None:
        if arr.dtype.kind not in "iub" or arr.ndim > 1:
            return None
        return [(int(x), Piece(None, -1, i)) for i, x in enumerate(np.atleast_1d(arr).tolist())]
    node = v.producer
    shape = shapes.get(v)
    if node is None or node.domain not in ("", "ai.onnx"):
        return _unknown(shape)
    op = node.op_type
    ins = node.inputs
    if op == "Shape":
        src = ins[0]
        rank = len(shapes[src]) if src in shapes else None
        if rank is None:
            return _unknown(shape)
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end", rank)
        start = max(0, min(rank, start + rank if start < 0 else start))
        end = max(0, min(rank, int(end) + rank if int(end) < 0 else int(end)))
        return [(Dim(src, k), None) for k in range(start, end)]
    if op in ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze"):
        if op in ("Reshape", "Squeeze", "Unsqueeze") and shape is not None and len(shape) > 1:
            return _unknown(shape)
        return _elements(ins[0], shapes, depth + 1)
    if op == "Concat":
        out = []
        for i, x in enumerate(ins):
            got = _elements(x, shapes, depth + 1)
            if got is None:
                return _unknown(shape)
            if x is not None and x.constant() is not None:
                got = [(e, Piece(node, i, k)) for k, (e, _) in enumerate(got)]
            out.extend(got)
        return out
    if op == "Gather":
        data = _elements(ins[0], shapes, depth + 1)
        idx = ins[1].constant() if ins[1] is not None else None
        if data is None or idx is None or int(node.attrs.get("axis", 0)) != 0:
            return _unknown(shape)
        n = len(data)
        try:
            return [data[int(i) + n if int(i) < 0 else int(i)] for i in np.atleast_1d(idx).tolist()]
        except IndexError:
            return _unknown(shape)
    if op == "Slice":
        data = _elements(ins[0], shapes, depth + 1)
        consts = [x.constant() if x is not None else None for x in ins[1:]]
        if data is None or any(c is None for c in consts[:2]):
            return _unknown(shape)
        axes = consts[2] if len(consts) > 2 and consts[2] is not None else np.array([0])
        steps = consts[3] if len(consts) > 3 and consts[3] is not None else np.array([1])
        if axes.ravel().tolist() not in ([0], [-1]) or steps.ravel().tolist() != [1]:
            return _unknown(shape)
        return data[slice(*_clamp(int(consts[0].ravel()[0]), int(consts[1].ravel()[0]), len(data)))]
    if op == "ConstantOfShape":
        if shape is None or len(shape) != 1:
            return None
        fill = node.attrs.get("value")
        val = int(np.asarray(fill.array).ravel()[0]) if fill is not None else 0
        return [(val, None)] * shape[0]
    if op in ("Add", "Sub", "Mul", "Div", "Equal"):
        a, b = _elements(ins[0], shapes, depth + 1), _elements(ins[1], shapes, depth + 1)
        if a is None or b is None:
            return _unknown(shape)
        n = max(len(a), len(b))
        if len(a) not in (1, n) or len(b) not in (1, n):
            return _unknown(shape)
        a, b = a * n if len(a) == 1 else a, b * n if len(b) == 1 else b
        return [(_binary(op, x, y), None) for (x, _), (y, _) in zip(a, b)]
    if op == "Where":
        c = _elements(ins[0], shapes, depth + 1)
        x, y = _elements(ins[1], shapes, depth + 1), _elements(ins[2], shapes, depth + 1)
        if c is None or x is None or y is None:
            return _unknown(shape)
        n = max(len(c), len(x), len(y))
        c, x, y = [z * n if len(z) == 1 else z for z in (c, x, y)]
        if not len(c) == len(x) == len(y) == n:
            return _unknown(shape)
        return [(xe if ce else ye) if isinstance(ce, int) else (None, None) for (ce, _), xe, ye in zip(c, x, y)]
    return _unknown(shape)


def _unknown(shape):
    if shape is None or len(shape) > 1:
        return None
    return [(None, None)] * (shape[0] if shape else 1)


def _clamp(start: int, end: int, n: int) -> tuple[int, int]:
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    return max(0, min(n, start)), max(0, min(n, end))


def _binary(op: str, x, y):
    if isinstance(x, int) and isinstance(y, int):
        if op == "Add":
            return x + y
        if op == "Sub":
            return x - y
        if op == "Mul":
            return x * y
        if op == "Div":
            return x // y if y else None
        return int(x == y)
    if op == "Equal" and (isinstance(x, Dim) and isinstance(y, int) and y < 0
                          or isinstance(y, Dim) and isinstance(x, int) and x < 0):
        return 0  # dims are never negative
    if op == "Mul" and isinstance(x, Dim) and y == 1 or op == "Mul" and isinstance(y, Dim) and x == 1:
        return x if isinstance(x, Dim) else y
    return None
