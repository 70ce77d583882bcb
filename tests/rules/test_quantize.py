"""Quantization rules: static QDQ insertion, propagation, dynamic int8, weight-only, smoothing."""
from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from graft import ir
from graft.compiler.techniques.quantization import QuantizationError, QuantizationWarning, quantize
from graft.rules.quantize_context import QuantContext, dq_params
from graft.rules.quantize_params import (INT8_SYM, UINT8_ASYM, activation_params, dequantize, quantize as
                                          np_quantize, weight_params)
from graft.compiler.engine.rewriter import rewrite
from graft.ir.shapes import infer_shapes
from conftest import with_initializers
from graft.rules import quantize_propagate
from graft.rules.quantize_dynamic import smoothing_rules
from graft.rules.quantize_static import static_rules

HEADER = '<ir_version: 10, opset_import: ["" : {opset}]>\n'


def build(body: str, opset: int = 17, **arrays) -> onnx.ModelProto:
    return with_initializers(onnx.parser.parse_model(HEADER.format(opset=opset) + body), **arrays)


def run(proto: onnx.ModelProto, feed: dict, optimize: bool = False) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def ort_ops(proto: onnx.ModelProto, tmp_path) -> collections.Counter:
    """Op types of the graph onnxruntime actually runs (after its QDQ fusions)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "ort_opt.onnx")
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "ort_opt.onnx")).graph.node)


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


CNN = """
cnn (float[N, 2, 8, 8] x) => (float[N, 5] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
    c2 = Conv <pads = [1, 1, 1, 1]> (p1, w2, b2)
    r2 = Relu (c2)
    f = Flatten (r2)
    y = Gemm <transB = 1> (f, wf, bf)
}
"""


@pytest.fixture(scope="module")
def cnn():
    rng = np.random.default_rng(0)
    return build(CNN, w1=(rng.normal(size=(4, 2, 3, 3)) * 0.5).astype(np.float32),
                 b1=(rng.normal(size=4) * 0.1).astype(np.float32),
                 w2=(rng.normal(size=(6, 4, 3, 3)) * 0.3).astype(np.float32),
                 b2=(rng.normal(size=6) * 0.1).astype(np.float32),
                 wf=(rng.normal(size=(5, 96)) * 0.1).astype(np.float32), bf=(rng.normal(size=5) * 0.1).astype(np.float32))


def cnn_feeds(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(2, 2, 8, 8)).astype(np.float32)} for _ in range(n)]


# ---------------------------------------------------------------- parameters (ONNX QuantizeLinear spec)
def test_activation_params_uint8_and_int8():
    p = activation_params(-1.0, 3.0, UINT8_ASYM)
    assert p.scale == pytest.approx(4.0 / 255) and int(p.zero_point) == 64 and p.zero_point.dtype == np.uint8
    q = activation_params(-1.0, 3.0, INT8_SYM)
    assert q.scale == pytest.approx(3.0 / 127) and int(q.zero_point) == 0 and q.zero_point.dtype == np.int8
    x = np.array([-1.0, 0.0, 3.0], np.float32)
    np.testing.assert_allclose(dequantize(np_quantize(x, p), p), x, atol=float(p.scale) / 2)
    assert dequantize(np_quantize(np.zeros(1), p), p)[0] == 0.0       # zero is exact


def test_weight_params_per_channel_axis():
    w = np.stack([np.full((3, 2), 1.0), np.full((3, 2), 4.0)]).astype(np.float32)   # (2, 3, 2)
    p = weight_params(w, 0)
    np.testing.assert_allclose(p.scale, [1 / 127, 4 / 127], rtol=1e-6)
    assert p.zero_point.dtype == np.int8 and p.axis == 0


def test_degenerate_ranges_get_a_safe_scale_with_a_warning():
    with pytest.warns(QuantizationWarning, match="degenerate range"):
        p = activation_params(0.0, 0.0, UINT8_ASYM, name="dead")
    assert p.scale == 1.0
    with pytest.warns(QuantizationWarning, match="1 of 2 channels"):
        wp = weight_params(np.array([[0.0, 0.0], [1.0, -2.0]], np.float32), 0)
    assert np.all(np.isfinite(wp.scale)) and np.all(wp.scale > 0)
    with pytest.warns(QuantizationWarning):
        p = activation_params(float("nan"), float("inf"), UINT8_ASYM)   # non-finite bounds count as 0
    assert np.isfinite(p.scale)


# ---------------------------------------------------------------- static QDQ
@pytest.fixture(scope="module")
def static_cnn(cnn):
    return quantize(cnn, "static", cnn_feeds(), progress=False, report=False)


def test_static_qdq_structure(static_cnn):
    m = static_cnn.model
    c = ops(m)
    # activations: the input, two (folded) Relu outputs, the Gemm output; weights and biases: 3 + 3
    assert c["QuantizeLinear"] == 4 and c["DequantizeLinear"] == 10 and c["Relu"] == 0
    convs = [n for n in m.graph if n.op_type == "Conv"]
    for conv in convs:
        x, w, b = (dq_params(v) for v in conv.inputs)
        assert x.qtype is UINT8_ASYM and x.scale.size == 1
        assert w.axis == 0 and w.scale.shape == (conv.inputs[1].producer.inputs[0].shape[0],)
        assert conv.inputs[1].producer.inputs[0].dtype == ir.DataType.INT8
        assert conv.inputs[2].producer.inputs[0].dtype == ir.DataType.INT32
        np.testing.assert_allclose(b.scale, x.scale * w.scale, rtol=1e-6)   # s_b = s_x * s_w
    gemm = next(n for n in m.graph if n.op_type == "Gemm")
    assert dq_params(gemm.inputs[1]).axis == 0                              # transB=1: output channels on axis 0
    # MaxPool and Flatten run on uint8: their input is a QuantizeLinear, their reader a DequantizeLinear
    for op_type in ("MaxPool", "Flatten"):
        n = next(n for n in m.graph if n.op_type == op_type)
        assert n.inputs[0].producer.op_type == "QuantizeLinear"
        assert n.outputs[0].users()[0].op_type == "DequantizeLinear"
    assert static_cnn.counts["fold_relu_into_quantize"] == 2


def test_static_matches_float_and_onnxruntime_fuses_it(cnn, static_cnn, tmp_path):
    feed = cnn_feeds(1, seed=9)[0]
    f = run(cnn, feed)[0]
    q = run(static_cnn.proto, feed)[0]
    cos = float(np.dot(f.ravel(), q.ravel()) / np.linalg.norm(f) / np.linalg.norm(q))
    assert cos > 0.999 and np.abs(f - q).max() < 0.1 * np.abs(f).max()
    fused = ort_ops(static_cnn.proto, tmp_path)
    assert fused["QLinearConv"] == 2 and fused["QGemm"] == 1 and fused["Conv"] == 0
    assert fused["QuantizeLinear"] == 1                                     # only the model input is quantized
    np.testing.assert_allclose(run(static_cnn.proto, feed, optimize=True)[0], q, atol=0.05 * np.abs(f).max())


def test_per_tensor_weights(cnn):
    res = quantize(cnn, "static-per-tensor", cnn_feeds(), progress=False, report=False)
    for n in res.model.graph:
        if n.op_type == "DequantizeLinear":
            assert n.inputs[1].constant().size == 1 and "axis" not in n.attrs


def test_int8_symmetric_activations_keep_relu(cnn):
    res = quantize(cnn, "static", cnn_feeds(), activation="int8", progress=False, report=False)
    c = ops(res.model)
    assert c["Relu"] == 2                                   # Q(Relu(x)) != Q(x) when zero is mid-grid
    for n in res.model.graph:
        if n.op_type == "QuantizeLinear":
            assert n.inputs[2].constant().dtype == np.int8 and int(n.inputs[2].constant()) == 0


def test_exclusions_by_name_op_type_glob_and_pattern(cnn):
    from graft.compiler import Var, op
    from graft.rules.quantize_context import node_key

    cases = {"name": (["c2"], {"c2"}), "op type": (["Gemm"], {"y"}), "glob": (["c*"], {"c1", "c2"}),
             "pattern": ([op.Relu(op.Conv(Var("a"), Var("b"), Var("c"), name="conv"))], {"c1", "c2"})}
    for what, (exclude, float_nodes) in cases.items():
        res = quantize(cnn, "static", cnn_feeds(), exclude=exclude, progress=False, report=False)
        for n in res.model.graph:
            if n.op_type in ("Conv", "Gemm"):
                kept_float = n.inputs[1].constant() is not None
                assert kept_float == (node_key(n) in float_nodes), (what, node_key(n))
    with pytest.raises(QuantizationError, match="'Conv_typo' matches no node"):
        quantize(cnn, "static", cnn_feeds(), exclude=["Conv_typo"], progress=False, report=False)


def test_shared_weight_is_quantized_once():
    rng = np.random.default_rng(0)
    proto = build("""
        g (float[1, 3, 6, 6] x) => (float[1, 3, 6, 6] y) {
            a = Conv <pads = [1, 1, 1, 1]> (x, w)
            b = Conv <pads = [1, 1, 1, 1]> (a, w)
            y = Add (a, b)
        }""", w=rng.normal(size=(3, 3, 3, 3)).astype(np.float32))
    feeds = [{"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    res = quantize(proto, "static", feeds, progress=False, report=False)
    q_inits = [v for v in res.model.graph.initializers.values() if v.dtype == ir.DataType.INT8 and v.const.size == 81]
    assert len(q_inits) == 1                                 # both Convs read the same int8 weight
    readers = {u.op_type for u in q_inits[0].users()}
    assert readers == {"DequantizeLinear"} and len(q_inits[0].users()) >= 1
    assert ops(res.model)["Add"] == 1


def test_concat_inputs_share_one_scale_and_concat_runs_on_uint8():
    rng = np.random.default_rng(0)
    proto = build("""
        g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y) {
            a = Conv (x, wa)
            b = Conv (x, wb)
            c = Concat <axis = 1> (a, b)
            y = Conv (c, wc)
        }""", wa=rng.normal(size=(2, 2, 1, 1)).astype(np.float32),
        wb=(3 * rng.normal(size=(2, 2, 1, 1))).astype(np.float32),
        wc=rng.normal(size=(3, 4, 1, 1)).astype(np.float32))
    feeds = [{"x": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)} for _ in range(4)]
    res = quantize(proto, "static", feeds, progress=False, report=False)
    concat = next(n for n in res.model.graph if n.op_type == "Concat")
    assert all(v.producer.op_type == "QuantizeLinear" for v in concat.inputs)
    scales = {float(v.producer.inputs[1].constant()) for v in concat.inputs}
    assert len(scales) == 1
    assert res.counts["propagate_dq_through_concat"] == 1


def test_propagation_rules_are_exact():
    """op(DQ(q)) = DQ(op(q)) for data movement; Q(DQ(q)) = q for one grid."""
    proto = build("""
        g (uint8[1, 2, 4, 4] q) => (float[1, 8, 4] y) {
            d = DequantizeLinear (q, s, z)
            t = Transpose <perm = [0, 2, 3, 1]> (d)
            r = Reshape (t, shape)
            q2 = QuantizeLinear (r, s, z)
            y = DequantizeLinear (q2, s, z)
        }""", s=np.array(0.05, np.float32), z=np.array(7, np.uint8), shape=np.array([1, 8, 4], np.int64))
    model = ir.from_onnx(proto)
    res = rewrite(model, quantize_propagate.RULES)
    assert res.counts == {"propagate_dq_through_transpose": 1, "propagate_dq_through_reshape": 1, "fold_requantize": 1}
    assert ops(model) == {"Transpose": 1, "Reshape": 1, "DequantizeLinear": 1}
    feed = {"q": np.random.default_rng(0).integers(0, 256, (1, 2, 4, 4)).astype(np.uint8)}
    np.testing.assert_array_equal(run(proto, feed)[0], run(ir.to_onnx(model), feed)[0])


def test_fold_relu_and_clip_only_when_exact():
    body = """
        g (float[4] x) => (float[4] y1, float[4] y2, float[4] y3) {
            r = Relu (x)
            y1 = QuantizeLinear (r, s, z0)
            c = Clip (x, lo, hi)
            y2 = QuantizeLinear (c, s, z0)
            c2 = Clip (x, lo, small)
            y3 = QuantizeLinear (c2, s, z0)
        }"""
    proto = build(body.replace("float[4] y1, float[4] y2, float[4] y3", "uint8[4] y1, uint8[4] y2, uint8[4] y3"),
                  s=np.array(0.02, np.float32), z0=np.array(0, np.uint8), lo=np.array(0.0, np.float32),
                  hi=np.array(6.0, np.float32), small=np.array(1.0, np.float32))
    model = ir.from_onnx(proto)
    res = rewrite(model, quantize_propagate.RULES)
    # grid top 255 * 0.02 = 5.1 <= 6: Clip(0, 6) folds; Clip(0, 1) does not (the grid reaches above 1)
    assert res.counts == {"fold_relu_into_quantize": 1, "fold_clip_into_quantize": 1}
    feed = {"x": np.array([-3.0, 0.3, 0.9, 7.0], np.float32)}
    for a, b in zip(run(proto, feed), run(ir.to_onnx(model), feed)):
        np.testing.assert_array_equal(a, b)


def test_rules_explain_why_not(cnn):
    from graft.compiler import explain

    model = ir.from_onnx(cnn)
    infer_shapes(model)
    ctx = QuantContext(tensors=set(), excluded={"c2"})
    rule = next(r for r in static_rules(ctx) if r.name == "quantize_conv_weight")
    hits, misses = explain(model, rule)
    assert not hits
    reasons = {n.outputs[0].name: m.reason for n, m in misses}
    assert "excluded from quantization" in reasons["c2"]
    assert "not quantized yet" in reasons["c1"]


def test_degenerate_activation_never_divides_by_zero():
    """A tensor that is all zeros on the calibration data: safe scale, a warning, finite outputs."""
    rng = np.random.default_rng(0)
    proto = build("""
        g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y) {
            z = Mul (x, zero)
            c = Conv (z, w)
            y = Add (c, x)
        }""", zero=np.zeros((1,), np.float32), w=rng.normal(size=(2, 2, 1, 1)).astype(np.float32))
    feeds = [{"x": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)} for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = quantize(proto, "static", feeds, prepare_pipeline=None, progress=False, report=False)
    assert any("degenerate range" in str(w.message) or "constant 0" in str(w.message) for w in caught)
    for v in res.model.graph.initializers.values():
        if v.name.endswith("_scale"):
            s = v.const.array
            assert np.all(np.isfinite(s)) and np.all(s > 0)
    out = run(res.proto, {"x": np.full((1, 2, 4, 4), 1e3, np.float32)})[0]
    assert np.all(np.isfinite(out))


def test_inf_and_nan_in_calibration_data_are_ignored():
    rng = np.random.default_rng(0)
    proto = build("""
        g (float[1, 4] x) => (float[1, 3] y) {
            y = MatMul (x, w)
        }""", w=rng.normal(size=(4, 3)).astype(np.float32))
    bad = np.array([[1.0, np.inf, -2.0, np.nan]], np.float32)
    feeds = [{"x": bad}] + [{"x": rng.normal(size=(1, 4)).astype(np.float32)} for _ in range(3)]
    with pytest.warns(Warning, match="inf/NaN"):
        res = quantize(proto, "static", feeds, progress=False, report=False)
    for v in res.model.graph.initializers.values():
        if v.const.dtype == ir.DataType.FLOAT and v.name.endswith("_scale"):
            assert np.all(np.isfinite(v.const.array))


# ---------------------------------------------------------------- dynamic
def test_dynamic_matmul_and_embedding(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 8)).astype(np.float32)
    table[0] *= 20                                           # one row 20x the others: per-row scales keep it
    proto = build("""
        g (float[B, S, 8] x, int64[B, S] ids) => (float[B, S, 4] y) {
            e = Gather (table, ids)
            h = Add (x, e)
            m = MatMul (h, w1)
            y = MatMul (m, w2)
        }""", table=table, w1=rng.normal(size=(8, 16)).astype(np.float32),
        w2=rng.normal(size=(16, 4)).astype(np.float32))
    res = quantize(proto, "dynamic", progress=False, report=False)
    c = ops(res.model)
    assert c["DynamicQuantizeLinear"] == 2 and c["MatMulInteger"] == 2 and c["MatMul"] == 0
    mmi = next(n for n in res.model.graph if n.op_type == "MatMulInteger")
    assert mmi.inputs[1].dtype == ir.DataType.INT8 and mmi.inputs[3].const.shape == (16,)   # per-column
    feed = {"x": rng.normal(size=(2, 5, 8)).astype(np.float32), "ids": rng.integers(0, 50, (2, 5))}
    feed["ids"][0, 0] = 0
    f, q = run(proto, feed)[0], run(res.proto, feed)[0]
    assert np.abs(f - q).max() < 0.03 * np.abs(f).max()
    fused = ort_ops(res.proto, tmp_path)
    assert fused["MatMulInteger"] == 0 and fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 2
    gather = next(n for n in res.model.graph if n.op_type == "Gather" and n.inputs[0].dtype == ir.DataType.INT8)
    assert gather.inputs[0].const.shape == (50, 8)


def test_embedding_tables_small_ones_float_and_per_table_scale():
    rng = np.random.default_rng(1)
    big, small = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    proto = build("""
        g (int64[B, S] ids, int64[B, S] pos) => (float[B, S, 8] y) {
            a = Gather (big, ids)
            b = Gather (small, pos)
            y = Add (a, b)
        }""", big=big, small=small)
    feed = {"ids": rng.integers(0, 60, (2, 5)), "pos": rng.integers(0, 4, (2, 5))}
    ref = run(proto, feed)[0]
    res = quantize(proto, "dynamic", progress=False, report=False, embedding_min_rows=10)
    assert res.counts["quantize_embedding"] == 1                # only the 60-row table
    int8 = [n.inputs[0].const.shape for n in res.model.graph if n.op_type == "Gather"
            and n.inputs[0].dtype == ir.DataType.INT8]
    assert int8 == [(60, 8)]
    step = np.abs(big).max(axis=1, keepdims=True) / 127         # per-row scale: error within half a step
    assert np.abs(run(res.proto, feed)[0] - ref).max() <= 0.5 * step.max() + 1e-6
    res = quantize(proto, "dynamic", progress=False, report=False, embedding_per_row=False)
    c = ops(res.model)
    assert c["DequantizeLinear"] == 2 and c["Cast"] == 0        # Gather(int8) -> DequantizeLinear, per table
    assert np.abs(run(res.proto, feed)[0] - ref).max() <= (np.abs(big).max() + np.abs(small).max()) / 254 + 1e-6


def test_dynamic_gemm_with_transposed_weight_and_bias():
    rng = np.random.default_rng(0)
    proto = build("""
        g (float[3, 8] x) => (float[3, 5] y) {
            y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, b)
        }""", w=rng.normal(size=(5, 8)).astype(np.float32), b=rng.normal(size=5).astype(np.float32))
    res = quantize(proto, "dynamic", progress=False, report=False)
    assert ops(res.model)["Gemm"] == 0
    feed = {"x": rng.normal(size=(3, 8)).astype(np.float32)}
    f, q = run(proto, feed)[0], run(res.proto, feed)[0]
    assert np.abs(f - q).max() < 0.03 * np.abs(f).max()


def test_smoothing_and_channel_splitting_are_exact_in_float():
    """The migration alone (before quantization) leaves x W unchanged: Σ a_j b_j = 1 per channel."""
    from graft.compiler.techniques.quantization.smooth import Migration

    rng = np.random.default_rng(0)
    proto = build("""
        g (float[2, 6] x) => (float[2, 3] y, float[2, 4] z) {
            y = MatMul (x, w1)
            z = MatMul (x, w2)
        }""", w1=rng.normal(size=(6, 3)).astype(np.float32), w2=rng.normal(size=(6, 4)).astype(np.float32))
    feed = {"x": rng.normal(size=(2, 6)).astype(np.float32)}
    ref = run(proto, feed)
    for mig in (Migration.smooth(np.array([1.0, 4.0, 1.0, 2.0, 1.0, 8.0])),
                Migration.split(np.array([1, 3, 1, 1, 2, 1]))):
        model = ir.from_onnx(proto)
        res = rewrite(model, smoothing_rules(QuantContext(smoothing={"x": mig})))
        assert res.counts["smooth_matmul_input"] == 2
        c = ops(model)
        assert c["Mul"] == 1                                   # both readers share one migrated x
        assert c["Concat"] == (1 if mig.index is not None else 0)
        for a, b in zip(ref, run(ir.to_onnx(model), feed)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_channel_splitting_reduces_dynamic_error_with_an_outlier_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    proto = build("""
        g (float[32, 16] x) => (float[32, 8] y) {
            y = MatMul (x, w)
        }""", w=w)
    xs = [rng.normal(size=(32, 16)).astype(np.float32) for _ in range(4)]
    for x in xs:
        x[:, 3] *= 40                                           # a "massive activation" channel
    feeds = [{"x": x} for x in xs]
    plain = quantize(proto, "dynamic", feeds, progress=False, report=False)
    split = quantize(proto, "dynamic", feeds, smooth="split", progress=False, report=False)
    assert split.counts["smooth_matmul_input"] == 1

    def err(res):
        return max(float(np.abs(run(proto, f)[0] - run(res.proto, f)[0]).max()) for f in feeds)

    assert err(split) < 0.5 * err(plain)


def test_split_budget_caps_extra_channels_and_splits_the_largest(monkeypatch):
    from graft.compiler.techniques.quantization import smooth

    monkeypatch.setattr(smooth, "SPLIT_BUDGET", 8)
    amax = np.ones(64)
    amax[[3, 9]] = [40.0, 12.0]                                 # two outliers, median 1
    m = smooth._split_counts(amax)
    assert int((m - 1).sum()) <= smooth.SPLIT_BUDGET
    assert m[3] > m[9] > 1 and m[3] >= 5                        # the largest channel gets the most copies
    assert (m[np.setdiff1d(np.arange(64), [3, 9])] == 1).all()  # the bulk is never split
    # the threshold is the lowest the budget allows: 1% lower would need more extra channels
    t = (amax / m).max()
    assert t == pytest.approx(40.0 / 7)                         # 40 -> 7 copies, 12 -> 3 copies: 8 extra
    assert np.maximum(np.ceil(amax / (0.99 * t)) - 1, 0).sum() > smooth.SPLIT_BUDGET
    flat = np.ones(64)
    flat[5] = 4.0                                               # below MASSIVE_RATIO x median: no split
    assert (smooth._split_counts(flat) == 1).all()


def test_outlier_only_smoothing_factors():
    from graft.compiler.techniques.quantization import smooth

    amax = np.ones(32)
    amax[7] = 30.0
    s = smooth._outlier_factors(amax)
    assert s[7] == pytest.approx(30.0 / smooth.OUTLIER_RATIO)    # channel 7 falls to T = r * median
    assert (np.delete(s, 7) == 1.0).all()
    assert (smooth._outlier_factors(np.ones(32)) == 1.0).all()


def test_residual_add_as_sum_is_exact_and_avoids_skip_layernorm(tmp_path):
    from graft.rules.quantize_ort import RULES as ORT_RULES

    rng = np.random.default_rng(0)
    proto = build("""
        g (float[1, 5, 16] x, float[1, 5, 16] r) => (float[1, 5, 16] y, float[1, 5, 16] t) {
            s = Add (x, r)
            y = LayerNormalization <axis = -1, epsilon = 0.00001> (s, g1, b1)
            u = Add (y, bias)
            t = LayerNormalization <axis = -1> (u, g1, b1)
        }""", g1=rng.normal(size=16).astype(np.float32), b1=rng.normal(size=16).astype(np.float32),
                  bias=rng.normal(size=16).astype(np.float32))
    feed = {"x": rng.normal(size=(1, 5, 16)).astype(np.float32), "r": rng.normal(size=(1, 5, 16)).astype(np.float32)}
    assert ort_ops(proto, tmp_path)["SkipLayerNormalization"] == 1
    model = ir.from_onnx(proto)
    infer_shapes(model)
    res = rewrite(model, ORT_RULES)
    assert res.counts["residual_add_as_sum"] == 1               # not the Add of a constant bias
    assert ops(model)["Sum"] == 1 and ops(model)["Add"] == 1
    out = ir.to_onnx(model)
    for a, b in zip(run(proto, feed), run(out, feed)):
        np.testing.assert_array_equal(a, b)                     # Sum of two inputs is Add, bit for bit
    assert ort_ops(out, tmp_path)["SkipLayerNormalization"] == 0


# ---------------------------------------------------------------- weight-only
def test_weight_only_blockwise_int4_and_int8():
    rng = np.random.default_rng(0)
    body = """
        g (float[2, 64] x) => (float[2, 16] y) {
            y = MatMul (x, w)
        }"""
    w = rng.normal(size=(64, 16)).astype(np.float32)
    proto21 = build(body, opset=21, w=w)
    feed = {"x": rng.normal(size=(2, 64)).astype(np.float32)}
    f = run(proto21, feed)[0]
    errs = {}
    for mode, bits in (("weight-only-int8", 8), ("weight-only-int4", 4)):
        res = quantize(proto21, mode, block_size=16, progress=False, report=False)
        dq = next(n for n in res.model.graph if n.op_type == "DequantizeLinear")
        assert dq.attrs["block_size"] == 16 and dq.attrs["axis"] == 0
        assert dq.inputs[1].const.shape == (4, 16)            # 64 / 16 blocks along K, per column
        assert dq.inputs[0].dtype == (ir.DataType.INT4 if bits == 4 else ir.DataType.INT8)
        q = run(res.proto, feed)[0]
        errs[bits] = float(np.abs(f - q).max() / np.abs(f).max())
    assert errs[8] < 0.01 and errs[4] < 0.15 and errs[8] < errs[4]


def test_weight_only_needs_opset_21(cnn):
    proto = build("""
        g (float[2, 8] x) => (float[2, 4] y) {
            y = MatMul (x, w)
        }""", w=np.ones((8, 4), np.float32))
    with pytest.raises(QuantizationError, match=r"needs ai.onnx opset >= 21 \(DequantizeLinear with block_size and "
                                                r"int4\); the model imports opset 17"):
        quantize(proto, "weight-only-int4", progress=False, report=False)
    res = quantize(proto, "weight-only-int4", upgrade_opset=True, progress=False, report=False)
    assert res.model.opset == 21 and any("converted the model from opset 17 to 21" in n for n in res.notes)
