"""Precision rules: convert_precision and fold_cast_pair, driven by a hand-made plan.

Each case builds a float32 model in ONNX text, plans the nodes to convert (which tensors move is
read from the op schemas by ``node_support``; which nodes is chosen here), runs the rules, and
checks the exported model (full check), its Casts and types, and its outputs in onnxruntime.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import given, settings, strategies as st
from onnx.reference import ReferenceEvaluator

from conftest import parse_model, with_initializers
from graft import ir
from graft.compiler import explain, rewrite
from graft.compiler.techniques.precision.support import node_support
from graft.ir.dtypes import DataType
from graft.ir.shapes import infer_shapes
from graft.rules import precision

F16, BF16 = DataType.FLOAT16, DataType.BFLOAT16
HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def build(body: str, **arrays) -> onnx.ModelProto:
    if arrays:
        return with_initializers(onnx.parser.parse_model(HEADER + body), **arrays)
    return parse_model(HEADER + body)


def convert(proto: onnx.ModelProto, target=F16, keep=()):
    """(converted ONNX, RewriteResult, IR model): every node the schema allows converted, except ``keep``."""
    model = ir.from_onnx(proto)
    infer_shapes(model)
    plan = precision.PrecisionPlan(target)
    for g in model.all_graphs():
        for n in g:
            sup = node_support(n, model, target)
            key = precision.node_key(n)
            if sup is None or sup.kind == "keep":
                continue
            if key in keep:
                n.meta[precision.PRECISION_META] = "float32: kept by the test"
                continue
            plan.convert[key] = sup.conversion
    precision.store(model, plan)
    res = rewrite(model, precision.rules())
    model.meta.pop(precision.PLAN_KEY)
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    return out, res, model


def run(proto, feeds):
    import onnxruntime as ort

    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def ops(proto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def elem_types(proto) -> dict[str, int]:
    """Value name → element type, from the exported model's inputs, outputs, value_info and initializers."""
    g = proto.graph
    out = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


MLP = """
mlp (float[2, 8] x) => (float[2, 4] y) {
    h = MatMul(x, w1)
    hb = Add(h, b1)
    r = Relu(hb)
    y = MatMul(r, w2)
}
"""


def mlp_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return dict(w1=rng.standard_normal((8, 16)).astype(np.float32), b1=rng.standard_normal(16).astype(np.float32),
                w2=rng.standard_normal((16, 4)).astype(np.float32))


def test_chain_runs_in_float16_with_casts_only_at_the_model_boundary():
    arrays = mlp_arrays()
    proto = build(MLP, **arrays)
    out, res, _ = convert(proto)
    assert res.counts["convert_precision"] == 4
    assert res.counts["fold_cast_pair"] == 3  # each producer's Cast(to=FLOAT) met its reader's Cast(to=FLOAT16)
    assert ops(out) == Counter({"Cast": 2, "MatMul": 2, "Add": 1, "Relu": 1})
    types = elem_types(out)
    assert types["x"] == types["y"] == onnx.TensorProto.FLOAT  # the interface keeps float32
    for n in out.graph.node:
        if n.op_type != "Cast":
            assert all(types[v] == onnx.TensorProto.FLOAT16 for v in (*n.input, *n.output)), n.op_type
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    (y,), (ref,) = run(out, {"x": x}), run(proto, {"x": x})
    # the float16 reference computed in numpy: inputs and weights rounded to float16
    h = np.maximum(x.astype(np.float16) @ arrays["w1"].astype(np.float16) + arrays["b1"].astype(np.float16), 0)
    y16 = (h @ arrays["w2"].astype(np.float16)).astype(np.float32)
    assert np.abs(y - ref).max() <= 2e-2 * np.abs(ref).max()
    assert np.abs(y - y16).max() <= 2e-2 * np.abs(ref).max()


def test_kept_node_sits_between_boundary_casts_and_explains_why():
    proto = build(MLP, **mlp_arrays())
    out, _, model = convert(proto, keep={"r"})  # an unnamed node is known by its output
    assert ops(out)["Cast"] == 4  # in, out, and both sides of the float32 Relu
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    types = elem_types(out)
    assert types[relu.input[0]] == types[relu.output[0]] == onnx.TensorProto.FLOAT
    meta = {e.key: e.value for e in relu.metadata_props}
    assert meta[precision.PRECISION_META] == "float32: kept by the test"
    hits, misses = explain(ir.from_onnx(out), precision.convert_precision)
    assert not hits
    reasons = {n.op_type: m.reason for n, m in misses}
    assert "kept in float32: kept by the test" in reasons["Relu"]
    assert "already runs in float16" in reasons["MatMul"]
    assert "precision boundary" in reasons["Cast"]


def test_without_a_plan_the_rule_says_so():
    model = ir.from_onnx(build(MLP, **mlp_arrays()))
    _, misses = explain(model, precision.convert_precision)
    assert misses and all("_may_convert: True for a node of a model with a precision plan" in m.reason
                          for _, m in misses)


def test_shared_weight_converted_once():
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    proto = build("""
    shared (float[2, 8] x) => (float[2, 8] y) {
        a = MatMul(x, w)
        y = MatMul(a, w)
    }
    """, w=w)
    out, _, _ = convert(proto)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert list(inits) == ["w_fp16"]  # one float16 copy (the technique gives it back the name "w")
    assert inits["w_fp16"].dtype == np.float16 and np.array_equal(inits["w_fp16"], w.astype(np.float16))


def test_noop_input_cast_becomes_the_boundary_cast():
    """CLIP-vision's exporter writes Cast(pixel_values, to=FLOAT) before the patch Conv: converting it
    must leave one Cast(to=FLOAT16) feeding a float16 Conv, never a float32 input with a float16 weight."""
    w = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    proto = build("""
    patch (float[1, 3, 8, 8] pixels) => (float[1, 4, 4, 4] y) {
        c = Cast<to = 1>(pixels)
        y = Conv<strides = [2, 2]>(c, w)
    }
    """, w=w)
    out, _, _ = convert(proto)
    assert ops(out) == Counter({"Cast": 2, "Conv": 1})
    first = out.graph.node[0]
    assert first.op_type == "Cast" and first.input[0] == "pixels" and first.attribute[0].i == onnx.TensorProto.FLOAT16
    types = elem_types(out)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert {types[v] for v in (*conv.input, *conv.output)} == {onnx.TensorProto.FLOAT16}
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (y,), (ref,) = run(out, {"pixels": x}), run(proto, {"pixels": x})
    assert np.abs(y - ref).max() <= 1e-2 * np.abs(ref).max()


def test_constant_of_shape_value_takes_the_type():
    proto = build("""
    fill (float[2, 3] x) => (float[2, 3] y) {
        s = Shape(x)
        z = ConstantOfShape<value = float[1] {0.5}>(s)
        y = Add(x, z)
    }
    """)
    out, _, _ = convert(proto)
    cos = next(n for n in out.graph.node if n.op_type == "ConstantOfShape")
    assert cos.attribute[0].t.data_type == onnx.TensorProto.FLOAT16
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(run(out, {"x": x})[0], x + 0.5)


def test_if_branches_converted_consistently():
    """Both bodies of an If read the outer x and are converted inside; the If's interface stays float32."""
    proto = build("""
    branchy (float[4] x, bool c) => (float[4] y) {
        y = If(c) <then_branch = g1 () => (float[4] t) { t = Mul(x, x) },
                   else_branch = g2 () => (float[4] e) { e = Add(x, x) }>
    }
    """)
    out, res, _ = convert(proto)
    assert res.counts["convert_precision"] == 2
    x = np.array([0.5, -1.25, 3.0, 7.0], np.float32)
    for c in (True, False):
        (y,) = run(out, {"x": x, "c": np.array(c)})
        assert np.array_equal(y, x * x if c else x + x)  # exact in float16 for these values
    body = next(n for n in out.graph.node if n.op_type == "If").attribute
    for a in body:
        kinds = Counter(n.op_type for n in a.g.node)
        assert kinds["Cast"] == 2, kinds  # x into float16, the result back to the If's float32 output


def test_fold_cast_pair_cancels_an_exact_round_trip_only():
    proto = build("""
    casts (float16[5] a, float[5] b) => (float16[5] y, float[5] z, bfloat16[5] w) {
        up = Cast<to = 1>(a)
        down = Cast<to = 10>(up)
        y = Relu(down)
        lo = Cast<to = 10>(b)
        z = Cast<to = 1>(lo)
        up2 = Cast<to = 1>(a)
        w = Cast<to = 16>(up2)
    }
    """)
    model = ir.from_onnx(proto)
    infer_shapes(model)
    res = rewrite(model, [precision.fold_cast_pair])
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    assert res.counts["fold_cast_pair"] == 2
    by_out = {n.output[0]: n for n in out.graph.node}
    assert by_out["y"].input[0] == "a"  # float16 -> float32 -> float16 is the identity
    assert by_out["w"].op_type == "Cast" and by_out["w"].input[0] == "a"  # one rounding, as before
    assert by_out["z"].op_type == "Cast" and by_out["lo"].op_type == "Cast"  # float32 -> float16 rounds: kept
    a = np.array([1.0009765625, -65504, 6e-8, 3.14, 0], np.float16)
    b = np.array([1.0001, 2.0003, 70000, -1e-9, 0.1], np.float32)
    with np.errstate(over="ignore"):  # 70000 -> float16 is inf, in both models
        want = ReferenceEvaluator(proto).run(None, {"a": a, "b": b})
        got = ReferenceEvaluator(out).run(None, {"a": a, "b": b})
    for g_, w_ in zip(got, want):
        assert np.array_equal(g_.view(np.uint16) if g_.dtype.itemsize == 2 else g_,
                              w_.view(np.uint16) if w_.dtype.itemsize == 2 else w_)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=16))
def test_fold_cast_pair_is_bit_exact_on_any_float16(bits):
    """Cast(Cast(a: f16, to=FLOAT), to=BFLOAT16) == Cast(a, to=BFLOAT16) for every float16 bit pattern (NaN included)."""
    a = np.array(bits, np.uint16).view(np.float16)
    proto = build(f"""
    c (float16[{len(bits)}] a) => (bfloat16[{len(bits)}] w) {{
        up = Cast<to = 1>(a)
        w = Cast<to = 16>(up)
    }}
    """)
    model = ir.from_onnx(proto)
    infer_shapes(model)
    assert rewrite(model, [precision.fold_cast_pair]).counts["fold_cast_pair"] == 1
    folded = ir.to_onnx(model)
    assert Counter(n.op_type for n in folded.graph.node) == Counter({"Cast": 1})
    want = ReferenceEvaluator(proto).run(None, {"a": a})[0].view(np.uint16)
    got = ReferenceEvaluator(folded).run(None, {"a": a})[0].view(np.uint16)
    nan = np.isnan(a)
    assert np.array_equal(got[~nan], want[~nan]) and np.all(np.isnan(ReferenceEvaluator(folded).run(
        None, {"a": a})[0].astype(np.float32)[nan]))


def test_to_type_saturates_only_when_asked():
    big = np.array([-3.4028235e38, -70000.0, 65519.0, 65520.0, 1.0, -np.inf, np.nan], np.float32)
    with pytest.raises(precision.PrecisionError, match=r"constant 'mask' holds 3.4e\+38, beyond the float16 range"):
        precision.to_type(big, F16, name="mask")
    got = precision.to_type(big, F16, saturate=True).astype(np.float32)
    assert got[0] == got[1] == -65504 and got[2] == got[3] == 65504  # 65520 would round to inf: saturated too
    assert got[4] == 1 and got[5] == -np.inf and np.isnan(got[6])
    assert precision.to_type(np.array([3e38], np.float32), BF16).dtype == BF16.to_numpy()  # in range for bfloat16
