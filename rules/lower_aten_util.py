"""Helpers shared by the ATen → ONNX lowering rules (``rules/lower_aten_*.py``).

A lowering rule matches one ``aten`` node and returns ONNX ops (opset 18) that
compute the same values. Its arguments are read by schema name with
:func:`graft.ir.torch_aten.aten_args` (``a["weight"]``): a :class:`ir.Value` for tensors
and run-time sizes, a Python value for arguments known at capture time.

:func:`lowering` turns ``fn(op, a, node) -> Value | tuple`` into graft
:class:`~compiler.Rule` objects, one per ATen overload. ``fn`` may call
:func:`refuse` to leave the node in the ``aten`` domain; the reason is kept on the
node (``graft.lowering_refused``) and shown when the ONNX backend lists unlowered
ops. Every node a lowering creates inherits the ATen node's ``torch.module``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from graft.compiler.engine import Rule, op
from graft.ir import DataType, Node, Value
from graft.ir.torch_aten import PERMUTED_FROM, TORCH_TO_ONNX_DTYPE, aten_args

aten = op.domain("aten")
INT64_MAX = 2**63 - 1


class Refuse(Exception):
    """Raised by a lowering function: this node cannot be lowered (the message says why)."""


def refuse(reason: str):
    raise Refuse(reason)


def slug(op_type: str) -> str:
    """``"conv2d.padding"`` → ``"conv2d_padding"``; ``.default`` and ``.Tensor``-style suffixes kept short."""
    name, _, ov = op_type.partition(".")
    if name.startswith("__") and name.endswith("__"):
        name = name.strip("_")
    return name if ov in ("default", "") else f"{name}_{ov.lower()}"


def lowering(op_types, fn: Callable, *, prefix: str = "lower_aten") -> list[Rule]:
    """One rule ``lower_aten_<op>`` per ATen overload in ``op_types``, each running ``fn``.

    ``fn(op, a, node)`` returns the Value(s) replacing the node's outputs, in order.
    """
    if isinstance(op_types, str):
        op_types = [op_types]
    rules = []
    for op_type in op_types:
        pattern = aten(op_type)(name="n", _variadic=True)
        rule = Rule(f"{prefix}_{slug(op_type)}", pattern, _replacement, doc=(fn.__doc__ or "").strip())
        rule.lower_fn = fn
        rule.replacement = _bind(fn)
        code = getattr(fn, "__code__", None)
        if code is not None:  # errors and `graft explain` point at the lowering function, not this helper
            rule.where = f"{code.co_filename}:{code.co_firstlineno}"
        rules.append(rule)
    return rules


def _replacement(op, m):
    """Placeholder; :func:`lowering` installs the real one (see :func:`_bind`)."""
    return m.fail("unbound lowering", m.n)


def _bind(fn: Callable):
    def replacement(op, m):
        node = m.n
        try:
            out = fn(op, aten_args(node), node)
        except Refuse as e:
            node.meta["graft.lowering_refused"] = str(e)
            return m.fail(str(e), node)
        outs = list(out) if isinstance(out, tuple) else [out]
        for i, old in enumerate(node.outputs[len(outs):], start=len(outs)):
            if old.num_uses or old.is_graph_output():
                node.meta["graft.lowering_refused"] = f"output {i} is used but the lowering does not compute it"
                return m.fail(node.meta["graft.lowering_refused"], node)
            outs.append(op.Identity(outs[0]))  # a placeholder for an unused output; dead code drops it
        outs = outs[:len(node.outputs)]
        made = {o for n in op.nodes for o in n.outputs}
        for i, (old, new) in enumerate(zip(node.outputs, outs)):
            if old.is_graph_output() and new not in made:
                outs[i] = op.Identity(new)  # a graph output keeps its name on a node output
        inherit(op, node)
        return tuple(outs) if len(outs) != 1 else outs[0]

    replacement.__doc__ = fn.__doc__
    replacement.__name__ = f"lower_{fn.__name__}"
    return replacement


def inherit(op, node: Node) -> None:
    """Name the nodes built so far after the ATen node (``linear_3/Gemm``) and give them its
    module path, so diffs and reports read like the user's model."""
    graph = node.graph
    for n in op.nodes:
        if graph is not None and "/" not in n.name:
            n.name = graph.unique_name(f"{node.name}/{n.op_type}")
        for k in ("torch.module", "torch.module_type"):
            if k in node.meta and k not in n.meta:
                n.meta[k] = node.meta[k]


# --------------------------------------------------------------------------- values
def const(op, array, dtype: DataType | None = None, name: str | None = None) -> Value:
    """A new initializer (a compile-time constant: never a trainable parameter in the torch backend)."""
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype.to_numpy())
    v = op.const(arr, dtype=dtype, name=name)
    v.meta["torch.kind"] = "constant"
    return v


def permuted(op, v: Value, perm: list[int]) -> Value:
    """``Transpose(v, perm)``; for a torch parameter, the transposed copy as a new initializer instead,
    marked ``meta["torch.permuted_from"] = (fqn, perm)``.

    The ONNX output gets the weight in the layout MatMul wants (what constant folding would make
    of the Transpose anyway); the torch backend rebuilds it as ``permute`` of the one source
    parameter, so its state_dict keeps the source name and layout and tied weights (an embedding
    shared with an LM head) stay one parameter.
    """
    if v.const is None or v.meta.get("torch.kind") != "parameter":
        return op.Transpose(v, perm=list(perm))
    t = v.const
    new = op.const(np.ascontiguousarray(np.transpose(t.array, perm)), dtype=t.dtype, name=f"{v.name}_T")
    new.meta["torch.kind"] = "parameter"
    new.meta[PERMUTED_FROM] = (str(v.meta.get("torch.fqn", v.name)), [int(p) for p in perm])
    return new


def ints(op, values) -> Value:
    """A 1-D int64 constant (or the Value itself when the list is only known at run time)."""
    if isinstance(values, Value):
        return values
    return const(op, np.array(list(values), dtype=np.int64))


def onnx_dtype(torch_name: str) -> DataType:
    try:
        return TORCH_TO_ONNX_DTYPE[torch_name]
    except KeyError:
        refuse(f"dtype {torch_name} has no ONNX equivalent")


def out_dtype(node: Node, i: int = 0) -> DataType:
    dt = node.outputs[i].dtype
    if dt is None:
        refuse("output dtype unknown")
    return dt


def cast(op, v: Value, dtype: DataType) -> Value:
    """``v`` as ``dtype`` (a Cast only when its dtype differs)."""
    if v.dtype == dtype:
        return v
    return op.Cast(v, to=int(dtype))


def operand(op, x, dtype: DataType) -> Value:
    """A tensor operand in ``dtype``: a Value (cast when needed) or a Python scalar made a 0-d constant."""
    if isinstance(x, Value):
        return cast(op, x, dtype)
    if x is None:
        refuse("missing operand")
    return const(op, np.array(x), dtype)


def scalar(op, x, dtype: DataType = DataType.INT64) -> Value:
    """A 0-d value of ``dtype`` from a Python number or a run-time 0-d Value."""
    if isinstance(x, Value):
        return cast(op, x, dtype)
    return const(op, np.array(x), dtype)


def one_d(op, x) -> Value:
    """A 1-element int64 tensor from a Python int or a run-time 0-d int64 Value."""
    if isinstance(x, Value):
        return op.Unsqueeze(cast(op, x, DataType.INT64), ints(op, [0]))
    return ints(op, [x])


def rank(v: Value) -> int:
    if v.shape is None:
        refuse(f"rank of {v.name!r} unknown")
    return len(v.shape)


def axis(a: int, r: int) -> int:
    return a + r if a < 0 else a


def static_dim(v: Value, i: int) -> int:
    d = v.shape[i] if v.shape is not None and -len(v.shape) <= i < len(v.shape) else None
    if not isinstance(d, int):
        refuse(f"dim {i} of {v.name!r} is not static")
    return d


def is_float(dt: DataType | None) -> bool:
    return dt is not None and dt.is_float


def promote(*dtypes: DataType | None) -> DataType:
    """torch's type promotion for tensor operands (float beats int beats bool; wider wins)."""
    ds = [d for d in dtypes if d is not None]
    if not ds:
        refuse("operand dtypes unknown")
    return DataType.from_numpy(np.result_type(*[d.to_numpy() for d in ds]))
