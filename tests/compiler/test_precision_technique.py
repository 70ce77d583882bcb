"""Mixed precision on small models: schema decisions, overflow handling, reasons, API and CLI.

The two fp16-hostile models (:func:`layernorm_hostile`, :func:`masked_softmax_hostile`) are also
used by ``bench/bench_precision.py``. Float16 arithmetic is checked with the torch backend, which
computes in float16 on the CPU; onnxruntime's CPU provider runs most float16 ops in float32 (see
graft.compiler.techniques.precision.evaluate), so it would hide the overflows tested here.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from graft import ir
from graft.compiler import compile as graft_compile
from graft.compiler.driver.cli import main
from graft.compiler.techniques.precision import PrecisionError, convert_precision
from graft.compiler.techniques.precision import evaluate as evaluation
from graft.compiler.techniques.precision.analysis import analyse
from graft.compiler.techniques.precision.apply import apply_plan
from graft.compiler.techniques.precision.ranges import session
from graft.ir.dtypes import DataType
from graft.ir.shapes import infer_shapes
from graft.rules.precision import PRECISION_META

F16 = DataType.FLOAT16


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, [nh.from_array(a, n) for n, a in inits])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def layernorm_hostile(seed: int = 0) -> onnx.ModelProto:
    """An fp16-hostile model: its input (|x| ≈ 1e5, e.g. unnormalized features) goes straight into
    LayerNormalization, then MatMul → Relu → MatMul. float16 holds at most 65504."""
    rng = np.random.default_rng(seed)
    return _model([h.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1, name="ln"),
                   h.make_node("MatMul", ["n", "w1"], ["m"], name="mm1"), h.make_node("Relu", ["m"], ["r"], name="relu"),
                   h.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
                  [h.make_tensor_value_info("x", T.FLOAT, ["batch", 64])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", 16])],
                  [("g", np.ones(64, np.float32)), ("b", np.zeros(64, np.float32)),
                   ("w1", (rng.standard_normal((64, 64)) / 8).astype(np.float32)),
                   ("w2", (rng.standard_normal((64, 16)) / 8).astype(np.float32))])


def layernorm_hostile_feeds(n: int = 3, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((4, 64)) * 3e4).astype(np.float32)} for _ in range(n)]


def masked_softmax_hostile() -> onnx.ModelProto:
    """An fp16-hostile model: attention with transformers' additive mask ``(1 - mask) * finfo(float32).min``
    (-3.4e38, far beyond float16), added to the scores before Softmax."""
    return _model([h.make_node("Cast", ["mask"], ["mf"], to=T.FLOAT, name="mask_float"),
                   h.make_node("Sub", ["one", "mf"], ["inv"], name="invert"),
                   h.make_node("Mul", ["inv", "fmin"], ["bias"], name="mask_bias"),
                   h.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
                   h.make_node("Add", ["s", "bias"], ["sb"], name="masked"),
                   h.make_node("Softmax", ["sb"], ["p"], axis=-1, name="softmax"),
                   h.make_node("MatMul", ["p", "v"], ["y"], name="context")],
                  [h.make_tensor_value_info("q", T.FLOAT, ["batch", 8, 16]),
                   h.make_tensor_value_info("kt", T.FLOAT, ["batch", 16, 8]),
                   h.make_tensor_value_info("v", T.FLOAT, ["batch", 8, 16]),
                   h.make_tensor_value_info("mask", T.INT64, ["batch", 1, 8])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", 8, 16])],
                  [("one", np.array(1.0, np.float32)), ("fmin", np.array(np.finfo(np.float32).min, np.float32))])


def masked_softmax_feeds(n: int = 3, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    mask = np.ones((2, 1, 8), np.int64)
    mask[1, :, 5:] = 0  # the second sequence is padded
    return [{"q": rng.standard_normal((2, 8, 16)).astype(np.float32),
             "kt": rng.standard_normal((2, 16, 8)).astype(np.float32),
             "v": rng.standard_normal((2, 8, 16)).astype(np.float32), "mask": mask} for _ in range(n)]


def _ir(proto) -> ir.Model:
    m = ir.from_onnx(proto)
    infer_shapes(m)
    return m


def _fp32(proto, feeds):
    s = session(proto)
    return [s.run(None, f)[0] for f in feeds]


def _kept(res) -> dict[str, str]:
    return {node: reason for node, _, _, reason in res.report.kept}


# ---------------------------------------------------------------- overflow-aware
def test_layernorm_on_huge_inputs_stays_float32_where_plain_conversion_gives_nan():
    proto, feeds = layernorm_hostile(), layernorm_hostile_feeds()
    res = convert_precision(_ir(proto), "fp16", calibration=feeds, backend="torch")
    kept = _kept(res)
    assert list(kept) == ["ln"]
    assert kept["ln"].startswith("range exceeds fp16 (max |x| = 1.") and "at 'x'" in kept["ln"]
    assert res.report.converted == 3
    out = ir.to_onnx(res.model)
    onnx.checker.check_model(out, full_check=True)
    ref = _fp32(proto, feeds)
    for backend in ("torch", "onnxruntime"):
        got = evaluation.run(res.model, feeds, backend)
        for r, g in zip(ref, got):
            assert np.isfinite(g["y"]).all()
            assert np.abs(g["y"] - r).max() <= 1e-2 * np.abs(r).max(), backend
    # the same model with every node the schema allows in float16 (no measured ranges) overflows
    plain = analyse(_ir(proto), F16, None)
    assert not plain.kept
    plain_model, _ = apply_plan(_ir(proto), plain, True)
    assert not np.isfinite(evaluation.run(plain_model, feeds[:1], "torch")[0]["y"]).all()


def test_attention_mask_beyond_float16_saturates_without_changing_meaning():
    proto, feeds = masked_softmax_hostile(), masked_softmax_feeds()
    res = convert_precision(_ir(proto), "fp16", calibration=feeds, backend="torch")
    assert res.report.saturated == {"fmin": pytest.approx(3.4028235e38)}
    assert not res.report.kept  # the mask path converts too: its -65504s are mask values, not data
    out = ir.to_onnx(res.model)
    onnx.checker.check_model(out, full_check=True)
    consts = {t.name: nh.to_array(t) for t in out.graph.initializer}
    assert consts["fmin"].dtype == np.float16 and float(consts["fmin"]) == -65504.0  # never a silent -1e4
    ref = _fp32(proto, feeds)
    for backend in ("torch", "onnxruntime"):
        for r, g in zip(ref, evaluation.run(res.model, feeds, backend)):
            assert np.isfinite(g["y"]).all()
            assert np.abs(g["y"] - r).max() <= 1e-2 * np.abs(r).max(), backend
    assert "saturated to ±65504" in res.summary()


def test_constant_that_is_data_not_a_mask_keeps_its_readers_float32():
    """Saturating 1e5 to 65504 changes a scale factor's outputs: the Mul reading it stays float32."""
    proto = _model([h.make_node("Mul", ["x", "k"], ["s"], name="scale"), h.make_node("Tanh", ["s"], ["t"], name="tanh"),
                    h.make_node("Add", ["t", "x"], ["y"], name="add")],
                   [h.make_tensor_value_info("x", T.FLOAT, [8])], [h.make_tensor_value_info("y", T.FLOAT, [8])],
                   [("k", np.array(1e5, np.float32))])
    feeds = [{"x": np.linspace(-2e-5, 2e-5, 8, dtype=np.float32)}]
    res = convert_precision(_ir(proto), "fp16", calibration=feeds, backend="torch")
    kept = _kept(res)
    assert "scale" in kept and "constant 'k'" in kept["scale"] and "changes the float32 outputs" in kept["scale"]
    assert res.report.saturated == {}


def test_float32_already_infinite_on_the_data_is_reported_not_blamed():
    proto = _model([h.make_node("Exp", ["x"], ["e"], name="exp"), h.make_node("Mul", ["e", "x"], ["y"], name="mul")],
                   [h.make_tensor_value_info("x", T.FLOAT, [4])], [h.make_tensor_value_info("y", T.FLOAT, [4])])
    feeds = [{"x": np.array([0.5, 1.0, 100.0, -1.0], np.float32)}]  # exp(100) overflows float32 itself
    res = convert_precision(_ir(proto), "fp16", calibration=feeds, backend="torch")
    assert res.report.fp32_nonfinite == {"y": 1}
    assert res.report.accuracy[0].nonfinite == 0  # no value is non-finite that float32 had finite
    assert "float32 output 'y' is already inf/NaN on the data (1 values): a fault of the data or the model" \
        in res.summary()


def test_reduction_whose_sum_overflows_in_float16_stays_float32():
    """ReduceL2 of 64 values ≈ 300: the inputs and the output (≈ 2400) fit float16, the sum of squares
    (≈ 5.8e6) does not; the measured error in float16 says so."""
    proto = _model([h.make_node("ReduceL2", ["x"], ["n"], axes=[-1], keepdims=1, name="norm"),
                    h.make_node("Div", ["x", "n"], ["y"], name="normalize")],
                   [h.make_tensor_value_info("x", T.FLOAT, [2, 64])], [h.make_tensor_value_info("y", T.FLOAT, [2, 64])],
                   opset=17)
    feeds = [{"x": (300 + np.random.default_rng(0).standard_normal((2, 64))).astype(np.float32)}]
    res = convert_precision(_ir(proto), "fp16", calibration=feeds, backend="torch")
    kept = _kept(res)
    assert list(kept) == ["norm"]
    assert kept["norm"].startswith("reduction over 64 elements (measured error inf in fp16")
    (r,) = res.analysis.reductions
    assert (r.node, r.elements, r.error) == ("norm", 64, float("inf"))


def test_overflow_inside_an_if_body_is_traced_and_the_body_kept_float32():
    """Values inside If bodies are not measured; an output overflow is traced to the If and its body
    nodes stay float32 in a second round."""
    then_g = h.make_graph([h.make_node("Mul", ["x", "k"], ["t1"], name="body_mul"),
                           h.make_node("Div", ["t1", "k"], ["t"], name="body_div")], "then", [],
                          [h.make_tensor_value_info("t", T.FLOAT, [4])],
                          [nh.from_array(np.array(1000.0, np.float32), "k")])
    else_g = h.make_graph([h.make_node("Neg", ["x"], ["e"], name="body_neg")], "else", [],
                          [h.make_tensor_value_info("e", T.FLOAT, [4])])
    proto = _model([h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")],
                   [h.make_tensor_value_info("x", T.FLOAT, [4]), h.make_tensor_value_info("c", T.BOOL, [])],
                   [h.make_tensor_value_info("y", T.FLOAT, [4])])
    feeds = [{"x": np.array([100.0, -200.0, 3.0, 0.5], np.float32), "c": np.array(True)}]
    res = convert_precision(_ir(proto), "fp16", calibration=feeds, backend="torch")
    assert res.report.rounds == 2
    kept = _kept(res)
    for node in ("body_mul", "body_div", "body_neg"):
        assert "inside the body of If 'branch'" in kept[node], kept
    y = evaluation.run(res.model, feeds, "torch")[0]["y"]
    assert np.array_equal(y, feeds[0]["x"])


def test_schema_decides_and_block_list_applies():
    """Range-11 takes no float16 (its schema: float, double, int16/32/64; Range-27 does): kept with that
    reason, the rest converts; a user block list keeps a node the schema allows."""
    proto = _model([h.make_node("Range", ["start", "limit", "delta"], ["r"], name="range"),
                    h.make_node("Add", ["x", "r"], ["a"], name="add"), h.make_node("Sigmoid", ["a"], ["y"], name="sig")],
                   [h.make_tensor_value_info("x", T.FLOAT, [4])], [h.make_tensor_value_info("y", T.FLOAT, [4])],
                   [("start", np.array(0.0, np.float32)), ("limit", np.array(2.0, np.float32)),
                    ("delta", np.array(0.5, np.float32))])
    res = convert_precision(_ir(proto), "fp16", exclude=["Sigmoid"], backend="torch")
    kept = _kept(res)
    assert kept["range"] == "op not supported in fp16 (Range-11 takes float, double for T; Range-27 allows it)"
    assert kept["sig"] == "user block list ('Sigmoid')"
    assert res.report.converted == 1 and res.report.synthetic
    out = ir.to_onnx(res.model)
    onnx.checker.check_model(out, full_check=True)
    meta = {n.name: {e.key: e.value for e in n.metadata_props} for n in out.graph.node}
    assert meta["range"][PRECISION_META].startswith("float32: op not supported in fp16")
    assert meta["add"][PRECISION_META] == "float16"


def test_without_keep_io_types_the_interface_is_float16():
    proto = layernorm_hostile()
    res = convert_precision(_ir(proto), "fp16", keep_io_types=False, backend="torch",
                            calibration=[{"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}])
    out = ir.to_onnx(res.model)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.input[0].type.tensor_type.elem_type == T.FLOAT16
    assert out.graph.output[0].type.tensor_type.elem_type == T.FLOAT16
    assert [o.name for o in out.graph.output] == ["y"] and res.report.casts == 0
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    (y,) = session(out).run(None, {"x": x.astype(np.float16)})
    ref = _fp32(proto, [{"x": x}])[0]
    assert y.dtype == np.float16 and np.abs(y.astype(np.float32) - ref).max() <= 1e-2 * np.abs(ref).max()


# ---------------------------------------------------------------- bfloat16 and bad input
def _mlp17(opset=17):
    rng = np.random.default_rng(0)
    return _model([h.make_node("MatMul", ["x", "w"], ["m"], name="mm"), h.make_node("Add", ["m", "b"], ["a"], name="add"),
                   h.make_node("Relu", ["a"], ["y"], name="relu")],
                  [h.make_tensor_value_info("x", T.FLOAT, [2, 8])], [h.make_tensor_value_info("y", T.FLOAT, [2, 8])],
                  [("w", rng.standard_normal((8, 8)).astype(np.float32)), ("b", rng.standard_normal(8).astype(np.float32))],
                  opset=opset)


def test_bf16_below_opset_13_names_the_ops_and_the_opset():
    with pytest.raises(PrecisionError) as e:
        convert_precision(_ir(_mlp17(opset=12)), "bf16")
    assert str(e.value).startswith("bf16 at opset 12: 3 of 3 float nodes cannot take it; the ONNX schemas allow "
                                   "bfloat16 for Add, MatMul, Relu from opset 13; convert the model to opset 13 first")


def test_bf16_for_onnxruntime_names_the_missing_kernels():
    with pytest.raises(PrecisionError) as e:
        convert_precision(_ir(_mlp17()), "bf16")
    msg = str(e.value)
    assert "(CPUExecutionProvider) has no bfloat16 kernel for" in msg
    for op in ("Add-14", "MatMul-13", "Relu-14"):
        assert op in msg


def test_bf16_without_the_runtime_check_runs_in_the_torch_backend():
    proto = _mlp17()
    feeds = [{"x": np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)}]
    res = convert_precision(_ir(proto), "bf16", runtime=None, calibration=feeds)
    out = ir.to_onnx(res.model)
    onnx.checker.check_model(out, full_check=True)
    assert {t.data_type for t in out.graph.initializer} == {T.BFLOAT16}
    assert res.report.backend.startswith("the torch backend") and res.report.converted == 3
    ref = _fp32(proto, feeds)[0]
    got = evaluation.run(res.model, feeds, "torch")[0]["y"]
    assert np.abs(got - ref).max() <= 2 ** -6 * np.abs(ref).max()  # a few bfloat16 roundoffs (2^-8)


# ---------------------------------------------------------------- compile() and the CLI
def test_compile_reports_precision_and_saves_a_float16_model(tmp_path):
    res = graft_compile(masked_softmax_hostile(), precision="fp16", calibration=masked_softmax_feeds(),
                        precision_options={"backend": "torch"})
    assert res.precision is not None and res.precision.report.converted == 7
    assert res.counts["convert_precision"] == 7
    text = res.report()
    assert "as lower precision does" in text and "verification FAILED" not in text
    assert res.after.bytes < res.before.bytes
    path = tmp_path / "m16.onnx"
    res.save(path)
    onnx.checker.check_model(str(path), full_check=True)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"GRAFT_DEBUG": ""})


def test_cli_precision(tmp_path):
    src = tmp_path / "mlp.onnx"
    onnx.save(_mlp17(), str(src))
    out = tmp_path / "mlp16.onnx"
    r = invoke("compile", src, "-o", out, "--precision", "fp16", "--no-keep-io-types")
    assert r.exit_code == 0, r.output
    assert "precision float16: 2 of 2 float nodes converted" in r.stdout  # optimize fused MatMul+Add into Gemm
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.elem_type == T.FLOAT16
    r = invoke("compile", src, "-o", tmp_path / "bf.onnx", "--precision", "bf16")
    assert r.exit_code == 1 and not (tmp_path / "bf.onnx").exists()
    assert "--precision bf16: onnxruntime" in r.stderr and "has no bfloat16 kernel for Gemm-13, Relu-14" in r.stderr
    r = invoke("compile", src, "-o", tmp_path / "bf.onnx", "--precision", "bf16", "--no-verify", "-q")
    assert r.exit_code == 0, r.output
    assert onnx.load(str(tmp_path / "bf.onnx")).graph.initializer[0].data_type == T.BFLOAT16
    r = invoke("compile", src, "-o", tmp_path / "x.onnx", "--no-keep-io-types")
    assert r.exit_code == 1 and "--no-keep-io-types applies to --precision fp16|bf16 only" in r.stderr
