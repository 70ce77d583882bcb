"""The text printer (snapshot, determinism) and the networkx view (order, edges, cycles)."""
from __future__ import annotations

import networkx as nx
import numpy as np
import onnx
import pytest

from graft import ir
import ir_models
from conftest import parse_model, with_initializers
from graft.ir.nx_view import to_networkx
from graft.ir.printer import print_graph

SMALL = """<ir_version: 8, opset_import: ["" : 18, "my.domain" : 1]>
small (float[1,3,8,8] x, bool c) => (float[1,4,8,8] h0, float[N] z) {
    k = Constant <value = float {6.0}> ()
    conv_out = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3], group = 1> (x, w, b)
    clipped = Clip(conv_out, , k)
    y = my.domain.Scale <mode = "fast", alpha = 0.1> (clipped)
    h0, h1 = Split <axis = 1, num_outputs = 2> (y)
    z = If (c) <then_branch = g1 () => (float[N] t) { t = Flatten <axis = 0> (h1) },
                else_branch = g2 () => (float[N] e) { e = Flatten <axis = 0> (x) }>
}"""

SNAPSHOT = """\
model (ir_version=8, opset ai.onnx=18, my.domain=1)
graph small (%x: float32[1,3,8,8], %c: bool[]) {
  %k = Constant() {value=<float32[]>}
  %conv_out = Conv(%x, %w<float32[8,3,3,3]>, %b<float32[8]>) {group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1]}
  %clipped = Clip(%conv_out, %_, %k<float32[]>)
  %y = my.domain::Scale(%clipped) {alpha=0.1, mode='fast'}
  %h0, %h1 = Split(%y) {axis=1, num_outputs=2}
  %z = If(%c) {else_branch=@g2, then_branch=@g1}
    graph g2 () {
      %e = Flatten(%x) {axis=0}
      return %e
    }
    graph g1 () {
      %t = Flatten(%h1) {axis=0}
      return %t
    }
  return %h0, %z
}
"""


def small_proto():
    return with_initializers(onnx.parser.parse_model(SMALL), w=np.zeros((8, 3, 3, 3), np.float32),
                             b=np.zeros(8, np.float32))


def test_printer_snapshot():
    assert print_graph(ir.from_onnx(small_proto())) == SNAPSHOT


def test_printer_is_deterministic_and_shows_names_and_rewrites():
    proto = ir_models.opset_model(17)
    a, b = ir.from_onnx(proto), ir.from_onnx(proto)
    assert print_graph(a) == print_graph(b)
    lines = print_graph(a.graph).splitlines()
    assert lines[0] == "graph opset17 (%x: float32[1,3,8,8]) {"
    assert lines[1] == ("  %c = Conv(%x, %W<float32[4,3,3,3]>, %B<float32[4]>) {pads=[1, 1, 1, 1]}  # conv")
    assert lines[2].startswith("  %bn = BatchNormalization(%c, %gamma<float32[4]>,") and "{epsilon=0.001}" in lines[2]
    from graft.compiler import rewrite
    from graft.rules.fold_batchnorm import fold_batchnorm_into_conv

    rewrite(a, [fold_batchnorm_into_conv])
    text = print_graph(a.graph)
    assert "BatchNormalization" not in text
    assert "= Conv(%x, %W_folded<float32[4,3,3,3]>, %B_folded<float32[4]>) {pads=[1, 1, 1, 1]}" in text
    assert print_graph(a) != print_graph(b)
    with pytest.raises(TypeError, match="ir.Graph or ir.Model"):
        print_graph(proto)


def test_printer_nested_subgraph_indentation():
    text = print_graph(ir.from_onnx(ir_models.loop_model()))
    assert "\n  %acc_final, %scans = Loop(%M, %_, %x) {body=@loop_body}  # loop\n" \
           "    graph loop_body (%iter: int64[], %cond_in: bool[], %acc_in: float32[2,3]) {\n" in text
    assert "\n        graph inner_then () {\n          %inner_then = Sub(%acc_in, %step<float32[2,3]>)" in text


# --------------------------------------------------------------------------- networkx
@pytest.fixture(scope="module")
def det_model(ppocr_det_path):
    return ir.load(ppocr_det_path)


def test_networkx_order_equals_ir_order_on_real_model(det_model):
    g = det_model.graph
    view = to_networkx(g)
    assert view.number_of_nodes() == len(g)
    assert nx.is_directed_acyclic_graph(view)
    # IR order is topological, so it is the lexicographically smallest topological order of the view
    assert list(nx.lexicographical_topological_sort(view)) == list(range(len(g)))
    node_reads = sum(1 for n in g for v in n.inputs if v is not None and v.producer is not None)
    assert view.number_of_edges() == node_reads
    for i, n in enumerate(g):
        assert view.nodes[i]["op_type"] == n.op_type and view.nodes[i]["name"] == n.name
        assert view.nodes[i]["node"] is n
    # one edge per (producer output -> consumer input), labelled
    first_conv = next(i for i, n in enumerate(g) if n.op_type == "Conv" and n.inputs[0].producer is not None)
    conv = view.nodes[first_conv]["node"]
    (src, dst, data), = [e for e in view.in_edges(first_conv, data=True) if e[2]["index"] == 0]
    assert dst == first_conv and view.nodes[src]["node"] is conv.inputs[0].producer
    assert data == {"value": conv.inputs[0].name, "index": 0, "output_index": 0, "implicit": False}


def test_networkx_inputs_and_initializers(det_model):
    g = det_model.graph
    view = to_networkx(g, include_inputs=True, include_initializers=True)
    reads = sum(1 for n in g for v in n.inputs if v is not None)
    const_reads = sum(1 for n in g for v in n.inputs if v is not None and v.const is not None)
    assert view.number_of_edges() == reads
    assert view.number_of_nodes() == len(g) + len(g.inputs) + len(g.initializers)
    assert view.nodes[("input", "x")]["kind"] == "input"
    assert sum(1 for u, _ in view.edges() if isinstance(u, tuple) and u[0] == "initializer") == const_reads
    assert nx.is_weakly_connected(view)


def test_networkx_same_value_twice_and_implicit_subgraph_reads():
    m = ir.from_onnx(ir_models.loop_model())
    body = m.graph.nodes[0].attrs["body"]
    view = to_networkx(body, include_inputs=True)
    # body_if's branches read acc_in (a body input) and step (two scopes up, not in this view)
    implicit = [(u, v, d) for u, v, d in view.edges(data=True) if d["implicit"]]
    assert implicit == [(("input", "acc_in"), 3, {"value": "acc_in", "index": None, "output_index": None,
                                                  "implicit": True})]
    main = to_networkx(m.graph, include_inputs=True, include_initializers=True)
    loop_reads = [(u, d["index"], d["implicit"]) for u, _, d in main.in_edges(0, data=True)]
    assert sorted(loop_reads, key=repr) == sorted([
        (("initializer", "step"), None, True), (("input", "M"), 0, False), (("input", "flag"), None, True),
        (("input", "x"), 2, False), (("input", "x"), None, True)], key=repr)

    sq = ir.from_onnx(parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { a = Neg(x)  y = Mul(a, a) }"""))
    v = to_networkx(sq.graph)
    assert sorted(d["index"] for _, _, d in v.edges(data=True)) == [0, 1]  # a multigraph: both reads kept


def test_networkx_finds_cycles():
    m = ir.from_onnx(parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { a = Neg(x)  b = Abs(a)  c = Relu(b)  y = Sigmoid(c) }"""))
    nodes = m.graph.nodes
    assert nx.is_directed_acyclic_graph(to_networkx(m.graph))
    nodes[0].set_input(0, nodes[2].output)  # Neg now reads Relu: Neg -> Abs -> Relu -> Neg
    view = to_networkx(m.graph)
    assert not nx.is_directed_acyclic_graph(view)
    cycle = nx.find_cycle(view)
    assert sorted(view.nodes[u]["op_type"] for u, _, _ in cycle) == ["Abs", "Neg", "Relu"]
