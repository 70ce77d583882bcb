"""Which float32 inputs and outputs of a node may move to float16/bfloat16, read from its ONNX schema.

The schema decides, not a list kept by hand: ``onnx.defs.get_schema(op, opset, domain)`` gives
the op's formal inputs and outputs and, per type parameter (``T``, ``T1``, ...), the allowed
types. A node's float32 tensors bound to a type parameter move together (a parameter binds one
type per node); the node can be converted when every such parameter allows the target type.
Slots with a fixed type (Resize's ``scales`` is ``tensor(float)``) keep it.

Three kinds of node come out (:class:`Support`):

- ``convert``: a compute node the schema allows in the target type;
- ``follow``: a node that computes no float values of its own: its float parameters also take
  ``tensor(string)``/``tensor(bool)`` (Reshape, Transpose, Gather, Concat, Where, Shape, Resize
  ...) or it produces no float output (IsNaN, Equal). It takes the type of its float input, so
  it never costs a Cast of its own;
- ``keep``: stays float32, with the reason (``op not supported in fp16``, control flow, no schema,
  an output type set by an attribute graft cannot change), and, when a later opset of the op
  allows the type, that opset (``needs_opset``).

Nodes without float32 tensors come out as None: they are not float ops.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import onnx.defs

from graft import ir
from graft.ir.dtypes import DataType
from graft.rules.precision import SHORT_NAMES, NodeConversion

_TYPE_STR = {DataType.FLOAT16: "tensor(float16)", DataType.BFLOAT16: "tensor(bfloat16)"}
_NON_NUMERIC = ("tensor(string)", "tensor(bool)")
# attribute names that set an output's element type (ONNX TensorProto.DataType codes)
_DTYPE_ATTRS = ("dtype",)


@dataclass
class Support:
    """The schema's answer for one node.

    Attributes:
        kind: ``"convert"``, ``"follow"`` or ``"keep"``.
        conversion: which inputs/outputs move (``convert`` and ``follow``).
        reason: why it is kept (``keep``).
        needs_opset: the first opset of the op's domain whose schema allows the target type, when
            the model's opset does not (``keep``), else None.
        float_inputs: indices of inputs bound to a converted type parameter.
    """

    kind: str
    conversion: NodeConversion | None = None
    reason: str = ""
    needs_opset: int | None = None
    float_inputs: tuple[int, ...] = field(default_factory=tuple)


@functools.cache
def _history() -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    for s in onnx.defs.get_all_schemas_with_history():
        out.setdefault((s.domain, s.name), []).append(s)
    for v in out.values():
        v.sort(key=lambda s: s.since_version)
    return out


@functools.cache
def schema(op_type: str, domain: str, opset: int):
    """The schema in force at ``opset`` (greatest since_version <= opset), or None when ONNX has none."""
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def domain_opset(model: ir.Model, domain: str) -> int:
    if domain in ("", "ai.onnx"):
        return model.opset
    return model.opset_imports.get(domain, 1)


def _bind(node: ir.Node, sch) -> tuple[dict[str, list[tuple[str, int]]], bool]:
    """Type parameter → [("in"/"out", index)] of the node's present tensors; and whether every slot
    found a formal parameter (False for more inputs/outputs than the schema has)."""
    params: dict[str, list[tuple[str, int]]] = {}
    ok = True
    for kind, values, formals in (("in", node.inputs, sch.inputs), ("out", node.outputs, sch.outputs)):
        for i, v in enumerate(values):
            if v is None or (kind == "out" and not v.name):
                continue
            if i < len(formals):
                f = formals[i]
            elif formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
                f = formals[-1]
            else:
                ok = False
                continue
            params.setdefault(f.type_str, []).append((kind, i))
    return params, ok


def _value(node: ir.Node, slot: tuple[str, int]) -> ir.Value:
    kind, i = slot
    return node.inputs[i] if kind == "in" else node.outputs[i]


def _float_params(node: ir.Node, sch, params) -> dict[str, list[tuple[str, int]]]:
    """The type parameters bound to float32 in this node (fixed-type slots are not parameters)."""
    constraints = {t.type_param_str for t in sch.type_constraints}
    return {p: slots for p, slots in params.items()
            if p in constraints and any(_value(node, s).dtype == DataType.FLOAT for s in slots)}


def _allowed(sch, param: str) -> list[str]:
    for t in sch.type_constraints:
        if t.type_param_str == param:
            return list(t.allowed_type_strs)
    return []


def _first_opset_allowing(node: ir.Node, target: DataType, after: int) -> int | None:
    """The first since_version > ``after`` of the op whose schema allows ``target`` for every float parameter."""
    for s in _history().get((node.domain, node.op_type), ()):
        if s.since_version <= after or s.deprecated:
            continue
        params, ok = _bind(node, s)
        fparams = _float_params(node, s, params)
        if ok and fparams and all(_TYPE_STR[target] in _allowed(s, p) for p in fparams):
            return s.since_version
    return None


def _has_float(node: ir.Node) -> bool:
    return any(v is not None and v.dtype == DataType.FLOAT for v in (*node.inputs, *node.outputs))


def _cast_support(node: ir.Node, target: DataType) -> Support | None:
    """Cast: its output type is the ``to`` attribute; its input is read as it comes."""
    if node.attrs.get("to") != int(DataType.FLOAT):
        return None  # Cast to a non-float32 type: no float32 output to convert
    return Support("convert", NodeConversion(tuple(False for _ in node.inputs), (True,), {"to": int(target)}))


def node_support(node: ir.Node, model: ir.Model, target: DataType) -> Support | None:
    """The schema's answer for ``node`` (see the module doc); None when the node has no float32 tensor."""
    if not _has_float(node):
        return None
    short = SHORT_NAMES[target]
    where = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    if any(True for _ in node.subgraphs()):
        return Support("keep", reason=f"control flow: its bodies are converted inside, its interface stays float32")
    if any(v is not None and v.type_proto is not None and not v.type_proto.HasField("tensor_type")
           for v in (*node.inputs, *node.outputs)):
        return Support("keep", reason="reads or writes a non-tensor value (sequence, optional, map)")
    if node.domain == "" and node.op_type == "Cast":
        return _cast_support(node, target)
    opset = domain_opset(model, node.domain)
    sch = schema(node.op_type, node.domain, opset)
    if sch is None:
        return Support("keep", reason=f"no ONNX schema for {where} at opset {opset} (type support unknown)")
    params, ok = _bind(node, sch)
    if not ok:
        return Support("keep", reason=f"{where}-{sch.since_version} has more inputs/outputs than its schema")
    fparams = _float_params(node, sch, params)
    if not fparams:
        return None
    bad = [p for p in fparams if _TYPE_STR[target] not in _allowed(sch, p)]
    if bad:
        allowed = ", ".join(a.removeprefix("tensor(").removesuffix(")") for a in _allowed(sch, bad[0])
                            if "float" in a or a in ("tensor(double)",))
        later = _first_opset_allowing(node, target, sch.since_version)
        hint = f"; {where}-{later} allows it" if later else ""
        return Support("keep", reason=f"op not supported in {short} ({where}-{sch.since_version} takes "
                                      f"{allowed or 'no float type'} for {bad[0]}{hint})", needs_opset=later)
    conv_in = [False] * len(node.inputs)
    conv_out = [False] * len(node.outputs)
    for slots in fparams.values():
        for kind, i in slots:
            (conv_in if kind == "in" else conv_out)[i] = True
    attrs: dict = {}
    bound_by_input = {p for p, slots in fparams.items() if any(k == "in" for k, _ in slots)}
    for p in fparams:
        if p in bound_by_input:
            continue
        # an output type no input decides: an attribute sets it
        if node.op_type in ("ConstantOfShape", "Constant") and isinstance(node.attrs.get("value"), ir.Tensor):
            attrs["value"] = node.attrs["value"].array
        elif any(a in node.attrs or a in {x for x in sch.attributes} for a in _DTYPE_ATTRS) and \
                node.attrs.get("dtype", int(DataType.FLOAT)) == int(DataType.FLOAT):
            attrs["dtype"] = int(target)
        else:
            return Support("keep", reason=f"output type set by an attribute of {where} that graft cannot change")
    conversion = NodeConversion(tuple(conv_in), tuple(conv_out), attrs)
    float_inputs = tuple(i for i, c in enumerate(conv_in) if c)
    non_numeric = all(any(a in _allowed(sch, p) for a in _NON_NUMERIC) for p in fparams)
    no_float_out = not any(conv_out)
    if (non_numeric or no_float_out) and float_inputs:
        return Support("follow", conversion, float_inputs=float_inputs)
    return Support("convert", conversion, float_inputs=float_inputs)
