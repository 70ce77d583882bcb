"""Constant folding (onnx.reference) and Shape/Size/Gather(Shape) folding.

Small models in ONNX text are folded, checked (full check), counted, and run
against the original in onnxruntime; the real-model test runs the whole
cleanup on the exported all-MiniLM-L6-v2.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser

from graft import ir
from graft.compiler import explain, rewrite
from graft.ir.shapes import infer_shapes
from conftest import assert_same_outputs, parse_model, with_initializers
from graft.rules import cleanup, constant_folding
from graft.rules.constant_folding import (MAX_ELEMENTS, fold_constants, fold_gather_of_shape, fold_shape,
                                    fold_size)
from graft.rules.dead_code import eliminate_dead_code

HEADER = '<ir_version: 10, opset_import: ["" : {opset}]>\n'
ALL = cleanup.RULES + constant_folding.RULES


def build(body: str, opset: int = 17, **arrays) -> onnx.ModelProto:
    text = HEADER.format(opset=opset) + body
    if arrays:
        return with_initializers(onnx.parser.parse_model(text), **arrays)
    return parse_model(text)


def fold(proto: onnx.ModelProto, rules=ALL):
    model = ir.from_onnx(proto)
    infer_shapes(model)
    result = rewrite(model, rules)
    eliminate_dead_code(model)
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    return out, result, model


def ops(proto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def inits(proto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def reason(model: ir.Model, rule) -> str:
    hits, misses = explain(model, rule)
    assert not hits
    return " | ".join(m.reason for _, m in misses)


# ---------------------------------------------------------------- fold_constants
def test_constant_subexpression_folds_to_one_initializer():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            c = Constant<value = float[2, 3] {1, 2, 3, 4, 5, 6}>()
            s = Sqrt(c)
            k = Mul(s, w)
            y = Add(x, k)
        }""", w=np.full((2, 3), 0.5, np.float32))
    out, result, _ = fold(proto)
    assert result.counts["fold_constants"] == 2  # Sqrt, then Mul
    assert ops(out) == Counter(Add=1)
    (folded,) = inits(out).values()  # w and the Constant are gone with the folded nodes
    assert folded.dtype == np.float32
    np.testing.assert_allclose(folded, np.sqrt(np.arange(1, 7, dtype=np.float32)).reshape(2, 3) * 0.5)
    assert_same_outputs(proto, out)


def test_folded_dtypes_are_the_onnx_defined_ones():
    proto = build("""
        g (float[3] x) => (float16[3] a, bool[3] b, int32[3] c, float[3] d) {
            i = Constant<value = int64[3] {1, 2, 3}>()
            h = Cast<to = 10>(i)
            a = Mul(h, hx)
            e = Equal(i, i)
            b = And(e, bx)
            n = Constant<value = int32[3] {7, 8, 9}>()
            q = Div(n, two)
            c = Add(q, cx)
            dd = Range(zero, three, one)
            d = Add(dd, x)
        }""", hx=np.ones(3, np.float16), bx=np.array([True, False, True]), two=np.array(2, np.int32),
        cx=np.zeros(3, np.int32), zero=np.array(0.0, np.float32), three=np.array(3.0, np.float32),
        one=np.array(1.0, np.float32))
    out, result, model = fold(proto, [fold_constants])
    assert ops(out) == Counter(Mul=1, And=1, Add=2)
    init = inits(out)
    folded = {n.output[0]: init[n.input[0]] for n in out.graph.node}  # first input was folded
    assert folded["a"].dtype == np.float16 and folded["a"].tolist() == [1, 2, 3]
    assert folded["b"].dtype == np.bool_ and folded["b"].all()
    assert folded["c"].dtype == np.int32 and folded["c"].tolist() == [3, 4, 4]  # integer Div truncates
    assert folded["d"].dtype == np.float32 and folded["d"].tolist() == [0, 1, 2]
    assert_same_outputs(proto, out)


def test_multi_output_split_folds():
    proto = build("""
        g (float[2] x) => (float[2] y) {
            c = Constant<value = float[4] {1, 2, 3, 4}>()
            p, q = Split<num_outputs = 2>(c)
            s = Sub(q, p)
            y = Mul(x, s)
        }""", opset=18)
    out, result, _ = fold(proto)
    assert ops(out) == Counter(Mul=1)
    np.testing.assert_array_equal(list(inits(out).values())[0], np.array([2, 2], np.float32))
    assert_same_outputs(proto, out)


def test_non_deterministic_op_not_folded():
    proto = build("""
        g (float[2, 3] x) => (float[2, 3] y) {
            r = RandomUniformLike(c)
            y = Add(x, r)
        }""", c=np.zeros((2, 3), np.float32))
    out, result, model = fold(proto, [fold_constants])
    assert ops(out)["RandomUniformLike"] == 1
    assert "non-deterministic" in reason(model, fold_constants)


def test_dequantize_linear_kept():
    proto = build("""
        g (float[4] x) => (float[4] y) {
            w = DequantizeLinear(q, s, z)
            y = Mul(x, w)
        }""", q=np.array([1, 2, 3, 4], np.int8), s=np.array(0.5, np.float32), z=np.array(0, np.int8))
    out, result, model = fold(proto, [fold_constants])
    assert ops(out) == Counter(DequantizeLinear=1, Mul=1)
    assert "QDQ" in reason(model, fold_constants)


def test_size_cap_refuses_constant_of_shape_before_evaluating():
    n = 2048 * 1024  # 2 M elements > MAX_ELEMENTS
    assert n > MAX_ELEMENTS
    proto = build("""
        g (float[2048, 1024] x) => (float[2048, 1024] y) {
            s = Constant<value = int64[2] {2048, 1024}>()
            z = ConstantOfShape<value = float[1] {1.0}>(s)
            y = Add(x, z)
        }""")
    out, result, model = fold(proto, [fold_constants])
    assert ops(out)["ConstantOfShape"] == 1
    assert "folding cap" in reason(model, fold_constants)


def test_growth_cap_refuses_expand_of_small_constant():
    proto = build("""
        g (float[300, 300] x) => (float[300, 300] y) {
            s = Constant<value = int64[2] {300, 300}>()
            e = Expand(one, s)
            y = Add(x, e)
        }""", one=np.array([1.5], np.float32))
    out, result, model = fold(proto, [fold_constants])
    assert ops(out) == Counter(Constant=1, Expand=1, Add=1)
    assert "would grow the weights" in reason(model, fold_constants)


def test_small_expand_is_folded():
    proto = build("""
        g (float[4, 4] x) => (float[4, 4] y) {
            s = Constant<value = int64[2] {4, 4}>()
            e = Expand(one, s)
            y = Add(x, e)
        }""", one=np.array([1.5], np.float32))
    out, result, _ = fold(proto, [fold_constants])
    assert ops(out) == Counter(Add=1)
    assert_same_outputs(proto, out)


def test_graph_output_not_folded_and_name_kept():
    proto = build("""
        g (float[2] x) => (float[2] y, float[2] k) {
            k = Neg(c)
            y = Add(x, k)
        }""", c=np.array([1.0, 2.0], np.float32))
    out, result, model = fold(proto, [fold_constants])
    assert ops(out) == Counter(Neg=1, Add=1)
    assert [o.name for o in out.graph.output] == ["y", "k"]
    assert "graph output" in reason(model, fold_constants)


# ---------------------------------------------------------------- Shape / Size / Gather(Shape)
def test_shape_chain_of_static_tensor_folds_away():
    # the exported-transformer idiom: Shape -> Gather -> Unsqueeze -> Concat -> Reshape
    proto = build("""
        g (float[2, 3, 4] x) => (float[2, 12] y) {
            s = Shape(x)
            i0 = Constant<value = int64 {0}>()
            d0 = Gather(s, i0)
            ax = Constant<value = int64[1] {0}>()
            u = Unsqueeze(d0, ax)
            m1 = Constant<value = int64[1] {-1}>()
            shp = Concat<axis = 0>(u, m1)
            y = Reshape(x, shp)
        }""")
    out, result, _ = fold(proto)
    assert result.counts["fold_shape"] == 1
    assert ops(out) == Counter(Reshape=1)
    np.testing.assert_array_equal(inits(out)[out.graph.node[0].input[1]], [2, -1])
    assert_same_outputs(proto, out)


def test_shape_with_start_end_and_size_fold():
    proto = build("""
        g (float[2, 3, 4] x) => (int64[2] y, int64 z) {
            s = Shape<start = -2>(x)
            y = Add(s, one)
            n = Size(x)
            z = Add(n, k)
        }""", opset=15, one=np.array([1, 1], np.int64), k=np.array(0, np.int64))
    out, result, _ = fold(proto, [fold_shape, fold_size])
    assert result.counts == Counter(fold_shape=1, fold_size=1)
    assert ops(out) == Counter(Add=2)
    consts = inits(out)
    by_op = {n.output[0]: n for n in out.graph.node}
    np.testing.assert_array_equal(consts[by_op["y"].input[0]], np.array([3, 4], np.int64))
    size = consts[by_op["z"].input[0]]
    assert size.dtype == np.int64 and size.shape == () and size == 24
    assert_same_outputs(proto, out)


def test_shape_of_symbolic_dims_kept_but_static_dim_gathered():
    proto = build("""
        g (float[N, 3, 4] x) => (int64 y, int64 z) {
            s = Shape(x)
            i2 = Constant<value = int64 {-1}>()
            y = Gather(s, i2)
            i0 = Constant<value = int64 {0}>()
            z = Gather(s, i0)
        }""")
    model = ir.from_onnx(proto)
    infer_shapes(model)
    # the Gathers' outputs are graph outputs here: refused (an initializer cannot take the name)
    assert "graph output" in reason(model, fold_gather_of_shape)
    proto = build("""
        g (float[N, 3, 4] x) => (int64 y, int64 z) {
            s = Shape(x)
            i2 = Constant<value = int64 {-1}>()
            g2 = Gather(s, i2)
            y = Neg(g2)
            i0 = Constant<value = int64 {0}>()
            g0 = Gather(s, i0)
            z = Neg(g0)
        }""")
    out, result, model = fold(proto)
    assert result.counts["fold_gather_of_shape"] == 1 and result.counts["fold_shape"] == 0
    # g2 = 4 is folded (Neg(4) is a graph output, so it stays a node); g0 = N stays
    assert ops(out) == Counter(Shape=1, Gather=1, Neg=2)
    assert "not static" in reason(model, fold_shape)
    assert "not all static" in reason(model, fold_gather_of_shape)
    assert_same_outputs(proto, out, dim_sizes={"N": 5})


def test_negative_dim_value_is_unknown_not_static():
    # PaddlePaddle exports write dim_value -1 for "unknown" (PP-OCR does): never fold it into a constant
    proto = build("""
        g (float[N, 3] x) => (int64[2] y) {
            s = Shape(x)
            y = Neg(s)
        }""")
    proto.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    onnx.checker.check_model(proto)
    out, result, model = fold(proto, [fold_shape, fold_gather_of_shape])
    assert result.rewrites == 0 and ops(out) == Counter(Shape=1, Neg=1)
    assert model.graph.inputs[0].shape == (-1, 3)  # kept as written
    assert "not static" in reason(model, fold_shape)


# ---------------------------------------------------------------- real model
def test_minilm_shrinks_and_agrees(minilm_onnx_path):
    proto = onnx.load(minilm_onnx_path)
    n0 = len(proto.graph.node)
    model = ir.from_onnx(proto)
    infer_shapes(model)
    result = rewrite(model, ALL)
    eliminate_dead_code(model)
    out = ir.to_onnx(model)
    counts = ops(out)
    assert counts["Constant"] == 0
    assert result.counts["constant_to_initializer"] == 235
    assert result.counts["fold_constants"] > 0 and result.counts["fold_gather_of_shape"] > 0
    assert len(out.graph.node) < n0 - 235  # more than the Constant nodes went
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 1000, (2, 16)).astype(np.int64),
             "attention_mask": np.ones((2, 16), np.int64)}
    res = assert_same_outputs(proto, out, atol=1e-4, feeds=feeds)
    assert res[0].shape == (2, 16, 384)
