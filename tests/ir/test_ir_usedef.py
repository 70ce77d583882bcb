"""Use-def bookkeeping: every edit through Node/Graph keeps both sides right, and the verifier agrees."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graft import ir
from conftest import parse_model
from graft.ir import IRError, Node, Value
from graft.ir.verifier import problems

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, float[2,3] z) => (float[2,3] y, float[2,3] s) <float[2,3] c = {1.,2.,3.,4.,5.,6.}> {
    a = Add(x, c)
    b = Mul(a, a)
    s = Sub(b, z)
    y = Relu(s)
}"""


@pytest.fixture
def model():
    return ir.from_onnx(parse_model(TEXT))


def nodes_by_name(m):
    return {n.op_type: n for n in m.graph}


def test_loaded_uses_match_inputs(model):
    n = nodes_by_name(model)
    a = n["Add"].output
    assert a.uses() == [(n["Mul"], 0), (n["Mul"], 1)]
    assert a.users() == [n["Mul"]] and a.num_uses == 2
    assert model.graph.initializers["c"].uses() == [(n["Add"], 1)]
    assert n["Sub"].output.is_graph_output() and n["Sub"].output.uses() == [(n["Relu"], 0)]
    assert n["Mul"].predecessors() == [n["Add"]] and n["Add"].successors() == [n["Mul"]]
    assert problems(model) == []


def test_set_input_moves_use(model):
    n = nodes_by_name(model)
    x, z, a = model.graph.inputs[0], model.graph.inputs[1], n["Add"].output
    n["Mul"].set_input(1, z)
    assert a.uses() == [(n["Mul"], 0)]
    assert (n["Mul"], 1) in z.uses() and n["Mul"].inputs == (a, z)
    n["Mul"].set_input(0, None)  # an absent optional input: no use recorded anywhere
    assert a.uses() == [] and n["Mul"].inputs == (None, z)
    n["Mul"].set_input(0, x)
    assert (n["Mul"], 0) in x.uses()
    assert problems(model) == [] or all("Add" in p for p in problems(model))


def test_replace_inputs_drops_and_adds(model):
    n = nodes_by_name(model)
    x, z, a = model.graph.inputs[0], model.graph.inputs[1], n["Add"].output
    n["Mul"].replace_inputs([z, x])
    assert a.uses() == []
    assert z.uses() == [(n["Sub"], 1), (n["Mul"], 0)]
    assert (n["Mul"], 1) in x.uses()
    n["Mul"].replace_inputs([a, a])
    assert a.uses() == [(n["Mul"], 0), (n["Mul"], 1)]
    assert (n["Mul"], 0) not in z.uses() and (n["Mul"], 1) not in x.uses()
    assert problems(model) == []


def test_remove_checks_uses_then_unlinks(model):
    g = model.graph
    n = nodes_by_name(model)
    with pytest.raises(IRError, match=r"cannot remove Add node '': its output 'a' is still used by Mul node ''$"):
        g.remove(n["Add"])
    with pytest.raises(IRError, match="output 's' is still used by Relu node '', graph output$"):
        g.remove(n["Sub"])
    with pytest.raises(IRError, match="output 'y' is still used by graph output$"):
        g.remove(n["Relu"])
    # detach Mul's readers, then remove: inputs lose the uses, the node leaves the list
    n["Sub"].set_input(0, g.inputs[0])
    g.remove(n["Mul"])
    assert n["Add"].output.uses() == [] and n["Mul"].graph is None and n["Mul"].inputs == ()
    assert [x.op_type for x in g] == ["Add", "Sub", "Relu"] and len(g) == 3
    g.remove(n["Add"])
    assert g.initializers["c"].uses() == [] and (n["Add"], 0) not in g.inputs[0].uses()
    assert problems(model) == []


def test_remove_without_check_leaves_dangling_reader(model):
    n = nodes_by_name(model)
    model.graph.remove(n["Add"], check_uses=False)
    found = problems(model)
    assert len(found) == 2 and all("reads 'a', which is not defined" in p for p in found)
    assert "its producer node '' (Add) was removed" in found[0]


def test_replace_all_uses_with_moves_every_reader(model):
    g = model.graph
    n = nodes_by_name(model)
    a = n["Add"].output
    neg = g.insert_before(n["Mul"], Node("Neg", [g.inputs[0]], [Value("neg")]))
    a.replace_all_uses_with(neg.output)
    assert a.uses() == [] and neg.output.uses() == [(n["Mul"], 0), (n["Mul"], 1)]
    assert n["Mul"].inputs == (neg.output, neg.output)
    g.remove(n["Add"])
    assert problems(model) == []
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    assert [x.op_type for x in out.graph.node] == ["Neg", "Mul", "Sub", "Relu"]


def test_replace_graph_output_keeps_name(model):
    g = model.graph
    n = nodes_by_name(model)
    s = n["Sub"].output
    new = g.insert_before(n["Relu"], Node("Add", [n["Mul"].output, g.inputs[1]], [Value("s2")]))
    s.replace_all_uses_with(new.output)
    # the interface keeps its name: the new value takes it, the old one is renamed
    assert [v.name for v in g.outputs] == ["y", "s"]
    assert g.outputs[1] is new.output and s.name == "s_old" and not s.is_graph_output()
    assert new.output.is_graph_output() and n["Relu"].inputs == (new.output,)
    assert new.output.dtype == s.dtype and new.output.shape == (2, 3)  # typed like the output it replaced
    g.remove(n["Sub"])
    assert problems(model) == []
    onnx.checker.check_model(ir.to_onnx(model), full_check=True)


def test_replace_graph_output_by_input_inserts_identity(model):
    g = model.graph
    n = nodes_by_name(model)
    z = g.inputs[1]
    n["Relu"].output.replace_all_uses_with(z)
    assert [v.name for v in g.outputs] == ["y", "s"]
    ident = g.outputs[0].producer
    assert ident.op_type == "Identity" and ident.inputs == (z,) and (ident, 0) in z.uses()
    g.remove(n["Relu"])
    assert problems(model) == []
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x", "z"]


def test_replace_output_that_is_an_initializer_rekeys_it():
    m = ir.from_onnx(parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] c, float[2] y) <float[2] c = {1.0, 2.0}> { y = Add(x, c) }"""))
    g = m.graph
    c = g.initializers["c"]
    neg = g.insert_before(g.nodes[0], Node("Neg", [g.inputs[0]], [Value("n")]))
    c.replace_all_uses_with(neg.output)
    assert [v.name for v in g.outputs] == ["c", "y"] and g.outputs[0] is neg.output
    assert list(g.initializers) == ["c_old"] and g.initializers["c_old"] is c
    assert problems(m) == []
    out = ir.to_onnx(m)
    onnx.checker.check_model(out, full_check=True)
    assert [t.name for t in out.graph.initializer] == ["c_old"]


def test_replace_output_that_is_a_graph_input_is_refused():
    m = ir.from_onnx(parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] x, float[2] y) { y = Neg(x) }"""))
    g = m.graph
    with pytest.raises(IRError, match="also a graph input"):
        g.inputs[0].replace_all_uses_with(g.nodes[0].output)
    assert g.inputs[0].name == "x"


def test_outer_scope_uses_follow_replacement():
    """A value read inside an If branch is rewired by replace_all_uses_with like any other use."""
    import ir_models

    m = ir.from_onnx(ir_models.if_model())
    g = m.graph
    w = g.initializers["W"]
    then_conv = g.nodes[1].attrs["then_branch"].nodes[0]
    else_conv = g.nodes[1].attrs["else_branch"].nodes[0]
    assert set(w.uses()) == {(then_conv, 1), (else_conv, 1)}
    w2 = g.make_constant(np.ones(w.shape, np.float32), "W2")
    w.replace_all_uses_with(w2)
    assert w.uses() == [] and then_conv.inputs[1] is w2 and else_conv.inputs[1] is w2
    assert w2.name == "W2" and w.const is not None  # the old initializer is left in place, unchanged
    assert problems(m) == []


def test_new_node_names_are_unique_and_sort_detects_cycles(model):
    g = model.graph
    n = nodes_by_name(model)
    a1 = g.append(Node("Abs", [g.inputs[0]], [Value(g.unique_name("y"))]))
    a2 = g.append(Node("Abs", [a1.output], [Value(g.unique_name("y"))]))
    assert a1.name == "Abs" and a2.name == "Abs_1"
    assert a1.output.name == "y_1" and a2.output.name == "y_2"
    # Add reads Mul's output: a cycle Add -> Mul -> Add
    n["Add"].set_input(0, n["Mul"].output)
    with pytest.raises(IRError, match="has a cycle"):
        g.sort()
