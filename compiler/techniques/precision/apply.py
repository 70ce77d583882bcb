"""Applying a plan: a converted copy of the model, then the finishing touches.

:func:`apply_plan` copies the float32 model, writes each kept node's reason into its metadata,
stores the :class:`~graft.rules.precision.PrecisionPlan` and runs the precision rules to a fixed
point (:mod:`graft.rules.precision`), then dead-code elimination. Afterwards converted nodes,
values and constants take back their original names where nothing else holds them (so the
converted model reads like the input), and without ``keep_io_types`` the main graph's float32
inputs and outputs take the target type (the boundary Casts at the interface go away).
"""
from __future__ import annotations

from graft import ir
from graft.ir.dtypes import DataType
from graft.rules.precision import (BOUNDARY, ORIGINAL_NAME, PLAN_KEY, PRECISION_META, SHORT_NAMES, node_key,
                                   store)
from graft.compiler.techniques.precision.analysis import Analysis


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_onnx(ir.to_onnx(model))


def constant_bytes(model: ir.Model) -> int:
    """Bytes of constant data: initializers and Constant-node tensors, subgraphs included."""
    n = 0
    for g in model.all_graphs():
        n += sum(v.const.nbytes for v in g.initializers.values())
        for node in g:
            t = node.attrs.get("value") if node.op_type == "Constant" and node.domain == "" else None
            if isinstance(t, ir.Tensor):
                n += t.nbytes
    return n


def apply_plan(model: ir.Model, an: Analysis, keep_io_types: bool) -> tuple[ir.Model, dict]:
    """A converted copy of ``model``: kept nodes annotated, the precision rules run to a fixed point,
    dead code removed, names restored, IO retyped when ``keep_io_types`` is false."""
    from graft.compiler.engine import RewritePass, RuleSet
    from graft.rules import precision as rules
    from graft.rules.dead_code import eliminate_dead_code

    low = _copy(model)
    by_key = {node_key(n): n for n in low.all_nodes()}
    for d in an.kept:
        n = by_key.get(d.node)
        if n is not None:
            n.meta[PRECISION_META] = f"float32: {d.reason}"
    store(low, an.plan)
    res = RewritePass(RuleSet(rules.rules(), name="precision"), "precision")(low)
    eliminate_dead_code(low)
    low.meta.pop(PLAN_KEY, None)
    _restore_names(low)
    if not keep_io_types:
        _retype_io(low, an.plan.target)
    return low, dict(res.stats.counts)


def _restore_names(model: ir.Model) -> None:
    """Converted nodes, values and constants take back their original names where nothing else holds them."""
    node_names, value_names = set(), set()
    for g in model.all_graphs():
        value_names.update(v.name for v in g.inputs)
        value_names.update(g.initializers)
        for n in g:
            node_names.add(n.name)
            value_names.update(o.name for o in n.outputs)
    for g in model.all_graphs():
        for n in g:
            orig = n.meta.pop(ORIGINAL_NAME, None)
            if orig and orig != n.name and orig not in node_names:
                node_names.discard(n.name)
                n.name = orig
                node_names.add(orig)
            for o in n.outputs:
                orig = o.meta.pop(ORIGINAL_NAME, None)
                if orig and orig != o.name and orig not in value_names and not o.is_graph_output():
                    value_names.discard(o.name)
                    o.name = orig
                    value_names.add(orig)
        for name, v in list(g.initializers.items()):
            orig = v.meta.pop(ORIGINAL_NAME, None)
            if orig and orig != name and orig not in value_names:
                del g.initializers[name]
                v.name = orig
                g.initializers[orig] = v
                value_names.discard(name)
                value_names.add(orig)


def _retype_io(model: ir.Model, target: DataType) -> None:
    """Main-graph float32 inputs and outputs in ``target``: boundary Casts at the interface go."""
    g = model.graph
    for v in g.inputs:
        if v.dtype != DataType.FLOAT or v.const is not None:
            continue
        v.dtype = target
        fp32_readers = []
        for n, i in v.uses():
            if n.op_type == "Cast" and n.domain == "" and n.attrs.get("to") == int(target) and n.graph is g:
                n.outputs[0].replace_all_uses_with(v)
                g.remove(n)
            else:
                fp32_readers.append((n, i))
        if fp32_readers:
            out = ir.Value(g.unique_name(v.name + "_fp32"), DataType.FLOAT, v.shape)
            cast = ir.Node("Cast", [v], [out], {"to": int(DataType.FLOAT)}, name=g.unique_name(v.name + "_to_fp32"))
            cast.meta[PRECISION_META] = BOUNDARY
            first = min((n for n, _ in fp32_readers if n.graph is g), key=lambda n: n._order, default=None)
            if first is None:
                g.insert_before(g.nodes[0], cast) if len(g) else g.append(cast)
            else:
                g.insert_before(first, cast)
            for n, i in fp32_readers:
                n.set_input(i, out)
    for o in list(g.outputs):
        if o.dtype != DataType.FLOAT:
            continue
        p = o.producer
        if p is not None and p.op_type == "Cast" and p.meta.get(PRECISION_META) == BOUNDARY and \
                p.inputs[0] is not None and p.inputs[0].dtype == target:
            src = p.inputs[0]
            g.replace_output(o, src)
            if not p.outputs[0].num_uses and not p.outputs[0].is_graph_output():
                g.remove(p)
        else:
            out = ir.Value(g.unique_name(o.name + "_" + SHORT_NAMES[target]), target, o.shape)
            cast = ir.Node("Cast", [o], [out], {"to": int(target)}, name=g.unique_name(o.name + "_to_" +
                                                                                       SHORT_NAMES[target]))
            cast.meta[PRECISION_META] = BOUNDARY
            g.append(cast)
            g.replace_output(o, out)


