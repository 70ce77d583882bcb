"""The verifier on crafted broken IR: each problem kind is found, named and located."""
from __future__ import annotations

import numpy as np
import pytest

from graft import ir
from graft.ir import DataType, Graph, Model, Node, Value
from graft.ir.verifier import VerifyError, problems, verify

F = DataType.FLOAT


def base(opset: int = 17) -> tuple[Model, Value]:
    m = Model(opset_imports={"": opset})
    x = m.graph.add_input(Value("x", F, (2, 3)))
    return m, x


def add(g: Graph, op: str, ins, n_out: int = 1, name: str = "", domain: str = "", **attrs) -> Node:
    outs = [Value(g.unique_name(f"{name or op}_out")) for _ in range(n_out)]
    for o in outs:
        o.dtype, o.shape = F, (2, 3)
    return g.append(Node(op, ins, outs, attrs, name=name, domain=domain))


def test_sound_model_has_no_problems():
    m, x = base()
    r = add(m.graph, "Relu", [x], name="relu")
    m.graph.set_outputs([r.output])
    assert problems(m) == []
    verify(m)  # no raise
    assert ir.verify is verify and ir.VerifyError is VerifyError


def test_out_of_topological_order():
    m, x = base()
    g = m.graph
    a = Node("Relu", [x], [Value("a", F, (2, 3))], name="first")
    b = Node("Neg", [a.output], [Value("b", F, (2, 3))], name="second")
    g.append(b)  # reads `a` before `first` is in the list
    g.append(a)
    g.set_outputs([b.output])
    (p,) = problems(m)
    assert p.startswith("node 'second' (Neg) in graph 'graph': input 0 reads 'a' before it is defined")
    assert "produced by a later node, node 'first' (Relu)" in p and "Graph.sort()" in p
    g.sort()
    assert problems(m) == [] and [n.name for n in g] == ["first", "second"]


def test_cycle():
    m, x = base()
    g = m.graph
    a = add(g, "Add", [x, x], name="a")
    b = add(g, "Neg", [a.output], name="b")
    a.set_input(1, b.output)
    g.set_outputs([b.output])
    (p,) = problems(m)
    assert "node 'a' (Add)" in p and "input 1 reads 'b_out'" in p and "a cycle through node 'b' (Neg)" in p
    with pytest.raises(VerifyError, match="1 problem"):
        verify(m)


def test_dangling_removed_producer_and_unknown_value():
    m, x = base()
    g = m.graph
    a = add(g, "Relu", [x], name="a")
    b = add(g, "Neg", [a.output], name="b")
    ghost = Value("ghost", F, (2, 3))
    c = add(g, "Add", [b.output, ghost], name="c")
    g.set_outputs([c.output])
    g.remove(a, check_uses=False)
    found = problems(m)
    assert len(found) == 2
    assert found[0] == ("node 'b' (Neg) in graph 'graph': input 0 reads 'a_out', which is not defined in this "
                        "graph or an enclosing one (its producer node 'a' (Relu) was removed); rewire the input "
                        "(Node.set_input) to a live value")
    assert "node 'c' (Add)" in found[1] and "input 1 reads 'ghost'" in found[1] and "never added" in found[1]


def _if_model():
    m, x = base()
    g = m.graph
    cond = g.add_input(Value("cond", DataType.BOOL, ()))
    then_g, else_g = Graph("then_g", parent=g), Graph("else_g", parent=g)
    t = add(then_g, "Relu", [x], name="t_relu")
    then_g.set_outputs([t.output])
    e = add(else_g, "Neg", [x], name="e_neg")
    else_g.set_outputs([e.output])
    node = add(g, "If", [cond], name="if", then_branch=then_g, else_branch=else_g)
    g.set_outputs([node.output])
    return m, then_g, else_g, t, e


def test_subgraph_reads_sibling_branch_value():
    m, then_g, else_g, t, e = _if_model()
    assert problems(m) == []
    e.set_input(0, t.output)  # the else branch cannot see the then branch
    (p,) = problems(m)
    assert p.startswith("node 'e_neg' (Neg) in graph 'else_g': input 0 reads 't_relu_out'")
    assert "it belongs to graph 'then_g', not an enclosing scope" in p


def test_subgraph_reads_outer_value_defined_after_the_if():
    m, then_g, else_g, t, e = _if_model()
    g = m.graph
    late = add(g, "Abs", [g.inputs[0]], name="late")
    t.set_input(0, late.output)
    (p,) = problems(m)
    assert "node 't_relu' (Relu) in graph 'then_g': input 0 reads outer-scope value 'late_out'" in p
    assert "produced after the node holding this subgraph" in p
    g.sort()  # the If's implicit input orders `late` first
    assert problems(m) == []


def test_subgraph_output_not_defined_and_parent_mismatch():
    m, then_g, else_g, t, e = _if_model()
    then_g.set_outputs([Value("nowhere", F, (2, 3))])
    else_g.parent = None
    found = problems(m)
    assert any(p.startswith("graph 'then_g': graph output 0 'nowhere' is not defined") for p in found)
    assert any("subgraph 'else_g' has parent None, expected 'graph'" in p for p in found)


def test_duplicate_value_names_model_wide():
    m, then_g, else_g, t, e = _if_model()
    t.outputs[0].name = "x"  # same as the main graph's input
    g = m.graph
    a = add(g, "Relu", [g.inputs[0]], name="a")
    b = add(g, "Relu", [g.inputs[0]], name="b")
    b.outputs[0].name = a.outputs[0].name
    found = problems(m)
    assert any(p.startswith("value name 'x' is defined 2 times (input of graph 'graph'; output 0 of node "
                            "'t_relu' (Relu) in graph 'then_g')") for p in found)
    assert any(p.startswith("value name 'a_out' is defined 2 times") for p in found)
    assert all("Graph.unique_name" in p for p in found)


def test_use_def_inconsistencies():
    m, x = base()
    g = m.graph
    a = add(g, "Relu", [x], name="a")
    b = add(g, "Neg", [a.output], name="b")
    g.set_outputs([b.output])
    # a phantom use, a missing use and a removed reader
    x._uses[(b, 0)] = None
    del a.output._uses[(b, 0)]
    orphan = Node("Abs", [x], [Value("orphan")], name="orphan")  # never added to a graph
    found = problems(m)
    assert len(found) == 3
    assert "node 'b' (Neg) in graph 'graph': input 0 reads 'a_out', but that value's use list lacks ('b', 0)" \
        in found[0]
    assert "value 'x' lists use ('b' Neg, input 0), but that node reads 'a_out' there" in found[1]
    assert "value 'x' lists use ('orphan' Abs, input 0), but that node is in no graph (removed, or never " \
           "added)" in found[2]
    assert orphan.inputs == (x,)


def test_output_producer_mismatch_and_initializer_key():
    m, x = base()
    g = m.graph
    a = add(g, "Relu", [x], name="a")
    a.outputs[0].index = 3
    c = g.make_constant(np.ones(3, np.float32), "c")
    c.name = "renamed"
    g.set_outputs([a.output])
    found = problems(m)
    assert any("node 'a' (Relu) in graph 'graph': output 0 'a_out' records producer 'a' index 3" in p for p in found)
    assert any("initializer stored under 'c' is named 'renamed'" in p for p in found)


def test_untyped_graph_output():
    m, x = base()
    r = m.graph.append(Node("Relu", [x], [Value("r")], name="relu"))
    m.graph.set_outputs([r.output])
    (p,) = problems(m)
    assert "graph output 0 'r' has no type" in p and "infer_shapes" in p


def test_arity_against_schema():
    m, x = base()
    g = m.graph
    w = g.make_constant(np.ones((3, 3, 1, 1), np.float32), "w")
    add(g, "Conv", [x], name="conv_one_input")
    add(g, "Conv", [None, w], name="conv_missing_x")
    add(g, "Relu", [x], n_out=2, name="relu_two_outputs")
    add(g, "Concat", [x] * 5, name="concat5", axis=0)  # variadic: fine
    add(g, "Concat", [], name="concat0", axis=0)
    add(g, "BatchNormalization", [x, w, w, w, w], n_out=3, name="bn3")  # optional outputs: fine
    add(g, "FooBarOp", [x, x, x], name="unknown_op")  # unknown op: never an error
    add(g, "Swizzle", [x], n_out=4, name="custom", domain="my.domain")
    add(g, "FusedMatMul", [x], name="ms", domain="com.microsoft")
    g.set_outputs([g.nodes[0].output])
    found = problems(m)
    assert found == [
        "node 'conv_one_input' (Conv) in graph 'graph': has 1 input(s), onnx.defs Conv-11 takes 2..3; "
        "fix the node's inputs",
        "node 'conv_missing_x' (Conv) in graph 'graph': required input 0 (X) is absent; connect a value",
        "node 'relu_two_outputs' (Relu) in graph 'graph': has 2 output(s), onnx.defs Relu-14 gives 1; "
        "fix the node's outputs",
        "node 'concat0' (Concat) in graph 'graph': has 0 input(s), onnx.defs Concat-13 takes at least 1; "
        "fix the node's inputs",
    ]


@pytest.mark.parametrize("opset,ok", [(11, False), (13, True)])
def test_arity_follows_model_opset(opset, ok):
    """Split takes its `split` sizes as an input from opset 13 on; at opset 11 it is an attribute."""
    m, x = base(opset)
    g = m.graph
    sizes = g.make_constant(np.array([1, 1], np.int64), "sizes")
    s = add(g, "Split", [x, sizes], n_out=2, name="split", axis=0)
    g.set_outputs(list(s.outputs))
    found = problems(m)
    if ok:
        assert found == []
    else:
        assert found == ["node 'split' (Split) in graph 'graph': has 2 input(s), onnx.defs Split-11 takes 1; "
                         "fix the node's inputs"]


def test_verify_error_lists_every_problem():
    m, x = base()
    g = m.graph
    add(g, "Conv", [x], name="bad_conv")
    g.set_outputs([Value("missing", F, (2,))])
    with pytest.raises(VerifyError) as e:
        verify(m)
    assert len(e.value.problems) == 2
    text = str(e.value)
    assert text.splitlines()[0] == "IR verification found 2 problem(s):"
    assert "bad_conv" in text and "'missing'" in text
    assert isinstance(e.value, ir.IRError)


def test_real_models_verify_clean(ppocr_det_path, minilm_onnx_path):
    for p in (ppocr_det_path, minilm_onnx_path):
        verify(ir.load(p))
