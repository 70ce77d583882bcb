"""MatMul + Add -> Gemm fusion (graft.rules.fuse): where shapes allow it, and refusals where they do not."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import pytest

from graft import ir
from graft.compiler import PROVENANCE_RULE, explain, rewrite
from conftest import assert_same_outputs, with_initializers
from graft.rules import fold_batchnorm
from graft.rules.fuse import RULES, fuse_matmul_add_into_gemm

HEADER = '<ir_version: 10, opset_import: ["" : {opset}]>\n'


def build(body: str, opset: int = 17, **arrays) -> onnx.ModelProto:
    return with_initializers(onnx.parser.parse_model(HEADER.format(opset=opset) + body), **arrays)


def fuse(proto: onnx.ModelProto, rules=RULES):
    model = ir.from_onnx(proto)
    result = rewrite(model, rules)
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def op_counts(proto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def nearest_reason(proto, rule=fuse_matmul_add_into_gemm) -> str:
    hits, misses = explain(ir.from_onnx(proto), rule)
    assert not hits
    return misses[0][1].reason


def assert_refused(proto, reason: str):
    out, result = fuse(proto)
    assert result.rewrites == 0
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in proto.graph.node]
    got = nearest_reason(proto)
    assert reason in got, got


RNG = np.random.default_rng(0)
W = RNG.normal(size=(5, 4)).astype(np.float32)


@pytest.mark.parametrize("c_shape", [(), (4,), (1, 4), (3, 4), (3, 1), (1, 1)])
@pytest.mark.parametrize("order", ["matmul_first", "c_first"])
def test_fuse(c_shape, order):
    add = "y = Add (t, C)" if order == "matmul_first" else "y = Add (C, t)"
    proto = build(f"""
        g (float[3, 5] a) => (float[3, 4] y) {{
            t = MatMul (a, W)
            {add}
        }}""", W=W, C=RNG.normal(size=c_shape).astype(np.float32))
    out, result = fuse(proto)
    assert result.counts == {"fuse_matmul_add_into_gemm": 1}
    assert op_counts(out) == {"Gemm": 1}
    gemm = out.graph.node[0]
    assert list(gemm.input) == ["a", "W", "C"] and list(gemm.output) == ["y"]
    assert not gemm.attribute  # alpha = beta = 1, no transposes: the schema defaults
    assert {p.key: p.value for p in gemm.metadata_props}[PROVENANCE_RULE] == "fuse_matmul_add_into_gemm"
    assert_same_outputs(proto, out, atol=1e-5)


def test_fuse_symbolic_rows_and_runtime_bias():
    """M symbolic, C a graph input (not a constant) of shape (N,) and a (M, N) one with the same symbol."""
    proto = build("""
        g (float[M, 5] a, float[4] c, float[M, 4] d) => (float[M, 4] y, float[M, 4] z) {
            t = MatMul (a, W)
            y = Add (t, c)
            s = MatMul (a, W)
            z = Add (d, s)
        }""", W=W)
    out, result = fuse(proto)
    assert result.counts == {"fuse_matmul_add_into_gemm": 2}
    assert op_counts(out) == {"Gemm": 2}
    assert_same_outputs(proto, out, atol=1e-5, dim_sizes={"M": 7})


def test_fuse_float16():
    proto = build("""
        g (float16[2, 5] a) => (float16[2, 4] y) {
            t = MatMul (a, W)
            y = Add (t, C)
        }""", W=W.astype(np.float16), C=RNG.normal(size=4).astype(np.float16))
    out, result = fuse(proto)
    assert op_counts(out) == {"Gemm": 1}
    assert_same_outputs(proto, out, atol=1e-2)


def test_rank_from_value_info():
    """A is a Relu output: its rank is known only once shape inference has written value_info."""
    text = """
        g (float[3, 5] x) => (float[3, 4] y) {
            a = Relu (x)
            t = MatMul (a, W)
            y = Add (t, C)
        }"""
    proto = build(text, W=W, C=RNG.normal(size=4).astype(np.float32))
    assert_refused(proto, "rank of MatMul")
    assert "is unknown" in nearest_reason(proto)
    inferred = onnx.shape_inference.infer_shapes(proto)
    out, result = fuse(inferred)
    assert result.counts == {"fuse_matmul_add_into_gemm": 1}
    assert op_counts(out) == {"Relu": 1, "Gemm": 1}
    assert_same_outputs(proto, out, atol=1e-5)


def test_rank_from_compiler_shapes():
    """The same model typed in the IR by graft.ir.shapes.infer_shapes."""
    from graft.ir.shapes import infer_shapes

    proto = build("""
        g (float[3, 5] x) => (float[3, 4] y) {
            a = Relu (x)
            t = MatMul (a, W)
            y = Add (t, C)
        }""", W=W, C=RNG.normal(size=4).astype(np.float32))
    model = ir.from_onnx(proto)
    assert infer_shapes(model) > 0
    assert rewrite(model, RULES).counts == {"fuse_matmul_add_into_gemm": 1}
    out = ir.to_onnx(model)
    assert op_counts(out) == {"Relu": 1, "Gemm": 1}
    assert_same_outputs(proto, out, atol=1e-5)


def test_both_addends_are_matmuls():
    """Add(MatMul(x, Y), MatMul(z, W)) with Y not constant: the engine tries Add's other order and fuses there."""
    proto = build("""
        g (float[3, 5] x, float[5, 4] y_w, float[3, 5] z) => (float[3, 4] y) {
            p = MatMul (x, y_w)
            q = MatMul (z, W)
            y = Add (p, q)
        }""", W=W)
    assert_refused(proto, "shape of Add")  # p's shape, hence C's broadcast, is unknown without value_info
    out, result = fuse(onnx.shape_inference.infer_shapes(proto))
    assert result.counts == {"fuse_matmul_add_into_gemm": 1}
    assert op_counts(out) == {"MatMul": 1, "Gemm": 1}
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert list(gemm.input) == ["z", "W", "p"]
    assert_same_outputs(proto, out, atol=1e-5)


def test_refuses_rank3_activation():
    proto = build("""
        g (float[2, 3, 5] a) => (float[2, 3, 4] y) {
            t = MatMul (a, W)
            y = Add (t, C)
        }""", W=W, C=RNG.normal(size=4).astype(np.float32))
    assert_refused(proto, "has rank 3; Gemm needs a 2-D A")


def test_refuses_bias_that_grows_the_output():
    """(1, 5) @ (5, 4) + (3, 4) is (3, 4): Gemm's C may not broadcast Y."""
    proto = build("""
        g (float[1, 5] a) => (float[3, 4] y) {
            t = MatMul (a, W)
            y = Add (t, C)
        }""", W=W, C=RNG.normal(size=(3, 4)).astype(np.float32))
    assert_refused(proto, "is not unidirectionally broadcastable to the MatMul's output shape [1, 4]")


def test_refuses_rank3_bias():
    proto = build("""
        g (float[3, 5] a) => (float[1, 3, 4] y) {
            t = MatMul (a, W)
            y = Add (t, C)
        }""", W=W, C=RNG.normal(size=(1, 1, 4)).astype(np.float32))
    assert_refused(proto, "of shape [1, 1, 4] is not unidirectionally broadcastable")


def test_refuses_unknown_rows_in_bias():
    """C (M2, 4) against A (M, 5): different symbols may differ at run time."""
    proto = build("""
        g (float[M, 5] a, float[M2, 4] c) => (float[?, 4] y) {
            t = MatMul (a, W)
            y = Add (t, c)
        }""", W=W)
    assert_refused(proto, "of shape ['M2', 4] is not unidirectionally broadcastable")


def test_refuses_integer_matmul():
    proto = build("""
        g (int32[3, 5] a) => (int32[3, 4] y) {
            t = MatMul (a, W)
            y = Add (t, C)
        }""", W=np.arange(20, dtype=np.int32).reshape(5, 4), C=np.arange(4, dtype=np.int32))
    assert_refused(proto, "only floating-point MatMul+Add is fused")


def test_refuses_non_constant_weight():
    proto = build("""
        g (float[3, 5] a, float[5, 4] w) => (float[3, 4] y) {
            t = MatMul (a, w)
            y = Add (t, C)
        }""", C=RNG.normal(size=4).astype(np.float32))
    assert_refused(proto, "is not a constant")


def test_refuses_escaping_matmul_output():
    proto = build("""
        g (float[3, 5] a) => (float[3, 4] y, float[3, 4] z) {
            t = MatMul (a, W)
            y = Add (t, C)
            z = Relu (t)
        }""", W=W, C=RNG.normal(size=4).astype(np.float32))
    assert_refused(proto, "also used by Relu")


def test_fuse_and_fold_batchnorm_end_in_one_gemm():
    """MatMul + Add + BN with both rule modules: whichever fires first, one Gemm remains."""
    rng = np.random.default_rng(1)
    proto = build("""
        g (float[3, 5] a) => (float[3, 4] y) {
            t = MatMul (a, W)
            u = Add (t, C)
            y = BatchNormalization (u, gamma, beta, mean, var)
        }""", W=W, C=rng.normal(size=4).astype(np.float32), gamma=rng.uniform(0.5, 1.5, 4).astype(np.float32),
        beta=rng.normal(size=4).astype(np.float32), mean=rng.normal(size=4).astype(np.float32),
        var=rng.uniform(0.3, 2, 4).astype(np.float32))
    out, result = fuse(proto, [*RULES, *fold_batchnorm.RULES])
    assert op_counts(out) == {"Gemm": 1}
    assert sum(result.counts.values()) == 2
    assert_same_outputs(proto, out, atol=1e-5)


def test_ppocr_cls_classifier_head(ppocr_cls_path):
    """The cls head is Reshape -> MatMul -> Add; the Reshape's target shape is computed at run time, so
    A's rank is unknown until value_info says it is 2-D."""
    proto = onnx.load(ppocr_cls_path)
    assert_refused(proto, "rank of MatMul")
    mm = next(n for n in proto.graph.node if n.op_type == "MatMul")
    typed = onnx.ModelProto()
    typed.CopyFrom(proto)
    typed.graph.value_info.append(onnx.helper.make_tensor_value_info(mm.input[0], onnx.TensorProto.FLOAT,
                                                                     ["N", None]))
    out, result = fuse(typed)
    assert result.counts == {"fuse_matmul_add_into_gemm": 1}
    assert op_counts(out)["Gemm"] == 1 and op_counts(out)["MatMul"] == 0
    assert len(out.graph.node) == len(proto.graph.node) - 1
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype(np.float32)
    assert_same_outputs(proto, out, atol=1e-5, feeds={"x": x})
