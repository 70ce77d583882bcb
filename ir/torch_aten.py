"""ATen ops inside graft's IR: how a torch call is stored as a :class:`Node`, and read back.

A node captured from torch has ``domain == "aten"`` and ``op_type`` the ATen
overload name (``"convolution.default"``, ``"add.Tensor"``; ops of other
namespaces are ``"<ns>::<name>.<overload>"``). Its operator schema decides the
layout, walking the schema's arguments in order:

- a ``Tensor`` / ``Tensor?`` argument is one input (``None`` when absent), except a
  Python scalar passed in a Tensor slot (``add.Tensor(x, 2)``), which is an attribute;
- a ``Tensor[]`` / ``Tensor?[]`` argument is as many inputs as the list has elements; an op
  with several such arguments (``lstm.input``'s ``hx`` and ``params``) lists their lengths in
  the ``_list_sizes`` attribute;
- any other argument is an attribute named as in the schema when its value is
  known at capture time; ``None`` values are left out. When it depends on run-time
  sizes (a ``SymInt`` from ``sym_size``), it is an input instead — a 0-d int64
  tensor, or a 1-D int64 tensor for an int list — and its name is listed in the
  ``_dynamic`` attribute.

``dtype`` attributes hold torch's dtype name (``"float32"``), devices, layouts and
memory formats their ``str``. :func:`aten_args` reverses the layout, so the
lowering rules and the torch backend read arguments by schema name.

Importing this module does not import torch; the schema functions do.
"""
from __future__ import annotations

import functools
from typing import Any

from graft.ir._core import Model, Node, Value
from graft.ir.dtypes import DataType

ATEN_DOMAIN = "aten"
DYNAMIC_ATTR = "_dynamic"
LIST_SIZES_ATTR = "_list_sizes"
# Value meta of an initializer that is a torch parameter permuted at compile time: (source fqn, perm);
# the torch backend emits permute(parameter) for it (rules/lower_aten_util.permuted)
PERMUTED_FROM = "torch.permuted_from"

# torch dtype name -> ONNX element type (torch.<name>)
TORCH_TO_ONNX_DTYPE = {
    "float32": DataType.FLOAT, "float64": DataType.DOUBLE, "float16": DataType.FLOAT16,
    "bfloat16": DataType.BFLOAT16, "int8": DataType.INT8, "int16": DataType.INT16,
    "int32": DataType.INT32, "int64": DataType.INT64, "uint8": DataType.UINT8,
    "uint16": DataType.UINT16, "uint32": DataType.UINT32, "uint64": DataType.UINT64,
    "bool": DataType.BOOL, "complex64": DataType.COMPLEX64, "complex128": DataType.COMPLEX128,
    "float8_e4m3fn": DataType.FLOAT8E4M3FN, "float8_e4m3fnuz": DataType.FLOAT8E4M3FNUZ,
    "float8_e5m2": DataType.FLOAT8E5M2, "float8_e5m2fnuz": DataType.FLOAT8E5M2FNUZ,
}
ONNX_TO_TORCH_DTYPE = {v: k for k, v in TORCH_TO_ONNX_DTYPE.items()}


class UnloweredOpError(ValueError):
    """A model still holds ``aten`` ops, so it cannot be written as ONNX.

    Attributes:
        ops: one ``(op_type, torch module path, node name, reason)`` per unlowered node.
    """

    def __init__(self, ops: list[tuple[str, str, str, str]]):
        self.ops = ops
        lines = []
        for op_type, module, name, reason in ops:
            where = f"module '{module}'" if module else "the top-level module"
            why = f" — {reason}" if reason else " — no lowering rule for this op"
            lines.append(f"  - aten::{op_type} (node {name!r}, in {where}){why}")
        kinds = sorted({o[0] for o in ops})
        super().__init__(
            f"cannot write ONNX: {len(ops)} node(s) of {len(kinds)} ATen op(s) have no ONNX lowering "
            f"({', '.join(kinds)}):\n" + "\n".join(lines) +
            "\nWhat to do: compile with target='torch' (the torch backend runs ATen ops as they are), "
            "rewrite those modules with ops graft lowers, or add a lowering rule (see rules/lower_aten_*.py).")


def unlowered_ops(model: Model) -> list[tuple[str, str, str, str]]:
    """``(op_type, torch module path, node name, why not lowered)`` for every ``aten`` node."""
    out = []
    for n in model.all_nodes():
        if n.domain == ATEN_DOMAIN:
            out.append((n.op_type, str(n.meta.get("torch.module", "")), n.name,
                        str(n.meta.get("graft.lowering_refused", ""))))
    return out


def check_lowered(model: Model) -> None:
    """Raise :class:`UnloweredOpError` if any ``aten`` node is left (the ONNX backend's precondition)."""
    ops = unlowered_ops(model)
    if ops:
        raise UnloweredOpError(ops)


# --------------------------------------------------------------------------- schemas (need torch)
def overload(op_type: str):
    """The ``torch._ops.OpOverload`` for an IR op_type (``"convolution.default"``).

    Raises:
        ValueError: no such ATen op in this torch build.
    """
    return _overload(op_type)


@functools.lru_cache(maxsize=None)
def _overload(op_type: str):
    import torch

    ns, _, rest = op_type.rpartition("::")
    name, _, ov = rest.rpartition(".")
    try:
        packet = getattr(getattr(torch.ops, ns or "aten"), name)
        return getattr(packet, ov)
    except (AttributeError, RuntimeError):
        raise ValueError(f"{op_type!r} is not an ATen op overload known to torch {torch.__version__}") from None


def op_type_of(target) -> str:
    """IR op_type of an ``OpOverload``: ``"add.Tensor"`` for aten, ``"ns::name.overload"`` otherwise."""
    name = f"{target._opname}.{target._overloadname}"
    return name if target.namespace == "aten" else f"{target.namespace}::{name}"


# kinds of schema arguments
TENSOR, TENSOR_LIST, OTHER = "tensor", "tensor_list", "other"


@functools.lru_cache(maxsize=None)
def arg_layout(op_type: str) -> tuple[tuple[str, str, str, Any, bool], ...]:
    """Per schema argument: ``(name, kind, type string, default, has_default)``.

    (:func:`kwarg_only` says which arguments are keyword-only.)

    ``kind`` is :data:`TENSOR`, :data:`TENSOR_LIST` or :data:`OTHER`; the type string
    is the schema's real type (``"ScalarType"``, ``"List[int]"``, ``"Optional[Tensor]"``).
    """
    import torch

    out = []
    for a in overload(op_type)._schema.arguments:
        t = a.type
        if isinstance(t, torch.OptionalType):
            t = t.getElementType()
        if isinstance(t, torch.TensorType):
            kind = TENSOR
        elif isinstance(t, torch.ListType) and isinstance(_unopt(t.getElementType()), torch.TensorType):
            kind = TENSOR_LIST
        else:
            kind = OTHER
        real = str(getattr(a, "real_type", a.type))
        has_default = a.has_default_value()
        out.append((a.name, kind, real, a.default_value if has_default else None, has_default))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def kwarg_only(op_type: str) -> frozenset[str]:
    """Names of the schema's keyword-only arguments."""
    return frozenset(a.name for a in overload(op_type)._schema.arguments if a.kwarg_only)


def _unopt(t):
    import torch

    return t.getElementType() if isinstance(t, torch.OptionalType) else t


def returns_list(op_type: str) -> bool:
    """True when the op returns ``Tensor[]`` (split, chunk, unbind) rather than a fixed tuple."""
    import torch

    rets = overload(op_type)._schema.returns
    return len(rets) == 1 and isinstance(rets[0].type, torch.ListType)


def aten_args(node: Node) -> dict[str, Any]:
    """The node's arguments by schema name: Values for tensors (None when absent),
    lists of Values for ``Tensor[]``, Python values for attributes, and Values for
    ``_dynamic`` (run-time) scalars and int lists.

    Raises:
        ValueError: the node's inputs do not fit its schema.
    """
    layout = arg_layout(node.op_type)
    dynamic = set(node.attrs.get(DYNAMIC_ATTR, ()))
    ins = list(node.inputs)
    fixed = sum(1 for name, kind, *_ in layout
                if (kind == TENSOR and name not in node.attrs) or (kind == OTHER and name in dynamic))
    sizes = list(node.attrs.get(LIST_SIZES_ATTR, ()))
    n_list = len(ins) - fixed
    out: dict[str, Any] = {}
    k = 0
    for name, kind, _real, default, has_default in layout:
        if kind == TENSOR_LIST and sizes:
            n_list = sizes.pop(0)
        if kind == TENSOR:
            if name in node.attrs:
                out[name] = node.attrs[name]
            else:
                out[name] = ins[k] if k < len(ins) else None
                k += 1
        elif kind == TENSOR_LIST:
            out[name] = ins[k:k + n_list]
            k += n_list
        elif name in dynamic:
            out[name] = ins[k]
            k += 1
        elif name in node.attrs:
            out[name] = node.attrs[name]
        else:
            out[name] = None
    if k != len(ins):
        raise ValueError(f"aten node {node.name!r} ({node.op_type}) has {len(ins)} inputs, its schema "
                         f"layout reads {k}")
    return out


def is_dynamic(value) -> bool:
    """True for an argument that is an IR Value (known only at run time)."""
    return isinstance(value, Value)
