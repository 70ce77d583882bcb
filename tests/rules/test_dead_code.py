"""graft.rules.dead_code.eliminate_dead_code: unused nodes and initializers, subgraphs included."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser

from graft import ir
from conftest import assert_same_outputs, parse_model, with_initializers
from graft.rules.dead_code import eliminate_dead_code

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def build(body: str, **arrays) -> onnx.ModelProto:
    if arrays:
        return with_initializers(onnx.parser.parse_model(HEADER + body), **arrays)
    return parse_model(HEADER + body)


def dce(proto: onnx.ModelProto):
    model = ir.from_onnx(proto)
    removed = eliminate_dead_code(model)
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    return out, removed, model


def all_ops(proto_graph: onnx.GraphProto) -> Counter:
    c = Counter()
    for n in proto_graph.node:
        c[n.op_type] += 1
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                c += all_ops(a.g)
    return c


def test_dead_chain_and_unused_initializers_removed():
    proto = build("""
        g (float[2, 3] x, float[3] d) => (float[2, 3] y) {
            a = Relu(x)
            b = Add(a, w)
            c = Mul(b, b)
            y = Neg(x)
        }""", w=np.ones(3, np.float32), unused=np.zeros(4, np.float32), d=np.ones(3, np.float32))
    out, removed, _ = dce(proto)
    assert removed == 3 + 2  # Relu, Add, Mul; w (now unused) and `unused`
    assert all_ops(out.graph) == Counter(Neg=1)
    # `d` is a graph input with a default: callers may override it, so it stays
    assert [t.name for t in out.graph.initializer] == ["d"]
    assert [i.name for i in out.graph.input] == ["x", "d"]
    assert_same_outputs(proto, out)


def test_live_graph_is_untouched():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y, float[2, 3] z) {
            a = Relu(x)
            y = Neg(a)
            z = Abs(a)
        }""")
    out, removed, _ = dce(proto)
    assert removed == 0 and all_ops(out.graph) == Counter(Relu=1, Neg=1, Abs=1)


IF_MODEL = """
    g (bool c, float[2, 3] x) => (float[2, 3] y) {{
        u = Neg(x)
        v = Abs(x)
        k = Relu(x)
        r = If(c) <
            then_branch = t () => (float[2, 3] ty) {{ dead = Sigmoid(u)
                                                     ty = Add(v, x) }},
            else_branch = e () => (float[2, 3] ey) {{ ey = Sub(v, x) }}
        >
        y = {result}
    }}"""


def test_dead_if_takes_its_body_and_the_values_only_it_reads():
    # If's result is unused: If, its 3 body nodes, and Neg/Abs (read only by the body) go
    proto = build(IF_MODEL.format(result="Relu(k)"))
    out, removed, _ = dce(proto)
    assert removed == 1 + 3 + 2
    assert all_ops(out.graph) == Counter(Relu=2)
    assert_same_outputs(proto, out, feeds={"c": np.array(True), "x": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_values_read_only_by_a_live_subgraph_are_kept():
    # If is live: the dead Sigmoid inside goes, then Neg (only it read u); Abs (read by live body nodes) stays
    proto = build(IF_MODEL.format(result="Add(r, k)"))
    out, removed, model = dce(proto)
    assert removed == 2
    assert all_ops(out.graph) == Counter(Abs=1, Relu=1, If=1, Add=2, Sub=1)
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    for c in (True, False):
        assert_same_outputs(proto, out, feeds={"c": np.array(c), "x": x})


def test_real_model_loses_only_the_dead_nodes(ppocr_cls_path):
    proto = onnx.load(ppocr_cls_path)
    model = ir.from_onnx(proto)
    n = len(model.graph)
    # hang a dead two-node branch off an intermediate value of the real classifier
    mid = model.graph.nodes[n // 2].outputs[0]
    a, b = ir.Value("dead_a"), ir.Value("dead_b")
    model.graph.append(ir.Node("Relu", [mid], [a]))
    model.graph.append(ir.Node("Neg", [a], [b]))
    removed = eliminate_dead_code(model)
    assert removed == 2 and len(model.graph) == n  # everything else in the exported model is live
    out = ir.to_onnx(model)
    assert len(out.graph.initializer) == len(proto.graph.initializer)
    assert_same_outputs(proto, out)
