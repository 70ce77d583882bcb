"""Every feature the engine owes a rule, on small ONNX-text models compared in onnxruntime."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from graft import ir
from graft.compiler import (Attr, Const, PatternError, Rule, RuleDefinitionError, RuleError, StopReason, Var, explain,
                      op, rewrite)
from graft.compiler.engine.rewriter import PROVENANCE_REPLACED, PROVENANCE_RULE
from conftest import assert_same_outputs, with_initializers
from graft.ir.printer import print_graph
from graft.ir.verifier import problems
from graft.rules.fold_batchnorm import fold_batchnorm_into_conv

HERE = os.path.abspath(__file__)
HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'
rng = np.random.default_rng(0)


def build(text: str, **inits) -> onnx.ModelProto:
    return with_initializers(onnx.parser.parse_model(HEAD + text), **inits)


def f32(*shape, low=None):
    if low is not None:
        return rng.uniform(low, low + 1, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def bn_stats(c, prefix=""):
    return {prefix + "gamma": f32(c, low=0.5), prefix + "beta": f32(c), prefix + "mean": f32(c),
            prefix + "var": f32(c, low=0.5)}


def run_rules(proto, rules, **kw):
    model = ir.from_onnx(proto)
    res = rewrite(model, rules, **kw)
    assert problems(model) == []
    return model, res, ir.to_onnx(model)


def snapshot(model):
    """Everything a refused rewrite must leave alone: text, initializers, every value's uses."""
    uses = [(v.name, [(n.name, n.op_type, i) for n, i in v.uses()])
            for g in model.all_graphs()
            for v in [*g.inputs, *g.initializers.values(), *(o for n in g for o in n.outputs)]]
    return print_graph(model), list(model.graph.initializers), uses


def line_of(marker: str, fn=None) -> str:
    """``file:line`` of the first line in ``fn`` (or this file) containing ``marker``."""
    src, start = (inspect.getsourcelines(fn) if fn else (open(HERE).read().splitlines(True), 1))
    for k, text in enumerate(src):
        if marker in text:
            return f"{HERE}:{start + k}"
    raise AssertionError(marker)


# --------------------------------------------------------------------------- optional inputs
CONVS = """g (float[1,3,8,8] x) => (float[1,4,8,8] y1, float[1,4,8,8] y2) {
    y1 = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y2 = Conv <pads = [1, 1, 1, 1]> (x, w2)
}"""
x, w, b = Var("x"), Const("w"), Const("b")


def conv_models():
    return build(CONVS, w=f32(4, 3, 3, 3), b=f32(4), w2=f32(4, 3, 3, 3))


def test_optional_input_matches_conv_with_and_without_bias():
    rule = Rule("conv_any_bias", op.Conv(x, w, op.optional(b), name="conv"), lambda op, m: op.Relu(m[x]))
    hits, misses = explain(ir.from_onnx(conv_models()), rule)
    assert misses == [] and len(hits) == 2
    assert hits[0].value(b).name == "b" and hits[0][b].shape == (4,)
    assert hits[1].value(b) is None and hits[1][b] is None and hits[1].get(b, "absent") == "absent"
    no_bias = Rule("conv_no_bias", op.Conv(x, w), lambda op, m: op.Relu(m[x]))
    hits, misses = explain(ir.from_onnx(conv_models()), no_bias)
    assert [m.root.outputs[0].name for m in hits] == ["y2"]
    assert misses[0][1].reason == "Conv (output 'y1') has 3 inputs, pattern wants 2..2"
    need_bias = Rule("conv_bias", op.Conv(x, w, b), lambda op, m: op.Relu(m[x]))
    hits, misses = explain(ir.from_onnx(conv_models()), need_bias)
    assert [m.root.outputs[0].name for m in hits] == ["y1"]
    assert misses[0][1].reason == "Conv (output 'y2') has 2 inputs, pattern wants 3..3"


def test_optional_bias_rewrite_materializes_zero_bias():
    def check(m):
        if m.value(b) is not None:
            return m.fail("Conv already has a bias", m.conv)

    def replacement(op, m):
        zero = np.zeros(m[w].shape[0], m[w].dtype)
        return op.Conv(m[x], m.value(w), op.const(zero, name="zero_bias"), **m.conv.attrs)

    rule = Rule("add_zero_bias", op.Conv(x, w, op.optional(b), name="conv"), replacement, check=check)
    proto = conv_models()
    model, res, out = run_rules(proto, [rule])
    assert res.counts == {"add_zero_bias": 1} and res.stop_reason is StopReason.SATURATED
    assert [len(n.inputs) for n in model.graph] == [3, 3]
    assert model.graph.nodes[1].inputs[2].name == "zero_bias"
    assert model.graph.nodes[1].inputs[1] is model.graph.initializers["w2"]  # reused, not copied
    assert_same_outputs(proto, out, atol=0)


def test_optional_input_absent_in_the_middle():
    proto = build("""g (float[4] a) => (float[4] y) { y = Clip(a, , hi) }""", hi=np.array(0.5, np.float32))
    lo, hi = Const("lo"), Const("hi")
    rule = Rule("clip_max_to_min", op.Clip(x, op.optional(lo), op.optional(hi)),
                lambda op, m: op.Min(m[x], m.value(hi)), check=lambda m: None if m[lo] is None else "has lo")
    model, res, out = run_rules(proto, [rule])
    assert res.counts == {"clip_max_to_min": 1} and [n.op_type for n in model.graph] == ["Min"]
    assert_same_outputs(proto, out, atol=0)


# --------------------------------------------------------------------------- attributes
ATTRS = """g (float[2,3] a, float[3,3] bm, float[3] c) => (float[3,2] t1, float[2,3] t2, float[2,3] g1,
        float[2,3] g2, float[2,3] l1, float[2,3] l2, float[2,3] l3) {
    t1 = Transpose <perm = [1, 0]> (a)
    t2 = Transpose <perm = [0, 1]> (a)
    g1 = Gemm (a, bm, c)
    g2 = Gemm <transB = 1> (a, bm, c)
    l1 = LeakyRelu (a)
    l2 = LeakyRelu <alpha = 0.2> (a)
    l3 = LeakyRelu <alpha = 0.01> (a)
}"""


def hit_outputs(rule):
    hits, _ = explain(ir.from_onnx(build(ATTRS)), rule)
    return [m.root.outputs[0].name for m in hits]


def test_attribute_literal_default_predicate_and_binding():
    a, bm, c = Var("a"), Var("bm"), Var("c")
    ident = lambda op, m: op.Identity(m[a])  # noqa: E731
    assert hit_outputs(Rule("perm10", op.Transpose(a, perm=[1, 0]), ident)) == ["t1"]
    assert hit_outputs(Rule("perm_tuple", op.Transpose(a, perm=(0, 1)), ident)) == ["t2"]
    # absent attributes compare with the schema default (Gemm transB=0, LeakyRelu alpha=0.01),
    # float attributes at float32 precision (0.01 is stored as 0.0099999998)
    assert hit_outputs(Rule("gemm_nt", op.Gemm(a, bm, c, transB=0), ident)) == ["g1"]
    assert hit_outputs(Rule("lrelu_default", op.LeakyRelu(a, alpha=0.01), ident)) == ["l1", "l3"]
    assert hit_outputs(Rule("lrelu_big", op.LeakyRelu(a, alpha=lambda v: v > 0.1), ident)) == ["l2"]
    hits, misses = explain(ir.from_onnx(build(ATTRS)), Rule("gemm_tb", op.Gemm(a, bm, c, transB=Attr("tb")), ident))
    assert misses == [] and [m.attr("tb") for m in hits] == [0, 1]
    hits, misses = explain(ir.from_onnx(build(ATTRS)),
                           Rule("gemm_t1", op.Gemm(a, bm, c, transB=Attr("tb", where=lambda v: v == 1)), ident))
    assert [m.root.outputs[0].name for m in hits] == ["g2"]
    assert misses[0][1].reason == "attribute transB=0 of Gemm (output 'g1') fails the predicate of Attr('tb')"
    _, misses = explain(ir.from_onnx(build(ATTRS)), Rule("p", op.Transpose(a, perm=[1, 0]), ident))
    assert misses[0][1].reason == "attribute perm of Transpose (output 't2') is [0, 1], pattern wants [1, 0]"


def test_attr_binding_drives_a_rewrite():
    """Gemm(A, B, C, transB=1) with constant B → Gemm(A, B.T, C): only the transB=1 node changes."""
    a, c, bconst = Var("a"), Var("c"), Const("B")

    def replacement(op, m):
        return op.Gemm(m[a], op.const(m[bconst].T), m[c], transB=0)

    rule = Rule("pretranspose_gemm_weight", op.Gemm(a, bconst, c, transB=Attr("tb", where=lambda v: v == 1)),
                replacement)
    proto = build("""g (float[2,3] a) => (float[2,4] y1, float[2,4] y2) {
        y1 = Gemm <transB = 1> (a, B1, c)
        y2 = Gemm (a, B2, c)
    }""", B1=f32(4, 3), B2=f32(3, 4), c=f32(4))
    model, res, out = run_rules(proto, [rule])
    assert res.counts == {"pretranspose_gemm_weight": 1}
    assert [n.attrs.get("transB", 0) for n in model.graph] == [0, 0]
    assert "B1" not in model.graph.initializers  # no reader left: dropped
    assert_same_outputs(proto, out, atol=1e-6)


# --------------------------------------------------------------------------- constants, commutativity
def test_constant_predicate_and_commutative_matching():
    one = Const("one", where=lambda arr: arr.size == 1 and float(arr.reshape(-1)[0]) == 1.0)
    seen = []

    def replacement(op, m):
        seen.append(m.value(x).name)
        return m[x]

    rule = Rule("mul_by_one", op.Mul(x, one), replacement)
    proto = build("""g (float[4] a) => (float[4] y1, float[4] y2, float[4] y3, float[4] y4) {
        m1 = Mul(a, ones)
        m2 = Mul(ones, a)
        m3 = Mul(a, twos)
        m4 = Mul(a, a)
        y1 = Relu(m1)
        y2 = Relu(m2)
        y3 = Relu(m3)
        y4 = Relu(m4)
    }""", ones=np.ones(1, np.float32), twos=np.full(1, 2, np.float32))
    _, misses = explain(ir.from_onnx(proto), rule)
    reasons = sorted(mi.reason for _, mi in misses)
    assert reasons == ["constant 'twos' fails the predicate of one", "input 1 ('a') of Mul (output 'm4') is not a "
                       "constant (pattern wants Const one)"]
    model, res, out = run_rules(proto, [rule])
    assert res.counts == {"mul_by_one": 2}  # Mul(a, ones) and Mul(ones, a): one rule, both orders
    assert seen == ["a", "a"]
    assert [n.op_type for n in model.graph] == ["Mul", "Mul", "Relu", "Relu", "Relu", "Relu"]
    assert model.graph.nodes[2].inputs[0].name == "a"
    assert_same_outputs(proto, out, atol=0)


def test_non_commutative_op_is_not_swapped():
    c = Const("c")
    rule = Rule("sub_const", op.Sub(x, c), lambda op, m: op.Add(m[x], op.const(-m[c])))
    proto = build("""g (float[4] a) => (float[4] y) { y = Sub(c, a) }""", c=np.ones(4, np.float32))
    hits, misses = explain(ir.from_onnx(proto), rule)
    assert hits == [] and "input 1 ('a') of Sub (output 'y') is not a constant" in misses[0][1].reason


# --------------------------------------------------------------------------- several outputs
s0, e0, ax0, s1, e1, ax1 = (Const(n) for n in ("s0", "e0", "ax0", "s1", "e1", "ax1"))


def _halves_check(m):
    if not (m[ax0].size == 1 and np.array_equal(m[ax0], m[ax1])):
        return m.fail("the slices cut different axes", m.left)
    axis = int(m[ax0][0])
    dim = m.shape(x)[axis] if m.shape(x) is not None else None
    if int(m[s0][0]) != 0 or int(m[e0][0]) != int(m[s1][0]) or not isinstance(dim, int) or int(m[e1][0]) != dim:
        return m.fail("the slices do not split the axis in two", m.left)


def _halves_to_split(op, m):
    axis, cut, dim = int(m[ax0][0]), int(m[e0][0]), m.shape(x)[int(m[ax0][0])]
    left, right = op.Split(m[x], op.const(np.array([cut, dim - cut], np.int64)), axis=axis, _outputs=2)
    return left, right


slices_to_split = Rule("slices_to_split",
                       (op.Slice(x, s0, e0, ax0, name="left"), op.Slice(x, s1, e1, ax1, name="right")),
                       _halves_to_split, check=_halves_check)


def slice_model(cut_left=3, cut_right=3):
    return build("""g (float[4,6] a) => (float[4,3] y1, float[4,3] y2) {
        l = Slice(a, s0, e0, ax)
        r = Slice(a, s1, e1, ax)
        y1 = Relu(l)
        y2 = Neg(r)
    }""", s0=np.array([0]), e0=np.array([cut_left]), s1=np.array([cut_right]), e1=np.array([6]), ax=np.array([1]))


def test_pattern_with_two_roots():
    proto = slice_model()
    model, res, out = run_rules(proto, [slices_to_split])
    assert res.counts == {"slices_to_split": 1}
    assert [n.op_type for n in model.graph] == ["Split", "Relu", "Neg"]
    split = model.graph.nodes[0]
    assert [u.op_type for o in split.outputs for u in o.users()] == ["Relu", "Neg"]
    assert split.meta[PROVENANCE_RULE] == "slices_to_split"
    assert split.meta[PROVENANCE_REPLACED] == "l,r"  # unnamed imported nodes are named by their outputs
    assert_same_outputs(proto, out, atol=0)
    # overlapping slices: the check refuses, nothing changes
    proto = build("""g (float[4,6] a) => (float[4,3] y1, float[4,4] y2) {
        l = Slice(a, s0, e0, ax)
        r = Slice(a, s1, e1, ax)
        y1 = Relu(l)
        y2 = Neg(r)
    }""", s0=np.array([0]), e0=np.array([3]), s1=np.array([2]), e1=np.array([6]), ax=np.array([1]))
    model = ir.from_onnx(proto)
    before = snapshot(model)
    assert rewrite(model, [slices_to_split]).rewrites == 0
    assert snapshot(model) == before
    _, misses = explain(model, slices_to_split)
    assert misses[0][1].reason == "the slices do not split the axis in two"


SPLIT_CONCAT = """<ir_version: 8, opset_import: ["" : 18]>
g (float[2,6] a) => (float[2,6] y) {
    b = Sigmoid(a)
    h0, h1 = Split <axis = 1, num_outputs = 2> (b)
    c = Concat <axis = 1> (%s)
    y = Relu(c)
}"""
sp = op.Split(x, _outputs=2, name="sp")
split_concat = Rule("split_concat", op.Concat(sp[0], sp[1], name="cat"), lambda op, m: m[x],
                    check=lambda m: None if m.sp.attrs.get("axis", 0) == m.cat.attrs["axis"] else "other axis")


def test_pattern_on_multi_output_op():
    proto = onnx.parser.parse_model(SPLIT_CONCAT % "h0, h1")
    model, res, out = run_rules(proto, [split_concat])
    assert res.counts == {"split_concat": 1}
    assert [n.op_type for n in model.graph] == ["Sigmoid", "Relu"]
    assert_same_outputs(proto, out, atol=0)
    swapped = onnx.parser.parse_model(SPLIT_CONCAT % "h1, h0")
    hits, misses = explain(ir.from_onnx(swapped), split_concat)
    assert hits == []
    assert misses[0][1].reason == "input 0 of Concat (output 'c') is output 1 of its producer, pattern wants output 0"


# --------------------------------------------------------------------------- escaping values, shared weights
def bn_text(extra_out="", extra=""):
    return f"""g (float[1,3,8,8] x) => (float[1,4,8,8] y{extra_out}) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
        {extra}
    }}"""


def test_no_rewrite_when_inner_value_escapes():
    inits = dict(w=f32(4, 3, 3, 3), b=f32(4), **bn_stats(4))
    used = build(bn_text(", float[1,4,8,8] r", "r = Relu(c)"), **inits)
    as_output = build(bn_text(", float[1,4,8,8] c"), **inits)
    for proto, why in ((used, "output 'c' of Conv node (output 'c') is also used by Relu node (output 'r') "
                               "outside the pattern"),
                       (as_output, "output 'c' of Conv node (output 'c') is a graph output, so the node cannot "
                                   "be replaced")):
        model = ir.from_onnx(proto)
        before = snapshot(model)
        res = rewrite(model, [fold_batchnorm_into_conv])
        assert res.rewrites == 0 and not res.modified and snapshot(model) == before
        hits, misses = explain(model, fold_batchnorm_into_conv)
        assert hits == [] and misses[0][1].reason == why


def test_rule_blocked_by_an_escape_fires_once_the_outside_reader_is_gone():
    """Neg(Exp(x)) cannot fire while Abs also reads Exp's output; a later rewrite replaces Abs by a
    fresh Exp, and the worklist must come back to Neg (a reader of the producer that lost a reader)."""
    x = Var("x")
    neg_exp = Rule("neg_exp_to_mul", op.Neg(op.Exp(x)),
                   lambda op, m: op.Mul(op.Exp(m[x], _name="fresh_exp"), np.array(-1, np.float32)))
    y = Var("y")

    def abs_of_exp_check(m):
        p = m[y].producer
        return None if p is not None and p.op_type == "Exp" and p.name != "fresh_exp" else m.fail("no Exp", None)

    abs_exp = Rule("abs_of_exp", op.Abs(y), lambda op, m: op.Exp(m[y].producer.inputs[0], _name="abs_exp"),
                   check=abs_of_exp_check)
    proto = build("""g (float[2,3] x) => (float[2,3] n, float[2,3] a) {
        e = Exp(x)
        n = Neg(e)
        a = Abs(e)
    }""")
    model, res, out = run_rules(proto, [neg_exp, abs_exp])
    # Neg was visited first and refused (Abs read e); after abs_of_exp removed Abs, it fires
    assert dict(res.counts) == {"abs_of_exp": 1, "neg_exp_to_mul": 1}
    assert [n.op_type for n in out.graph.node].count("Abs") == 0
    assert_same_outputs(proto, out)


def test_shared_initializer_is_never_changed_in_place():
    W = f32(4, 3, 3, 3)
    proto = build("""g (float[1,3,8,8] x) => (float[1,4,8,8] y1, float[1,4,8,8] y2) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, W, b)
        c2 = Conv <pads = [1, 1, 1, 1]> (x, W, b)
        y1 = BatchNormalization (c1, gamma, beta, mean, var)
        y2 = BatchNormalization (c2, k_gamma, k_beta, k_mean, k_var)
    }""", W=W, b=f32(4), **bn_stats(4), **bn_stats(4, "k_"))
    model = ir.from_onnx(proto)
    shared = model.graph.initializers["W"]
    tensor, array = shared.const, shared.const.array
    res = rewrite(model, [fold_batchnorm_into_conv])
    assert res.counts == {"fold_batchnorm_into_conv": 2}
    assert problems(model) == []
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert len(convs) == 2 and len(model.graph) == 2
    w1, w2 = (c.inputs[1] for c in convs)
    assert w1 is not w2 and w1 is not shared and w2 is not shared
    assert not np.array_equal(w1.const.array, w2.const.array)
    assert np.array_equal(array, W) and shared.const is tensor  # the original is untouched
    assert "W" not in model.graph.initializers  # nothing reads it any more
    with pytest.raises(ValueError, match="read-only"):
        array[0, 0, 0, 0] = 1.0
    assert_same_outputs(proto, ir.to_onnx(model), atol=1e-5)


# --------------------------------------------------------------------------- constants read through the Match
def test_match_reads_each_constant_once_and_memoizes_derived_values(monkeypatch):
    """A check and a replacement may read a constant as often as their math does: the Match
    asks the IR once per Var per match, and ``m.memo(fn)`` runs ``fn`` once per match."""
    reads, derived = {}, []
    real_constant = ir.Value.constant

    def counting_constant(self):
        reads[self.name] = reads.get(self.name, 0) + 1
        return real_constant(self)

    scale, shift = Var("scale"), Const("shift")  # a Var (read by the rule) and a Const (read by the matcher too)

    def doubled(m):
        derived.append(m.root.outputs[0].name)
        return m.const(scale) * 2

    def check(m):
        reads.clear()  # from here on: the reads the Match serves (the matcher read `shift` already)
        if not m.all_constant(scale, shift) or m.need_constant(scale, shift) is not None:
            return m.fail("not constant")
        assert m.const(scale) is m.const(scale) and m[shift] is m.get(shift) is m.const(shift)
        assert m.memo(doubled).shape == (4,)
        return None

    def replacement(op, m):
        assert m.const(scale).dtype == np.float32 and m.dtype(scale) == ir.DataType.FLOAT
        # x * scale + shift as x * scale - (-shift), so the result does not match the pattern again
        return op.Sub(op.Mul(m[x], op.const(m.memo(doubled) / 2)), op.const(-(m[shift] + m.get(shift) * 0)))

    rule = Rule("reads_once", op.Add(op.Mul(x, scale, name="mul"), shift, name="add"), replacement, check=check)
    proto = build("""g (float[2, 4] x) => (float[2, 4] y) {
        p = Mul(x, S)
        y = Add(p, T)
    }""", S=f32(4), T=f32(4))
    monkeypatch.setattr(ir.Value, "constant", counting_constant)
    model, res, out = run_rules(proto, [rule])
    assert res.counts == {"reads_once": 1}
    assert reads == {"S": 1, "T": 1}  # each read once, though check and replacement read each 7 times
    assert derived == ["y"]  # computed in the check, served again to the replacement
    assert_same_outputs(proto, out, atol=1e-6)


def test_replaced_initializers_are_never_served_stale():
    """Each match reads the constants of the graph as it is now: a rule that replaces an
    initializer with a new one is followed by matches that see the new data. Rewriting
    ``Add(x, c)`` to ``Add(x, c + 1)`` while c < 5 stops after exactly four rewrites, at 5."""
    c = Const("c", where=lambda a: a.size == 1 and float(a.reshape(())) < 5)
    bump = Rule("bump", op.Add(x, c), lambda op, m: op.Add(m[x], op.const(m[c] + 1)))
    proto = build("""g (float[3] x) => (float[3] y) {
        y = Add(x, k)
    }""", k=np.array([1.0], np.float32))
    model, res, out = run_rules(proto, [bump])
    assert res.counts == {"bump": 4} and res.stop_reason is StopReason.SATURATED
    (add,) = model.graph
    np.testing.assert_array_equal(add.inputs[1].constant(), [5.0])
    feeds = {"x": np.array([0.5, -1.0, 2.0], np.float32)}
    got = ir.to_onnx(model)
    import onnxruntime as ort
    (y,) = ort.InferenceSession(got.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(y, feeds["x"] + 5)


def test_batchnorm_folded_twice_reads_the_first_fold_s_weights():
    """Conv -> BN -> BN: the second fold's Match must read the weights the first fold made
    (new initializers replacing the originals), not the originals."""
    proto = build("""g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        z = BatchNormalization (c, gamma, beta, mean, var)
        y = BatchNormalization (z, k_gamma, k_beta, k_mean, k_var)
    }""", w=f32(4, 3, 3, 3), b=f32(4), **bn_stats(4), **bn_stats(4, "k_"))
    model, res, out = run_rules(proto, [fold_batchnorm_into_conv])
    assert res.counts == {"fold_batchnorm_into_conv": 2}
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert_same_outputs(proto, out, atol=1e-4)


def test_need_constant_names_the_value_its_reader_and_why():
    s = Var("s")
    rule = Rule("needs_const_scale", op.Mul(x, s, name="mul"), lambda op, m: m[x],
                check=lambda m: m.need_constant(x, s, why="the scale must be known"))
    proto = build("""g (float[4] a, float[4] t) => (float[4] y) {
        r = Relu(t)
        y = Mul(a, r)
    }""")
    hits, misses = explain(ir.from_onnx(proto), rule)
    assert hits == []
    assert misses[0][1].reason == ("x 'a' of Mul (output 'y') is not a constant (a graph input callers may "
                                   "override); the scale must be known")
    # x is checked first; with a constant x the reason names s, computed at run time
    proto = build("""g (float[4] t) => (float[4] y) {
        r = Relu(t)
        y = Mul(a, r)
    }""", a=f32(4))
    (node, miss), = explain(ir.from_onnx(proto), rule)[1]
    assert miss.reason.startswith("s 'r' of Mul (output 'y') is not a constant (computed at run time)")


def test_dtype_of_a_constant_node_output_without_recorded_type():
    """m.dtype falls back to the constant's own element type when the Value records none."""
    seen = []
    k = Var("k")
    rule = Rule("look", op.Add(x, k), lambda op, m: m[x], check=lambda m: seen.append(m.dtype(k)) or m.fail("no"))
    proto = build("""g (float[2] a) => (float[2] y) {
        kk = Constant <value = float[2] {1.0, 2.0}> ()
        y = Add(a, kk)
    }""")
    model = ir.from_onnx(proto)
    for g_ in model.all_graphs():
        for n in g_:
            for o in n.outputs:
                o.dtype = None if o.name == "kk" else o.dtype
    explain(model, rule)
    assert seen == [ir.DataType.FLOAT]


def test_node_name_taken_by_the_match_is_a_definition_error():
    with pytest.raises(RuleDefinitionError, match=r"pattern node name 'const' is taken by the Match \(m.const\)"):
        Rule("shadowed", op.Relu(x, name="const"), lambda op, m: m[x])


# --------------------------------------------------------------------------- limits, provenance, determinism
NEGS = """g (float[4] a) => (float[4] y) {
    n1 = Neg(a)
    n2 = Neg(n1)
    n3 = Neg(n2)
    n4 = Neg(n3)
    n5 = Neg(n4)
    n6 = Neg(n5)
    y = Relu(n6)
}"""
double_neg = Rule("double_neg", op.Neg(op.Neg(x)), lambda op, m: m[x])


def test_iteration_limit_vs_saturated():
    proto = build(NEGS)
    model, res, out = run_rules(proto, [double_neg], max_rewrites=1)
    assert res.stop_reason is StopReason.ITERATION_LIMIT and res.rewrites == 1
    assert [n.op_type for n in model.graph] == ["Neg"] * 4 + ["Relu"]
    assert_same_outputs(proto, out, atol=0)  # stopped early, still a valid equivalent graph
    model, res, out = run_rules(proto, [double_neg])
    assert res.stop_reason is StopReason.SATURATED and res.counts == {"double_neg": 3}
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert_same_outputs(proto, out, atol=0)


def test_provenance_in_metadata_props():
    proto = build(bn_text(), w=f32(4, 3, 3, 3), b=f32(4), **bn_stats(4))
    for n, name in zip(proto.graph.node, ("conv1", "bn1")):
        n.name = name
    model, res, out = run_rules(proto, [fold_batchnorm_into_conv])
    (node,) = out.graph.node
    props = {p.key: p.value for p in node.metadata_props}
    assert props[PROVENANCE_RULE] == "fold_batchnorm_into_conv" and props[PROVENANCE_REPLACED] == "bn1,conv1"
    new_out = model.graph.nodes[0].outputs[0]
    assert new_out.name == "y" and new_out.meta["graft.replaces"] == "y"  # the input model's name
    assert_same_outputs(proto, out, atol=1e-5)
    # the metadata survives a save/load and onnx.checker
    again = ir.to_onnx(ir.from_onnx(out))
    assert again.SerializeToString() == out.SerializeToString()


DETERMINISM = r"""
import hashlib, sys
import numpy as np
from graft import compiler
from graft.compiler import Const, Rule, Var, op
x = Var("x")
# a commutative rule (both input orders) and a pattern that binds several nodes
rules = [Rule("add_zero", op.Add(x, Const("z", where=lambda a: not a.any())), lambda op, m: m[x])]
res = compiler.compile(sys.argv[1], pipeline="optimize", rules=rules, verify=False)
print(hashlib.sha256(res.proto.SerializeToString()).hexdigest(), sum(res.counts.values()))
"""


def test_same_bytes_whatever_the_hash_seed(ppocr_det_path):
    outs = []
    for seed in ("0", "1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        p = subprocess.run([sys.executable, "-c", DETERMINISM, str(ppocr_det_path)], env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(p.stdout.split())
    assert outs[0] == outs[1] == outs[2]
    assert int(outs[0][1]) > 50  # the pipeline really rewrote the model


# --------------------------------------------------------------------------- definition-time errors
def test_unknown_op_name_is_reported_where_written():
    with pytest.raises(PatternError) as e:
        op.Convv(x, w)  # MARK-convv
    msg = str(e.value)
    assert msg.startswith(line_of("# MARK-convv") + ": unknown ONNX op 'Convv' in domain 'ai.onnx'; "
                          "did you mean 'Conv'?")
    op.domain("my.domain").Convv(x)  # other domains are not checked


def test_replacement_using_unbound_var():
    y = Var("y")

    def replacement(op, m):
        return op.Relu(m[y])  # MARK-unbound

    with pytest.raises(RuleDefinitionError) as e:
        Rule("uses_y", op.Neg(x), replacement)
    assert str(e.value) == (f"rule 'uses_y' ({line_of('# MARK-unbound', replacement)}): uses m[y] but the "
                            f"pattern never binds Var 'y'")


def test_unbound_node_name():
    def check(m):
        return m.fail("no", m.foo)  # MARK-foo

    with pytest.raises(RuleDefinitionError) as e:
        Rule("names_foo", op.Neg(x, name="neg"), lambda op, m: op.Relu(m[x]), check=check)
    assert str(e.value).startswith(f"rule 'names_foo' ({line_of('# MARK-foo', check)}): uses m.foo but the "
                                   f"pattern names no node 'foo' (named nodes: neg;")


def test_wrong_replacement_arity():
    def replacement(op):
        return op.Relu()

    with pytest.raises(RuleDefinitionError) as e:
        Rule("one_arg", op.Neg(x), replacement)
    where = f"{HERE}:{replacement.__code__.co_firstlineno}"
    assert str(e.value) == (f"rule 'one_arg' ({where}): replacement must take (op, m), it takes 1 argument(s)")
    with pytest.raises(RuleDefinitionError, match=r"rule 'bad check' \(.*test_engine.py:\d+\): rule name"):
        Rule("bad check", op.Neg(x), lambda op, m: m[x])


# --------------------------------------------------------------------------- explain, errors, refusals
def test_explain_nearest_miss():
    proto = build("""g (float[1,3,8,8] x, float[4,3,3,3] win) => (float[1,4,8,8] y1, float[1,4,8,8] y2,
            float[1,4,8,8] y3) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y1 = BatchNormalization (c1, gamma, beta, mean, var)
        c2 = Conv <pads = [1, 1, 1, 1]> (x, win, b)
        y2 = BatchNormalization (c2, gamma, beta, mean, var)
        r = Relu(c1)
        y3 = BatchNormalization (r, gamma, beta, mean, var)
    }""", w=f32(4, 3, 3, 3), b=f32(4), **bn_stats(4))
    model = ir.from_onnx(proto)
    hits, misses = explain(model, fold_batchnorm_into_conv)
    assert hits == []
    got = [(n.outputs[0].name, mi.reason) for n, mi in misses]
    assert [name for name, _ in got] == ["y1", "y2", "y3"]  # nearest first
    assert got[0][1] == "output 'c1' of Conv node (output 'c1') is also used by Relu node (output 'r') outside " \
                        "the pattern"
    assert "'win'" in got[1][1] and "not a constant" in got[1][1]
    assert got[2][1] == "pattern wants Conv here, found Relu (output 'r')"
    assert [mi.node.op_type for _, mi in misses] == ["Conv", "Conv", "Relu"]


def test_rule_raising_is_a_rule_error_and_leaves_graph_untouched():
    def replacement(op, m):
        op.Relu(m[x])
        op.const(np.ones(3))
        return 1 / 0  # MARK-raise

    boom = Rule("boom", op.Neg(x), replacement)
    model = ir.from_onnx(build(NEGS))
    before = snapshot(model)
    with pytest.raises(RuleError) as e:
        rewrite(model, [boom])
    msg = str(e.value)
    assert msg.startswith(f"rule 'boom' ({boom.where}): its replacement raised ZeroDivisionError: division by zero "
                          f"while rewriting Neg node")
    assert "(output 'n1')" in msg or "'Neg'" in msg
    assert snapshot(model) == before

    def check(m):
        raise KeyError("oops")

    with pytest.raises(RuleError, match=r"rule 'check_boom' .*its check raised KeyError: 'oops' while rewriting Neg"):
        rewrite(model, [Rule("check_boom", op.Neg(x), lambda op, m: m[x], check=check)])
    assert snapshot(model) == before


def test_refused_rewrites_leave_graph_untouched():
    model = ir.from_onnx(build(NEGS))
    before = snapshot(model)

    def refuse_in_replacement(op, m):
        op.Abs(op.Relu(m[x]))
        op.const(np.zeros(2, np.float32))
        return m.fail("changed my mind")

    def wrong_arity(op, m):
        return op.Relu(m[x]), op.Relu(m[x])

    res = rewrite(model, [Rule("refuse_check", op.Neg(x), lambda op, m: op.Relu(m[x]), check=lambda m: "no"),
                          Rule("refuse_late", op.Neg(x), refuse_in_replacement)])
    assert res.rewrites == 0 and res.stop_reason is StopReason.SATURATED
    assert snapshot(model) == before
    with pytest.raises(RuleError, match=r"replacement must return 1 Value\(s\) for the outputs of Neg node .*"
                                        r"got \(Value, Value\)"):
        rewrite(model, [Rule("two_for_one", op.Neg(x), wrong_arity)])
    assert snapshot(model) == before
    # Identity(graph input) as the model output: renaming would touch the interface, so it is refused
    proto = build("""g (float[4] a) => (float[4] y) { y = Neg(a) }""")
    model = ir.from_onnx(proto)
    before = snapshot(model)
    assert rewrite(model, [Rule("drop_neg", op.Neg(x), lambda op, m: m[x])]).rewrites == 0
    assert snapshot(model) == before


@pytest.mark.parametrize("build,message", [
    (lambda x, y: op.Relu(x, y), r"Relu has 2 inputs, but Relu takes at most 1 in any opset"),
    (lambda x, y: op.Relu(x, alpha=0.1), r"Relu has no attribute 'alpha' in any opset"),
    (lambda x, y: op.Conv(x, y, grop=2), r"Conv has no attribute 'grop' in any opset; did you mean 'group'\?"),
])
def test_pattern_that_could_never_match_is_rejected_where_written(build, message):
    x, y = Var("x"), Var("y")
    with pytest.raises(PatternError, match=r"test_engine\.py:\d+: .*" + message):
        build(x, y)
