"""Cleanup rules: Identity, Dropout, no-op Cast/Reshape/Transpose, Transpose pairs, Constant nodes.

Each case builds a model in ONNX text, runs graft.rules.cleanup (after infer_shapes),
checks the exported ONNX (full check), the op counts and the graph-output
names, and compares outputs with the original in onnxruntime.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import given, settings, strategies as st
from onnx.reference import ReferenceEvaluator

from graft import ir
from graft.compiler import PROVENANCE_RULE, explain, rewrite
from graft.ir import zoo
from graft.ir.shapes import infer_shapes
from conftest import assert_same_outputs, parse_model, with_initializers
from graft.rules import cleanup

HEADER = '<ir_version: 10, opset_import: ["" : {opset}]>\n'


def build(body: str, opset: int = 17, **arrays) -> onnx.ModelProto:
    text = HEADER.format(opset=opset) + body
    if arrays:
        return with_initializers(onnx.parser.parse_model(text), **arrays)
    return parse_model(text)


def clean(proto: onnx.ModelProto, rules=cleanup.RULES, shapes: bool = True):
    """(rewritten ONNX, RewriteResult, IR model); the output passes the full checker."""
    model = ir.from_onnx(proto)
    if shapes:
        infer_shapes(model)
    result = rewrite(model, rules)
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    return out, result, model


def ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def outputs(proto: onnx.ModelProto) -> list[str]:
    return [o.name for o in proto.graph.output]


def reason(model: ir.Model, rule) -> str:
    hits, misses = explain(model, rule)
    assert not hits
    return " | ".join(m.reason for _, m in misses)


# ---------------------------------------------------------------- Identity
def test_identity_removed_and_graph_output_name_kept():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Identity(x)
            b = Relu(a)
            y = Identity(b)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["remove_identity"] == 2
    assert ops(out) == Counter(Relu=1)
    assert outputs(out) == ["y"]
    assert out.graph.node[0].output[0] == "y"  # Relu now produces the output under its name
    assert_same_outputs(proto, out)


def test_graph_output_keeps_its_declared_shape_when_renamed():
    # a's rank is unknown (the Reshape target has unknown length): y's declared [2, 3] must survive
    proto = build("""
        g (float[6] x, int64[K] s) => (float[2, 3] y) {
            a = Reshape(x, s)
            y = Identity(a)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["remove_identity"] == 1 and ops(out) == Counter(Reshape=1)
    (y,) = out.graph.output
    assert y.name == "y" and [d.dim_value for d in y.type.tensor_type.shape.dim] == [2, 3]
    feeds = {"x": np.arange(6, dtype=np.float32), "s": np.array([2, 3], np.int64)}
    assert_same_outputs(proto, out, feeds=feeds)


def test_identity_of_graph_input_as_graph_output_is_kept():
    # removing it would rename the model input or the output: the engine refuses
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            y = Identity(x)
        }""")
    out, result, _ = clean(proto)
    assert result.rewrites == 0
    assert ops(out) == Counter(Identity=1)
    assert [i.name for i in out.graph.input] == ["x"] and outputs(out) == ["y"]


# ---------------------------------------------------------------- Dropout
def test_dropout_inference_removed_opset13():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            d = Dropout(x)
            y = Relu(d)
        }""", opset=13)
    out, result, _ = clean(proto)
    assert result.counts["remove_dropout"] == 1
    assert ops(out) == Counter(Relu=1)
    assert_same_outputs(proto, out)


def test_dropout_training_mode_false_constant_removed_mask_unused():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            r = Constant<value = float {0.5}>()
            t = Constant<value = bool {0}>()
            d, mask = Dropout(x, r, t)
            y = Relu(d)
        }""", opset=13)
    out, result, _ = clean(proto, [cleanup.remove_dropout])
    assert result.counts["remove_dropout"] == 1
    assert ops(out) == Counter(Relu=1)  # the Constants went with the Dropout
    assert_same_outputs(proto, out)


def test_dropout_training_mode_true_kept():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            r = Constant<value = float {0.5}>()
            t = Constant<value = bool {1}>()
            d = Dropout(x, r, t)
            y = Relu(d)
        }""", opset=13)
    out, result, model = clean(proto, [cleanup.remove_dropout])
    assert result.rewrites == 0 and ops(out)["Dropout"] == 1
    assert "training mode" in reason(model, cleanup.remove_dropout)


def test_dropout_training_mode_with_ratio_zero_removed():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            r = Constant<value = float {0.0}>()
            t = Constant<value = bool {1}>()
            d = Dropout(x, r, t)
            y = Relu(d)
        }""", opset=13)
    out, result, _ = clean(proto, [cleanup.remove_dropout])
    assert result.counts["remove_dropout"] == 1 and ops(out) == Counter(Relu=1)


def test_dropout_training_mode_input_not_constant_kept():
    proto = build("""
        g (float[2, 3] x, bool t) => (float[2, 3] y) {
            r = Constant<value = float {0.5}>()
            d = Dropout(x, r, t)
            y = Relu(d)
        }""", opset=13)
    out, result, model = clean(proto, [cleanup.remove_dropout])
    assert result.rewrites == 0
    assert ("training_mode 't' of Dropout (output 'd') is not a constant (a graph input callers may override)"
            in reason(model, cleanup.remove_dropout))


def test_dropout_with_used_mask_kept():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y, bool[2, 3] mask) {
            d, mask = Dropout(x)
            y = Relu(d)
        }""", opset=13)
    out, result, model = clean(proto, [cleanup.remove_dropout])
    assert result.rewrites == 0 and ops(out)["Dropout"] == 1
    assert "mask" in reason(model, cleanup.remove_dropout)


def test_dropout_opset10_always_inference():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            d = Dropout<ratio = 0.3>(x)
            y = Relu(d)
        }""", opset=10)
    out, result, _ = clean(proto, [cleanup.remove_dropout])
    assert result.counts["remove_dropout"] == 1 and ops(out) == Counter(Relu=1)
    assert_same_outputs(proto, out)


def test_dropout_opset6_follows_is_test():
    body = """
        g (float[2, 3] x) => (float[2, 3] y) {{
            d = Dropout<is_test = {is_test}>(x)
            y = Relu(d)
        }}"""
    out, result, _ = clean(build(body.format(is_test=1), opset=6), [cleanup.remove_dropout], shapes=False)
    assert result.counts["remove_dropout"] == 1 and ops(out) == Counter(Relu=1)
    out, result, model = clean(build(body.format(is_test=0), opset=6), [cleanup.remove_dropout], shapes=False)
    assert result.rewrites == 0
    assert "is_test=0" in reason(model, cleanup.remove_dropout)


# ---------------------------------------------------------------- Cast
def test_noop_cast_removed_dtype_changing_cast_kept():
    proto = build("""
        g (float[2, 3] x) => (float16[2, 3] y) {
            a = Cast<to = 1>(x)
            b = Relu(a)
            y = Cast<to = 10>(b)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["remove_noop_cast"] == 1
    assert ops(out) == Counter(Relu=1, Cast=1)
    assert [a.i for a in out.graph.node[-1].attribute] == [10]
    assert outputs(out) == ["y"]
    assert_same_outputs(proto, out)


def test_cast_with_unknown_input_dtype_kept():
    proto = onnx.parser.parse_model(HEADER.format(opset='17, "my.ops" : 1') + """
        g (float[2, 3] x) => (float[2, 3] y) {
            a = my.ops.Mystery(x)
            y = Cast<to = 1>(a)
        }""")
    model = ir.from_onnx(proto)
    infer_shapes(model)
    assert rewrite(model, [cleanup.remove_noop_cast]).rewrites == 0
    assert "unknown" in reason(model, cleanup.remove_noop_cast)


def test_noop_castlike_removed():
    proto = build("""
        g (float[2, 3] x, float[1] z) => (float[2, 3] y) {
            a = CastLike(x, z)
            y = Relu(a)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["remove_noop_castlike"] == 1 and ops(out) == Counter(Relu=1)
    assert_same_outputs(proto, out)


# ---------------------------------------------------------------- Reshape
def test_noop_reshape_static_shapes_removed():
    proto = build("""
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            s = Constant<value = int64[3] {2, 3, -1}>()
            a = Reshape(x, s)
            y = Relu(a)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["remove_noop_reshape"] == 1 and ops(out) == Counter(Relu=1)
    assert_same_outputs(proto, out)


def test_noop_reshape_symbolic_batch_with_zero_copy():
    # 0 copies N (allowzero = 0), 4 equals, -1 is the remaining 8; with allowzero = 1 the
    # same 0 would mean a literal 0 (see test_reshape_with_allowzero_or_rank_change_kept)
    proto = build("""
        g (float[N, 4, 8] x) => (float[N, 4, 8] y) {
            s = Constant<value = int64[3] {0, 4, -1}>()
            a = Reshape(x, s)
            y = Relu(a)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["remove_noop_reshape"] == 1 and ops(out) == Counter(Relu=1)
    assert_same_outputs(proto, out, dim_sizes={"N": 3})


def test_reshape_with_allowzero_or_rank_change_kept():
    proto = build("""
        g (float[N, 4, 8] x) => (float[M, 8] y, float[0, 4, 8] z) {
            s = Constant<value = int64[2] {-1, 8}>()
            y = Reshape(x, s)
            s0 = Constant<value = int64[3] {0, 4, 8}>()
            z = Reshape<allowzero = 1>(x, s0)
        }""", opset=17)
    out, result, model = clean(proto, [cleanup.remove_noop_reshape])
    assert result.rewrites == 0 and ops(out)["Reshape"] == 2
    assert "not provably the identity" in reason(model, cleanup.remove_noop_reshape)


def test_reshape_pair_collapses_to_one():
    proto = build("""
        g (float[2, 3, 4] x) => (float[4, 6] y) {
            s1 = Constant<value = int64[2] {6, 4}>()
            a = Reshape(x, s1)
            s2 = Constant<value = int64[2] {4, -1}>()
            y = Reshape(a, s2)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["collapse_reshape_pair"] == 1
    assert ops(out) == Counter(Reshape=1)
    assert out.graph.node[0].input[0] == "x" and outputs(out) == ["y"]
    assert_same_outputs(proto, out)


def test_reshape_pair_with_zero_in_outer_shape_kept():
    proto = build("""
        g (float[2, 3, 4] x) => (float[6, 4] y) {
            s1 = Constant<value = int64[2] {6, 4}>()
            a = Reshape(x, s1)
            s2 = Constant<value = int64[2] {0, 4}>()
            y = Reshape(a, s2)
        }""")
    out, result, model = clean(proto, [cleanup.collapse_reshape_pair])
    assert result.rewrites == 0 and ops(out)["Reshape"] == 2
    assert "has a 0" in reason(model, cleanup.collapse_reshape_pair)


# ---------------------------------------------------------------- Transpose
def test_transpose_pair_identity_removed():
    proto = build("""
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            a = Transpose<perm = [0, 2, 1]>(x)
            b = Transpose<perm = [0, 2, 1]>(a)
            y = Relu(b)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["cancel_transpose_pair"] == 1
    assert ops(out) == Counter(Relu=1)
    assert_same_outputs(proto, out)


def test_transpose_pair_default_perms_cancel():
    proto = build("""
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            a = Transpose(x)
            b = Transpose(a)
            y = Relu(b)
        }""")
    out, result, _ = clean(proto)
    assert ops(out) == Counter(Relu=1)
    assert_same_outputs(proto, out)


def test_non_identity_transpose_pair_becomes_one_transpose():
    proto = build("""
        g (float[2, 3, 4, 5] x) => (float[4, 2, 5, 3] y) {
            a = Transpose<perm = [1, 0, 2, 3]>(x)
            y = Transpose<perm = [2, 1, 3, 0]>(a)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["cancel_transpose_pair"] == 1
    assert ops(out) == Counter(Transpose=1)
    node = out.graph.node[0]
    assert list(node.attribute[0].ints) == [2, 0, 3, 1]  # q[i] = p1[p2[i]]
    assert node.input[0] == "x" and outputs(out) == ["y"]
    assert {p.key: p.value for p in node.metadata_props}[PROVENANCE_RULE] == "cancel_transpose_pair"
    assert_same_outputs(proto, out)


def test_identity_perm_transpose_removed():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Transpose<perm = [0, 1]>(x)
            y = Relu(a)
        }""")
    out, result, _ = clean(proto)
    assert result.counts["remove_noop_transpose"] == 1 and ops(out) == Counter(Relu=1)


# ---------------------------------------------------------------- Constant
def test_constant_nodes_become_initializers():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            c = Constant<value = float[2, 3] {1, 2, 3, 4, 5, 6}>()
            f = Constant<value_float = 2.0>()
            a = Add(x, c)
            y = Mul(a, f)
        }""")
    out, result, _ = clean(proto, [cleanup.constant_to_initializer])
    assert result.counts["constant_to_initializer"] == 2
    assert ops(out) == Counter(Add=1, Mul=1)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert len(inits) == 2
    arrays = sorted(inits.values(), key=lambda a: a.size)
    assert arrays[0].dtype == np.float32 and arrays[0].shape == () and arrays[0] == 2.0
    np.testing.assert_array_equal(arrays[1], np.arange(1, 7, dtype=np.float32).reshape(2, 3))
    assert_same_outputs(proto, out)


def test_constant_that_is_a_graph_output_stays_a_node():
    proto = build("""
        g (float[2] x) => (float[2] y, float[2] c) {
            c = Constant<value = float[2] {1, 2}>()
            y = Add(x, c)
        }""")
    out, result, _ = clean(proto, [cleanup.constant_to_initializer])
    assert ops(out) == Counter(Constant=1, Add=1)
    assert outputs(out) == ["y", "c"]
    assert_same_outputs(proto, out)


# ---------------------------------------------------------------- real models
@pytest.mark.parametrize("name, shape", [("ppocr-cls", (1, 3, 48, 192)), ("ppocr-det", (1, 3, 64, 64)),
                                         ("ppocr-rec", (1, 3, 48, 64))])
def test_ppocr_models_lose_their_constant_nodes_and_agree(name, shape):
    proto = onnx.load(zoo.ppocr_path(name))
    n_constants = ops(proto)["Constant"]
    out, result, _ = clean(proto)
    assert n_constants > 0 and result.counts["constant_to_initializer"] == n_constants
    assert ops(out)["Constant"] == 0
    assert len(out.graph.node) <= len(proto.graph.node) - n_constants
    assert [o.name for o in out.graph.output] == outputs(proto)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert_same_outputs(proto, out, feeds={proto.graph.input[0].name: x})


# ---------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(st.permutations(range(4)), st.permutations(range(4)))
def test_any_transpose_pair_becomes_at_most_one_equivalent_transpose(p1, p2):
    proto = build(f"""
        g (float[2, 3, 4, 5] x) => (float[A, B, C, D] y) {{
            a = Transpose<perm = {list(p1)}>(x)
            b = Transpose<perm = {list(p2)}>(a)
            y = Neg(b)
        }}""")
    out, result, _ = clean(proto, [cleanup.cancel_transpose_pair])
    identity = [p1[i] for i in p2] == list(range(4))
    assert ops(out) == (Counter(Neg=1) if identity else Counter(Transpose=1, Neg=1))
    assert_same_outputs(proto, out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_reshape_is_identity_agrees_with_the_reference_reshape(in_shape, data):
    # a target built from each dim, a 0 (copy), a single -1, or another size
    target = [data.draw(st.sampled_from([d, 0, d + 1, 1])) for d in in_shape]
    if data.draw(st.booleans()):
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    allowzero = data.draw(st.sampled_from([0, 1]))
    if allowzero and 0 in target and -1 in target:
        return  # invalid per the spec
    x = np.zeros(in_shape, np.float32)
    node = onnx.helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=allowzero)
    try:
        (y,) = ReferenceEvaluator(node, opsets={"": 17}).run(None, {"x": x, "s": np.array(target, np.int64)})
    except Exception:
        return  # the target does not fit the element count
    expected = tuple(y.shape) == tuple(in_shape)
    assert cleanup.reshape_is_identity(tuple(in_shape), target, allowzero) == expected
