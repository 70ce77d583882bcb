"""Mixed-precision rules: run float32 nodes in float16 or bfloat16, with Casts only at precision boundaries.

The precision technique (:mod:`graft.compiler.techniques.precision`) decides, per node, whether it
runs in the lower type (the op's ONNX schema must allow the type, measured ranges must fit it,
...) and stores a :class:`PrecisionPlan` in ``model.meta["graft.precision_plan"]``; these rules
read it (:func:`plan_of`). Every node the plan keeps in float32 carries the reason in
``node.meta["graft.precision"]`` (exported as ONNX ``metadata_props``), which the rule's check
returns, so ``graft explain convert_precision model.onnx`` shows why a node was not converted.

- convert_precision: a planned node is rebuilt with its float32 inputs and outputs in the target
  type ``T`` (IEEE 754 binary16, or bfloat16). A float32 constant input becomes a new constant of
  type ``T`` (rounded to nearest even, as ``Cast`` does; a constant shared by several converted
  nodes is converted once); a float32 runtime input is read through ``Cast(x, to=T)``; each
  converted output is handed to its readers as ``Cast(y, to=FLOAT)``, so the rewrite keeps every
  type around it. Cast/ConstantOfShape/Random* nodes, whose output type is an attribute, get the
  attribute changed instead (``Cast(x, to=FLOAT)`` → ``Cast(x, to=T)``).
- fold_cast_pair: ``Cast(Cast(x, to=W), to=T)`` where the inner Cast is exact (W holds every value
  of x's type: float16/bfloat16 → float/double, float → double) equals ``x`` when x already has
  type T, else ``Cast(x, to=T)`` (one rounding instead of two identical ones: ONNX Cast-13..24
  rounds to nearest even, and the exact inner cast adds none). So the ``Cast(to=FLOAT)`` a
  converted producer hands on and the ``Cast(to=T)`` its converted reader asks for cancel, and
  a Cast is left only where the precision really changes. The reverse pair (float → float16 →
  float) rounds and is never removed.

A constant outside the target type's finite range is converted only when the plan lists it in
``saturate`` (the technique measured that saturating it to the type's largest finite value leaves
the float32 outputs unchanged, e.g. a ``-3.4e38`` attention mask); it becomes ``±max`` (float16:
``±65504``), never a silent ``inf`` or a smaller clamp. A constant that would overflow otherwise
is an internal error (:class:`PrecisionError`), since the plan keeps its readers in float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graft.compiler.engine import Rule, Var, op
from graft.ir import Model, Node, Tensor, Value
from graft.ir.dtypes import DataType
from graft.rules.cleanup import remove_noop_cast

PLAN_KEY = "graft.precision_plan"
PRECISION_META = "graft.precision"  # node metadata: "float16", or "float32: <why it was kept>"
BOUNDARY = "boundary cast"          # PRECISION_META of the Casts the conversion inserts
ORIGINAL_NAME = "_graft.precision_name"  # name a node/value/initializer had before conversion (not exported)
KEY_META = "_graft.precision_key"        # node_key of the node a converted node replaced (not exported)

TYPE_NAMES = {DataType.FLOAT16: "float16", DataType.BFLOAT16: "bfloat16", DataType.FLOAT: "float32"}
SHORT_NAMES = {DataType.FLOAT16: "fp16", DataType.BFLOAT16: "bf16", DataType.FLOAT: "fp32"}

# (source type, wider type): a Cast from the first to the second is exact.
_EXACT_WIDENING = {(DataType.FLOAT16, DataType.FLOAT), (DataType.FLOAT16, DataType.DOUBLE),
                   (DataType.BFLOAT16, DataType.FLOAT), (DataType.BFLOAT16, DataType.DOUBLE),
                   (DataType.FLOAT, DataType.DOUBLE)}


class PrecisionError(RuntimeError):
    """A precision conversion that cannot be done as asked (names the ops, nodes or tensors and what to do)."""


@dataclass(frozen=True)
class TypeLimits:
    """Limits of a floating-point type (from ``ml_dtypes.finfo``).

    Attributes:
        max: largest finite value (float16: 65504; bfloat16: 3.39e38).
        tiny: smallest positive normal value (float16: 6.1e-5; bfloat16: 1.18e-38).
        smallest_subnormal: smallest positive subnormal value (float16: 5.96e-8).
        eps: unit roundoff ``2**-p`` (float16: 2**-11; bfloat16: 2**-8).
    """

    max: float
    tiny: float
    smallest_subnormal: float
    eps: float


def limits(dtype: DataType) -> TypeLimits:
    """:class:`TypeLimits` of float16, bfloat16 or float32."""
    import ml_dtypes

    fi = ml_dtypes.finfo(dtype.to_numpy())
    return TypeLimits(float(fi.max), float(fi.tiny), float(fi.smallest_subnormal), float(fi.eps) / 2)


@dataclass
class NodeConversion:
    """How one node is rebuilt.

    Attributes:
        inputs: per input, whether it moves to the target type (a float32 tensor bound to a type
            parameter the schema allows in the target type).
        outputs: per output, whether it is produced in the target type.
        attrs: attribute overrides (``to`` of a Cast, ``value`` of ConstantOfShape, ``dtype``).
    """

    inputs: tuple[bool, ...]
    outputs: tuple[bool, ...]
    attrs: dict = field(default_factory=dict)


@dataclass
class PrecisionPlan:
    """What the precision rules do.

    Attributes:
        target: ``DataType.FLOAT16`` or ``DataType.BFLOAT16``.
        convert: node key (:func:`node_key`) → :class:`NodeConversion`, for the nodes that move
            to ``target``.
        saturate: names of float32 constants whose out-of-range values become ``±max`` of ``target``.
        converted: (constant value, target) → its converted Value, so a shared constant is
            converted once; ("cast", value, graph, target) → the boundary Cast made for it in that graph,
            so several converted readers of one float32 value share one Cast.
    """

    target: DataType
    convert: dict[str, NodeConversion] = field(default_factory=dict)
    saturate: set[str] = field(default_factory=set)
    converted: dict = field(default_factory=dict)

    def conversion(self, node: Node) -> NodeConversion | None:
        return self.convert.get(node_key(node))


def node_key(node: Node) -> str:
    """A node's name, or for an unnamed node its first output's name (unique in a model)."""
    return node.name or (node.outputs[0].name if node.outputs else "")


def store(model: Model, plan: PrecisionPlan) -> None:
    model.meta[PLAN_KEY] = plan


def plan_of(model: Model | None) -> PrecisionPlan | None:
    return None if model is None else model.meta.get(PLAN_KEY)


def to_type(arr: np.ndarray, target: DataType, *, saturate: bool = False, name: str = "constant") -> np.ndarray:
    """``arr`` (float32/float64) in ``target``, rounded to nearest even as ONNX Cast does.

    Finite values beyond the target's range become ``±max`` when ``saturate``; ``±inf`` and NaN
    stay as they are.

    Raises:
        PrecisionError: a finite value beyond the range and ``saturate`` is false.
    """
    arr = np.asarray(arr)
    lim = limits(target).max
    finite = np.isfinite(arr)
    over = finite & (np.abs(arr) > lim)
    if over.any():
        if not saturate:
            worst = float(np.abs(arr[over]).max())
            raise PrecisionError(f"constant {name!r} holds {worst:.3g}, beyond the {TYPE_NAMES[target]} range "
                                 f"(±{lim:.6g}); its readers must stay float32")
        arr = np.where(over, np.sign(arr) * lim, arr)
    out = arr.astype(target.to_numpy())
    # a finite value just under the limit may still round up to inf (float16: |x| >= 65520)
    if saturate:
        bad = np.isinf(out.astype(np.float32)) & finite
        if bad.any():
            out = np.where(bad, np.sign(arr) * lim, out.astype(np.float32)).astype(target.to_numpy())
    return out


# --------------------------------------------------------------------------- convert_precision
def _model(node: Node) -> Model | None:
    return node.graph.model if node.graph is not None else None


def _convert_check(m):
    node = m.node
    plan = plan_of(_model(node))
    have = node.meta.get(PRECISION_META)
    key = node_key(node)
    if have == BOUNDARY:
        return m.fail(f"Cast node {key!r} is a precision boundary the conversion inserted", node)
    if have is not None and have.startswith("float32"):
        return m.fail(f"{node.op_type} node {key!r} kept in {have}", node)  # the analysis' reason
    if have is not None:
        return m.fail(f"{node.op_type} node {key!r} already runs in {have}", node)
    if plan is None:
        return m.fail("no precision plan for this model (compile with precision='fp16' or 'bf16')", node)
    if plan.conversion(node) is None:
        return m.fail(f"{node.op_type} node {key!r} is not in the precision plan (no float32 tensor to convert)", node)
    return None


def _converted_constant(op, plan: PrecisionPlan, v: Value) -> Value:
    key = (id(v), plan.target)
    done = plan.converted.get(key)
    if done is not None and done[0] is v and done[1].graph is not None and done[1].name in done[1].graph.initializers:
        return done[1]
    arr = to_type(v.constant(), plan.target, saturate=v.name in plan.saturate, name=v.name)
    new = op.const(arr, dtype=plan.target, name=f"{v.name}_{SHORT_NAMES[plan.target]}", copy=False)
    new.meta[ORIGINAL_NAME] = v.name
    plan.converted[key] = (v, new)  # v kept alive with its entry, so its id cannot be reused
    return new


def _boundary_cast(op, plan: PrecisionPlan, v: Value, graph, made: dict) -> Value:
    """``Cast(v, to=target)``: the one already made for an earlier reader in this graph, else a new one.

    Planned nodes are converted in graph order, so a Cast made for an earlier reader stands before
    every later reader of the same graph.
    """
    key = ("cast", id(v), id(graph), plan.target)
    done = plan.converted.get(key)
    if done is not None and done[0] is v and done[1].producer is not None and done[1].producer.graph is graph:
        made[v] = done[1]
        return done[1]
    c = _typed(op.Cast(v, to=int(plan.target)), plan.target, v.shape)
    c.producer.meta[PRECISION_META] = BOUNDARY
    plan.converted[key] = (v, c)
    made[v] = c
    return c


def _typed(v: Value, dtype: DataType, shape) -> Value:
    v.dtype, v.shape = dtype, shape
    return v


def _attr_overrides(node: Node, conv: NodeConversion, target: DataType) -> dict:
    attrs = dict(node.attrs)
    for k, val in conv.attrs.items():
        if k == "value" and isinstance(val, np.ndarray):
            val = Tensor(to_type(val, target), dtype=target)
        attrs[k] = val
    return attrs


def _convert_replacement(op, m):
    """Rebuild the node with its planned inputs and outputs in float16/bfloat16; Casts at the boundary."""
    node = m.node
    plan = plan_of(_model(node))
    conv = plan.conversion(node)
    t = plan.target
    ins, made = [], {}
    for i, v in enumerate(node.inputs):
        if v is None or i >= len(conv.inputs) or not conv.inputs[i] or v.dtype == t:
            ins.append(v)
        elif v.constant() is not None:
            ins.append(_converted_constant(op, plan, v))
        else:
            ins.append(made.get(v) or _boundary_cast(op, plan, v, node.graph, made))
    builder = op.domain(node.domain) if node.domain else op
    outs = getattr(builder, node.op_type)(*ins, _outputs=len(node.outputs), _name=node.name or node.op_type,
                                          **_attr_overrides(node, conv, t))
    outs = outs if isinstance(outs, tuple) else (outs,)
    new = outs[0].producer
    new.attr_types = dict(node.attr_types)
    for k in ("_ref_attrs",):
        if k in node.meta:
            new.meta[k] = node.meta[k]
    new.doc_string, new.overload = node.doc_string, node.overload
    new.meta[PRECISION_META] = TYPE_NAMES[t]
    new.meta[ORIGINAL_NAME] = node.name
    new.meta[KEY_META] = node_key(node)
    result = []
    for old, v, low in zip(node.outputs, outs, conv.outputs):
        if not low:
            result.append(_typed(v, old.dtype, old.shape))
            continue
        _typed(v, t, old.shape)
        v.meta[ORIGINAL_NAME] = old.name
        if not old.num_uses and not old.is_graph_output():
            result.append(v)  # nothing reads it: no Cast back
            continue
        up = _typed(op.Cast(v, to=int(DataType.FLOAT)), DataType.FLOAT, old.shape)
        up.producer.meta[PRECISION_META] = BOUNDARY
        result.append(up)
    return tuple(result) if len(result) > 1 else result[0]


def _may_convert(node: Node) -> bool:
    """True for a node of a model with a precision plan, or one a precision pass already decided on.

    The pattern matches any op, so this runs at every node of every pass: two dict reads, and
    the check then says why (kept in float32 and the reason, or not in the plan)."""
    return PRECISION_META in node.meta or plan_of(_model(node)) is not None


convert_precision = Rule("convert_precision", op.any_op(name="node", where=_may_convert), _convert_replacement,
                         check=_convert_check,
                         doc="Run a planned float32 node in float16/bfloat16, Casts only at precision boundaries")


# --------------------------------------------------------------------------- fold_cast_pair
def _exact_cast_output(v: Value) -> bool:
    """``v`` is the output of a Cast that represents its input exactly (a widening float Cast)."""
    p = v.producer
    if p is None or p.op_type != "Cast" or p.domain != "" or p.inputs[0] is None:
        return False
    src = p.inputs[0].dtype
    to = p.attrs.get("to")
    return src is not None and to is not None and (src, DataType(to)) in _EXACT_WIDENING


widened = Var("widened", where=_exact_cast_output)


def _fold_replacement(op, m):
    """Cast(Cast(x, to=W), to=T) -> x when x has type T, else Cast(x, to=T); the inner Cast is exact."""
    inner = m.value(widened).producer
    x = inner.inputs[0]
    to = DataType(m.cast.attrs["to"])
    if x.dtype == to:
        return x
    c = op.Cast(x, to=int(to))
    c.dtype, c.shape = to, m.cast.outputs[0].shape
    if PRECISION_META in m.cast.meta:
        c.producer.meta[PRECISION_META] = m.cast.meta[PRECISION_META]
    return c


fold_cast_pair = Rule("fold_cast_pair", op.Cast(widened, name="cast"), _fold_replacement)

RULES = [convert_precision, fold_cast_pair]


def rules() -> list[Rule]:
    """The precision rule set: conversion, Cast-pair folding and no-op Cast removal, run together to a
    fixed point so every Cast pair a conversion creates cancels as soon as both sides are converted."""
    return [convert_precision, fold_cast_pair, remove_noop_cast]
