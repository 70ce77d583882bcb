"""BatchNormalization folding into Conv, ConvTranspose, Gemm and MatMul(+Add).

Each case builds a model in ONNX text, rewrites it with graft.rules.fold_batchnorm,
checks the exported ONNX (full check), counts ops, and compares outputs with the
original in onnxruntime.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
from onnx.reference import ReferenceEvaluator
import pytest
from hypothesis import given, settings, strategies as st

from graft import ir
from graft.compiler import PROVENANCE_REPLACED, PROVENANCE_RULE, explain, rewrite
from conftest import assert_same_outputs, with_initializers
from graft.rules.fold_batchnorm import (RULES, fold_batchnorm_into_conv, fold_batchnorm_into_conv_transpose,
                                  fold_batchnorm_into_gemm, fold_batchnorm_into_matmul,
                                  fold_batchnorm_into_matmul_add)

HEADER = '<ir_version: 10, opset_import: ["" : {opset}]>\n'


def build(body: str, opset: int = 17, **arrays) -> onnx.ModelProto:
    return with_initializers(onnx.parser.parse_model(HEADER.format(opset=opset) + body), **arrays)


def bn_stats(rng, c: int, dtype=np.float32) -> dict:
    """Non-trivial inference statistics: gamma in [0.5, 1.5], positive var."""
    return dict(gamma=rng.uniform(0.5, 1.5, c).astype(dtype), beta=rng.normal(size=c).astype(dtype),
                mean=rng.normal(size=c).astype(dtype), var=rng.uniform(0.3, 2.0, c).astype(dtype))


def fold(proto: onnx.ModelProto, rules=RULES):
    """(rewritten ONNX, RewriteResult, IR model); the output passes the full checker."""
    model = ir.from_onnx(proto)
    result = rewrite(model, rules)
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    return out, result, model


def op_counts(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def rank_str(r: int) -> str:
    return "[" + ", ".join(["?"] * r) + "]"


def nearest_reason(proto: onnx.ModelProto, rule) -> str:
    hits, misses = explain(ir.from_onnx(proto), rule)
    assert not hits
    return misses[0][1].reason


# ---------------------------------------------------------------- Conv
SPATIAL = {1: [10], 2: [6, 5], 3: [4, 3, 4]}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("c_in,c_out,group", [(4, 6, 1), (4, 6, 2), (4, 4, 4), (3, 6, 3)],
                         ids=["dense", "grouped", "depthwise", "depthwise_x2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_fold(dims, c_in, c_out, group, bias):
    rng = np.random.default_rng(dims * 100 + group * 10 + bias)
    spatial = SPATIAL[dims]
    pads = ", ".join(["1"] * 2 * dims)
    inputs = "x, W, B" if bias else "x, W"
    proto = build(f"""
        g (float[N, {c_in}, {", ".join(map(str, spatial))}] x) => (float{rank_str(dims + 2)} y) {{
            c = Conv <group = {group}, pads = [{pads}]> ({inputs})
            y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
        }}""",
        W=(rng.normal(size=(c_out, c_in // group, *[3] * dims)) * 0.3).astype(np.float32),
        **({"B": rng.normal(size=c_out).astype(np.float32)} if bias else {}),
        **bn_stats(rng, c_out))
    out, result, model = fold(proto)
    assert result.counts == {"fold_batchnorm_into_conv": 1}
    assert op_counts(out) == {"Conv": 1}
    conv = out.graph.node[0]
    assert len(conv.input) == 3  # the folded shift always becomes a bias
    assert {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}["group"] == group
    props = {p.key: p.value for p in conv.metadata_props}
    assert props[PROVENANCE_RULE] == "fold_batchnorm_into_conv"
    assert props[PROVENANCE_REPLACED] == "y,c"  # unnamed nodes are named by their outputs
    assert {i.name for i in out.graph.initializer} == set(conv.input[1:])  # originals dropped
    assert_same_outputs(proto, out, atol=1e-5)


def test_conv_fold_float64_keeps_dtype():
    rng = np.random.default_rng(3)
    proto = build("""
        g (double[1, 2, 5, 5] x) => (double[1, 3, 3, 3] y) {
            c = Conv (x, W)
            y = BatchNormalization (c, gamma, beta, mean, var)
        }""", W=rng.normal(size=(3, 2, 3, 3)), **bn_stats(rng, 3, np.float64))
    out, result, _ = fold(proto)
    assert op_counts(out) == {"Conv": 1}
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in out.graph.initializer)
    # onnxruntime's CPU provider has no double Conv: compare in the ONNX reference evaluator
    x = np.random.default_rng(0).normal(size=(1, 2, 5, 5))
    want, = ReferenceEvaluator(proto).run(None, {"x": x})
    got, = ReferenceEvaluator(out).run(None, {"x": x})
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_shared_weight_is_not_modified():
    """W feeds two Convs; only one is followed by BN. The other keeps the original weight."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.3
    proto = build("""
        g (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y, float[1, 4, 6, 6] z) {
            c = Conv <pads = [1, 1, 1, 1]> (x, W)
            y = BatchNormalization (c, gamma, beta, mean, var)
            z = Conv <pads = [1, 1, 1, 1]> (x, W)
        }""", W=w, **bn_stats(rng, 4))
    out, result, model = fold(proto)
    assert result.counts == {"fold_batchnorm_into_conv": 1}
    assert op_counts(out) == {"Conv": 2}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(inits["W"], w)
    z_conv = next(n for n in out.graph.node if n.output[0] == "z")
    assert z_conv.input[1] == "W"
    folded = next(n for n in out.graph.node if n.output[0] == "y")
    assert folded.input[1] != "W"
    assert_same_outputs(proto, out, atol=1e-5)


# ---------------------------------------------------------------- ConvTranspose
@settings(max_examples=16, deadline=None, derandomize=True)
@given(dims=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]), c_in_g=st.integers(1, 3),
       c_out_g=st.integers(1, 3), stride=st.integers(1, 2), bias=st.booleans())
def test_conv_transpose_fold(dims, group, c_in_g, c_out_g, stride, bias):
    rng = np.random.default_rng(group * 31 + c_in_g * 7 + c_out_g + stride * 101 + dims * 1001)
    c_in, c_out = c_in_g * group, c_out_g * group
    spatial = [5, 4][:dims]
    strides = ", ".join([str(stride)] * dims)
    proto = build(f"""
        g (float[N, {c_in}, {", ".join(map(str, spatial))}] x) => (float{rank_str(dims + 2)} y) {{
            c = ConvTranspose <group = {group}, strides = [{strides}]> ({"x, W, B" if bias else "x, W"})
            y = BatchNormalization (c, gamma, beta, mean, var)
        }}""",
        W=(rng.normal(size=(c_in, c_out_g, *[3] * dims)) * 0.5).astype(np.float32),
        **({"B": rng.normal(size=c_out).astype(np.float32)} if bias else {}),
        **bn_stats(rng, c_out))
    out, result, _ = fold(proto)
    assert result.counts == {"fold_batchnorm_into_conv_transpose": 1}
    assert op_counts(out) == {"ConvTranspose": 1}
    assert_same_outputs(proto, out, atol=1e-5)


# ---------------------------------------------------------------- Gemm
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (5,), (1, 5), (3, 5), (3, 1)],
                         ids=["noC", "scalar", "N", "1xN", "MxN", "Mx1"])
def test_gemm_fold(trans_a, trans_b, c_shape):
    m_, k, n = 3, 4, 5
    rng = np.random.default_rng(trans_a + 2 * trans_b + (0 if c_shape is None else 4 + len(c_shape)))
    a_shape = (k, m_) if trans_a else (m_, k)
    b_shape = (n, k) if trans_b else (k, n)
    arrays = dict(Bw=rng.normal(size=b_shape).astype(np.float32), **bn_stats(rng, n))
    if c_shape is not None:
        arrays["C"] = rng.normal(size=c_shape).astype(np.float32)
    inputs = "a, Bw, C" if c_shape is not None else "a, Bw"
    proto = build(f"""
        g (float[{a_shape[0]}, {a_shape[1]}] a) => (float[{m_}, {n}] y) {{
            t = Gemm <alpha = 0.7, beta = 1.3, transA = {trans_a}, transB = {trans_b}> ({inputs})
            y = BatchNormalization <epsilon = 0.01> (t, gamma, beta, mean, var)
        }}""", **arrays)
    out, result, _ = fold(proto)
    assert result.counts == {"fold_batchnorm_into_gemm": 1}
    assert op_counts(out) == {"Gemm": 1}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["beta"] == 1.0 and abs(attrs["alpha"] - 0.7) < 1e-7
    assert (attrs["transA"], attrs["transB"]) == (trans_a, trans_b)
    assert_same_outputs(proto, out, atol=1e-5)


# ---------------------------------------------------------------- MatMul (+ Add)
@pytest.mark.parametrize("add,bias_shape", [(None, None)] + [
    (order, shape) for order in ("x_first", "bias_first") for shape in [(6,), (1, 6), (4, 6), (4, 1), ()]])
def test_matmul_fold(add, bias_shape):
    rng = np.random.default_rng(len(add or "") + len(bias_shape or ()))
    body = {None: "t = MatMul (x, W)", "x_first": "p = MatMul (x, W)\n t = Add (p, Bb)",
            "bias_first": "p = MatMul (x, W)\n t = Add (Bb, p)"}[add]
    arrays = dict(W=rng.normal(size=(5, 6)).astype(np.float32), **bn_stats(rng, 6))
    if add:
        arrays["Bb"] = rng.normal(size=bias_shape).astype(np.float32)
    proto = build(f"""
        g (float[4, 5] x) => (float[4, 6] y) {{
            {body}
            y = BatchNormalization (t, gamma, beta, mean, var)
        }}""", **arrays)
    out, result, _ = fold(proto)
    rule = "fold_batchnorm_into_matmul_add" if add else "fold_batchnorm_into_matmul"
    assert result.counts == {rule: 1}
    assert op_counts(out) == {"MatMul": 1, "Add": 1}
    assert_same_outputs(proto, out, atol=1e-5)


def test_matmul_rank3_is_refused_even_when_sizes_line_up():
    """(B, T, K) @ (K, N) with T == N: BN's axis 1 is T, not MatMul's features; folding would be wrong."""
    rng = np.random.default_rng(5)
    proto = build("""
        g (float[2, 6, 5] x) => (float[2, 6, 6] y) {
            t = MatMul (x, W)
            y = BatchNormalization (t, gamma, beta, mean, var)
        }""", W=rng.normal(size=(5, 6)).astype(np.float32), **bn_stats(rng, 6))
    out, result, _ = fold(proto)
    assert result.rewrites == 0 and op_counts(out) == {"MatMul": 1, "BatchNormalization": 1}
    assert "rank [3], not 2" in nearest_reason(proto, fold_batchnorm_into_matmul)


def test_matmul_unknown_rank_is_refused():
    rng = np.random.default_rng(6)
    proto = build("""
        g (float[?, ?] x) => (float[?, ?] y) {
            r = Relu (x)
            t = MatMul (r, W)
            u = BatchNormalization (t, gamma, beta, mean, var)
            y = Relu (u)
        }""", W=rng.normal(size=(5, 6)).astype(np.float32), **bn_stats(rng, 6))
    _, result, _ = fold(proto)
    assert result.rewrites == 0
    assert "is unknown" in nearest_reason(proto, fold_batchnorm_into_matmul)
    # with shapes from value_info (onnx shape inference) the same model folds
    inferred = onnx.shape_inference.infer_shapes(proto)
    out, result, _ = fold(inferred)
    assert result.counts == {"fold_batchnorm_into_matmul": 1}
    assert "BatchNormalization" not in op_counts(out)
    assert_same_outputs(proto, out, atol=1e-5, feeds={"x": rng.normal(size=(3, 5)).astype(np.float32)})


# ---------------------------------------------------------------- refusals
def _conv_bn(opset=17, bn_attrs="", bn_outputs="y", outputs="float[1, 4, 4, 4] y", w_input=False):
    rng = np.random.default_rng(7)
    arrays = bn_stats(rng, 4)
    if not w_input:
        arrays["W"] = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    inputs = "float[1, 3, 6, 6] x" + (", float[4, 3, 3, 3] W" if w_input else "")
    return build(f"""
        g ({inputs}) => ({outputs}) {{
            c = Conv (x, W)
            {bn_outputs} = BatchNormalization {bn_attrs} (c, gamma, beta, mean, var)
        }}""", opset=opset, **arrays)


def assert_unchanged(proto):
    out, result, _ = fold(proto)
    assert result.rewrites == 0
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in proto.graph.node]


def test_refuses_training_mode():
    proto = _conv_bn(bn_attrs="<training_mode = 1>", bn_outputs="y, rm, rv")
    assert_unchanged(proto)
    assert "is in training mode (training_mode=1)" in nearest_reason(proto, fold_batchnorm_into_conv)


def test_refuses_used_running_statistics():
    # BatchNormalization-9: five outputs, the running mean read as a graph output
    proto = _conv_bn(opset=12, bn_outputs="y, rm, rv, sm, sv",
                     outputs="float[1, 4, 4, 4] y, float[4] rm")
    assert_unchanged(proto)
    reason = nearest_reason(proto, fold_batchnorm_into_conv)
    assert "running-statistics outputs ['rm'] are used" in reason


def test_refuses_non_constant_weight():
    proto = _conv_bn(w_input=True)
    assert_unchanged(proto)
    reason = nearest_reason(proto, fold_batchnorm_into_conv)
    assert "w 'W' of Conv" in reason and "is not a constant (a graph input callers may override)" in reason


def test_refuses_non_constant_statistics():
    proto = _conv_bn()
    # an initializer that is also a graph input: callers may override it, so it is no constant
    proto.graph.input.append(onnx.helper.make_tensor_value_info("var", onnx.TensorProto.FLOAT, [4]))
    assert_unchanged(proto)
    assert "var 'var'" in nearest_reason(proto, fold_batchnorm_into_conv)


def test_refuses_escaping_conv_output():
    rng = np.random.default_rng(8)
    proto = build("""
        g (float[1, 3, 6, 6] x) => (float[1, 4, 4, 4] y, float[1, 4, 4, 4] z) {
            c = Conv (x, W)
            y = BatchNormalization (c, gamma, beta, mean, var)
            z = Relu (c)
        }""", W=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), **bn_stats(rng, 4))
    model = ir.from_onnx(proto)
    before = ir.to_onnx(model).graph.SerializeToString()
    assert rewrite(model, RULES).rewrites == 0
    assert ir.to_onnx(model).graph.SerializeToString() == before
    assert "also used by Relu" in nearest_reason(proto, fold_batchnorm_into_conv)


def test_refuses_non_float_statistics():
    """Integer BN statistics are outside the ONNX schema; built unchecked, the rule still refuses."""
    rng = np.random.default_rng(9)
    proto = onnx.parser.parse_model(HEADER.format(opset=17) + """
        g (float[1, 3, 6, 6] x) => (float[1, 4, 4, 4] y) {
            c = Conv (x, W)
            y = BatchNormalization (c, gamma, beta, mean, var)
        }""")
    stats = {k: np.round(v * 4).astype(np.int64) + (k == "var") * 3 for k, v in bn_stats(rng, 4).items()}
    for name, arr in dict(W=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), **stats).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    model = ir.from_onnx(proto)
    assert rewrite(model, RULES).rewrites == 0
    assert "folding needs floating-point tensors" in nearest_reason(proto, fold_batchnorm_into_conv)


def test_refuses_non_positive_var_plus_epsilon():
    """var + epsilon <= 0 has no real square root: the BN is kept, the reason counts the channels."""
    rng = np.random.default_rng(10)
    stats = bn_stats(rng, 4)
    stats["var"][[0, 2]] = -1.0
    proto = build("""
        g (float[1, 3, 6, 6] x) => (float[1, 4, 4, 4] y) {
            c = Conv (x, W)
            y = BatchNormalization (c, gamma, beta, mean, var)
        }""", W=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), **stats)
    assert_unchanged(proto)
    assert "has var + epsilon <= 0 for 2 channel(s)" in nearest_reason(proto, fold_batchnorm_into_conv)


def test_refuses_spatial_zero():
    proto = _conv_bn(opset=7, bn_attrs="<spatial = 0>")
    assert "spatial=0" in nearest_reason(proto, fold_batchnorm_into_conv)
    model = ir.from_onnx(proto)
    assert rewrite(model, RULES).rewrites == 0


def test_rules_are_indexed_on_batchnorm():
    assert {r.root_key for r in RULES} == {("", "BatchNormalization")}
    assert [r.name for r in RULES] == [
        fold_batchnorm_into_conv.name, "fold_batchnorm_into_conv_of_fill", fold_batchnorm_into_conv_transpose.name,
        fold_batchnorm_into_gemm.name, fold_batchnorm_into_matmul_add.name, fold_batchnorm_into_matmul.name]


# ---------------------------------------------------------------- real model
def test_ppocr_cls_all_batchnorms_fold(ppocr_cls_path):
    proto = onnx.load(ppocr_cls_path)
    before = op_counts(proto)
    assert before["BatchNormalization"] == 35
    # Softmax over 2 classes hides errors: also compare the logits and the first and last BN's feature maps.
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    for name, rank in (("linear_1.tmp_1", 2), (bns[0].output[0], 4), (bns[-1].output[0], 4)):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None] * rank))
    out, result, _ = fold(proto, [fold_batchnorm_into_conv])
    after = op_counts(out)
    assert result.counts == {"fold_batchnorm_into_conv": 35}
    assert after["BatchNormalization"] == 0
    assert after["Conv"] == before["Conv"]
    assert sum(after.values()) < sum(before.values()) - 35  # BNs and their weight Constants are gone
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype(np.float32)
    res = assert_same_outputs(proto, out, atol=1e-4, feeds={"x": x})
    assert [r.shape for r in res] == [(1, 2), (1, 2), (1, 8, 24, 96), (1, 200, 2, 96)]


# ------------------------------------------------------------- Conv whose weight is a uniform fill
FILL_CONV = """
agraph (float[N, 3, 8, 8] x) => (float[N, 4, 6, 6] y) {
    w = ConstantOfShape <value = float[1] {0.25}> (wshape)
    c = Conv (x, w, bias)
    y = BatchNormalization (c, gamma, beta, mean, var)
}
"""


def test_bn_folds_into_a_conv_whose_weight_is_a_fill_and_stays_small():
    """BN(Conv(x, ConstantOfShape(shape, c), B)) = Conv(x, Expand(c * s[:, None, None, None], shape), B*s + shift):
    the folded weight is a (4, 1, 1, 1) constant under an Expand, not a dense (4, 3, 3, 3) tensor."""
    rng = np.random.default_rng(3)
    src = build(FILL_CONV, wshape=np.array([4, 3, 3, 3], np.int64), bias=rng.normal(size=4).astype(np.float32),
                **bn_stats(rng, 4))
    out, result, _ = fold(src)
    assert result.counts == {"fold_batchnorm_into_conv_of_fill": 1}
    assert op_counts(out) == Counter({"Expand": 1, "Conv": 1})
    scale = next(t for t in out.graph.initializer if t.name.endswith("_weight_scale_folded"))
    assert list(scale.dims) == [4, 1, 1, 1]
    assert_same_outputs(src, out, atol=1e-5, feeds={"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)})


def test_bn_does_not_fold_into_a_fill_of_run_time_shape():
    src = onnx.parser.parse_model(HEADER.format(opset=17) + FILL_CONV.replace(
        "(float[N, 3, 8, 8] x)", "(float[N, 3, 8, 8] x, int64[4] wshape)"))
    rng = np.random.default_rng(4)
    src = with_initializers(src, bias=rng.normal(size=4).astype(np.float32), **bn_stats(rng, 4))
    reason = nearest_reason(src, RULES[1])
    assert "fill_shape 'wshape'" in reason and "not a constant" in reason
