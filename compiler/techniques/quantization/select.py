"""The analyses before quantization rules run: which nodes, which tensors, which ranges to share.

- :func:`resolve_exclusions`: node names from an exclusion list of names, op types, name globs
  (``fnmatch``) and graft patterns (``op.Softmax(op.MatMul(...))``: every node of a match).
- :func:`static_plan`: for static QDQ, the nodes to quantize and the tensors to calibrate:
  activation inputs and outputs of the quantized ops. A Conv/Gemm/MatMul/Add whose only
  reader is a Relu (or Clip(0, c)) has the Relu's output quantized instead, and
  ``fold_relu_into_quantize`` then drops the Relu (uint8 asymmetric only). Tensors reached
  from a quantized tensor through data-movement ops are not calibrated again: the
  propagation rules carry the DequantizeLinear through them.
- :func:`concat_groups`: tensors that must share one scale so that Concat can run on 8-bit data.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable

from graft import ir
from graft.rules.quantize_context import node_key
from graft.rules.quantize_params import QuantizationError

# ops whose quantized form onnxruntime fuses (QDQ node units), by role
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
BINARY_OPS = ("Add", "Mul")
POOL_OPS = ("GlobalAveragePool", "AveragePool")
DATA_MOVEMENT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "MaxPool")
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
DEFAULT_STATIC_OPS = (*WEIGHT_OPS, *BINARY_OPS, *POOL_OPS)


def _is_activation(v) -> bool:
    return v is not None and v.constant() is None and v.dtype in FLOAT_TYPES


def _is_weight(v) -> bool:
    c = None if v is None else v.constant()
    return c is not None and c.dtype.kind == "f"


def resolve_exclusions(model: ir.Model, exclude: Iterable | None) -> set[str]:
    """Node keys (:func:`~graft.rules.quantize_context.node_key`) matched by ``exclude``: node names,
    output names, op types, name globs, or graft pattern objects.

    Raises:
        QuantizationError: an entry that matches no node (a typo would silently quantize everything).
    """
    if not exclude:
        return set()
    if isinstance(exclude, str):
        exclude = [e.strip() for e in exclude.split(",") if e.strip()]
    nodes = list(model.graph)
    out: set[str] = set()
    for e in exclude:
        if isinstance(e, str):
            hit = {node_key(n) for n in nodes
                   if n.op_type == e or any(name == e or fnmatch.fnmatchcase(name, e)
                                            for name in (n.name, node_key(n), *(o.name for o in n.outputs)) if name)}
        else:
            hit = _pattern_nodes(model, e)
        if not hit:
            raise QuantizationError(f"exclude entry {e!r} matches no node (give node names, output names, op types "
                                    f"such as 'Softmax', name globs such as '*/attention/*', or a graft pattern)")
        out |= hit
    return out


def _pattern_nodes(model: ir.Model, pattern) -> set[str]:
    from graft.compiler.engine.match import Matcher
    from graft.compiler.engine.pattern import PatternError, pattern_roots

    try:
        roots = pattern_roots(pattern)
    except PatternError as e:
        raise QuantizationError(f"exclude entry {pattern!r} is neither a string nor a pattern: {e}") from None
    out = set()
    for node in model.graph:
        r0 = roots[0]
        if not r0.is_wildcard and (node.op_type, node.domain) != (r0.op_type, r0.domain):
            continue
        b = Matcher(roots, model.opset).match(node)
        if b is not None:
            out.update(node_key(n) for n in b["__nodes__"])
    return out


@dataclass
class StaticPlan:
    """Nodes to quantize and tensors to calibrate for static QDQ.

    Attributes:
        nodes: names of the nodes quantized.
        tensors: activation names that get Q → DQ (calibrated).
        skipped: node name → why it stays float.
        concat_groups: lists of tensor names that must share one range.
    """

    nodes: set[str] = field(default_factory=set)
    tensors: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)
    concat_groups: list[list[str]] = field(default_factory=list)


def _sole_reader(v):
    users = v.users()
    if len(users) == 1 and not v.is_graph_output():
        return users[0]
    return None


def _is_relu_like(node) -> bool:
    if node.op_type == "Relu":
        return True
    if node.op_type == "Clip":
        lo = node.inputs[1] if len(node.inputs) > 1 else None
        lo_v = lo.constant() if lo is not None else node.attrs.get("min")
        return lo_v is not None and float(lo_v) == 0.0
    return False


def static_plan(model: ir.Model, excluded: set[str], op_types: Iterable[str] = DEFAULT_STATIC_OPS,
                asymmetric: bool = True, activation_matmul: bool = True) -> StaticPlan:
    """Choose the nodes and tensors for static QDQ (see module docstring).

    Args:
        model: shapes/dtypes inferred.
        excluded: node names to leave in float.
        op_types: op types to quantize.
        asymmetric: uint8 asymmetric activations (Relu folding is exact only then).
        activation_matmul: quantize MatMuls whose both inputs are activations (attention).
    """
    plan = StaticPlan()
    ops = set(op_types)
    for node in model.graph:
        if node.op_type not in ops or node.domain != "":
            continue
        key = node_key(node)
        if key in excluded:
            plan.skipped[key] = "excluded"
            continue
        ins = [v for v in node.inputs if v is not None]
        if not node.outputs or node.outputs[0].dtype not in FLOAT_TYPES:
            plan.skipped[key] = "output is not float"
            continue
        acts = [v for v in ins if _is_activation(v)]
        if node.op_type in WEIGHT_OPS:
            if len(ins) < 2 or not _is_activation(ins[0]):
                plan.skipped[key] = "first input is not a float activation"
                continue
            if node.op_type == "Gemm" and node.attrs.get("transA", 0):
                plan.skipped[key] = "Gemm with transA=1"
                continue
            if _is_weight(ins[1]):
                w = ins[1].constant()
                if (node.op_type == "Conv" and w.ndim < 3) or (node.op_type != "Conv" and w.ndim != 2):
                    plan.skipped[key] = f"weight of rank {w.ndim}"
                    continue
                acts = [ins[0]]
            elif node.op_type == "MatMul" and activation_matmul and len(acts) == 2:
                pass
            else:
                plan.skipped[key] = "weight is not a constant"
                continue
        elif node.op_type in BINARY_OPS:
            if len(acts) != 2:
                plan.skipped[key] = "not two float activations"
                continue
        elif node.op_type in POOL_OPS:
            if len(acts) != 1:
                continue
        plan.nodes.add(key)
        plan.tensors.update(v.name for v in acts)
        out = node.outputs[0]
        reader = _sole_reader(out)
        if asymmetric and reader is not None and _is_relu_like(reader) and node_key(reader) not in excluded:
            plan.tensors.add(reader.outputs[0].name)
        else:
            plan.tensors.add(out.name)
    _drop_propagated(model, plan)
    return plan


def _drop_propagated(model: ir.Model, plan: StaticPlan) -> None:
    """Tensors reachable from a quantized tensor through data-movement ops keep that tensor's
    DequantizeLinear (propagation rules), so they are not calibrated on their own."""
    root: dict[str, str] = {t: t for t in plan.tensors}
    carried: dict[str, str] = {}
    for node in model.graph:
        if not node.inputs or node.inputs[0] is None or not node.outputs:
            continue
        src = node.inputs[0].name
        src_root = carried.get(src, src if src in plan.tensors else None)
        if node.op_type in DATA_MOVEMENT and node.domain == "" and src_root is not None:
            if node.op_type == "MaxPool" and model.opset < 12:
                continue
            out = node.outputs[0].name
            carried[out] = src_root
            plan.tensors.discard(out)
        elif node.op_type == "Concat" and node.domain == "":
            roots = []
            for v in node.inputs:
                r = carried.get(v.name, v.name if v.name in plan.tensors else None) if v is not None else None
                roots.append(r)
            if roots and all(r is not None for r in roots):
                out = node.outputs[0].name
                group = sorted(set(roots))
                if out in plan.tensors:
                    group.append(out)
                    plan.tensors.discard(out)
                carried[out] = group[0]
                plan.concat_groups.append(group)
    del root


def equalize_concat_ranges(table, groups: list[list[str]]) -> None:
    """Give every tensor of each Concat group the union of the group's ranges (merging groups that
    share a tensor), so Concat's inputs and output use one scale."""
    parent: dict[str, str] = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for g in groups:
        for t in g[1:]:
            parent[find(t)] = find(g[0])
    members: dict[str, list[str]] = {}
    for t in parent:
        members.setdefault(find(t), []).append(t)
    for ts in members.values():
        ts = [t for t in ts if t in table]
        if len(ts) < 2:
            continue
        ranges = [table.range(t) for t in ts]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        for t in ts:
            table.set_range(t, lo, hi)
