"""The quantization driver's surface: auto format selection, the accuracy report, fallback,
``compiler.compile(quantize=...)``, ``graft compile --quantize``, and the torch target."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from graft import ir
from graft.compiler.techniques.calibration import CalibrationDataError
from graft.compiler.techniques.quantization import QuantizationError, quantize
from conftest import with_initializers

CNN = """<ir_version: 10, opset_import: ["" : 17]>
cnn (float[N, 2, 8, 8] x) => (float[N, 5] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
    f = Flatten (p1)
    y = Gemm <transB = 1> (f, wf, bf)
}"""


@pytest.fixture(scope="module")
def cnn():
    rng = np.random.default_rng(0)
    return with_initializers(onnx.parser.parse_model(CNN), w1=(rng.normal(size=(4, 2, 3, 3)) * 0.5).astype(np.float32),
                             b1=(rng.normal(size=4) * 0.1).astype(np.float32),
                             wf=(rng.normal(size=(5, 64)) * 0.1).astype(np.float32),
                             bf=(rng.normal(size=5) * 0.1).astype(np.float32))


def feeds(n=6, seed=1, batch=2):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(batch, 2, 8, 8)).astype(np.float32)} for _ in range(n)]


def test_auto_times_every_candidate_and_keeps_the_fastest_within_budget(cnn):
    res = quantize(cnn, "auto", feeds(), eval_data=feeds(3, seed=5), progress=False)
    ar = res.auto
    names = [c.mode for c in ar.candidates]
    assert names == ["float (input model)", "static-per-tensor", "static-per-channel", "dynamic"]
    built = [c for c in ar.candidates[1:] if c.result is not None]
    assert len(built) == 3 and all(c.latency_ms > 0 and 0.9 < c.score <= 1.0 for c in built)
    ok = [c for c in built if c.score >= ar.budget]
    assert ar.chosen == min(ok, key=lambda c: c.latency_ms).mode
    table = ar.table()
    for c in ar.candidates:
        assert c.mode in table
    assert res.mode == ar.chosen and res.report is not None and res.report.held_out


def test_auto_without_calibration_skips_static_and_says_why(cnn):
    res = quantize(cnn, "auto", progress=False, report=False)
    status = {c.mode: c.status for c in res.auto.candidates}
    assert status["static-per-tensor"] == "skipped: needs calibration data"
    assert res.mode == "dynamic"


def test_auto_with_an_impossible_budget_keeps_the_most_accurate(cnn):
    from graft.compiler.techniques.quantization.auto import auto_quantize

    ar = auto_quantize(cnn, feeds(), budget=1.01, progress=False)
    best = max((c for c in ar.candidates[1:] if c.result is not None), key=lambda c: c.score)
    assert ar.chosen == best.mode and "none met the budget" in best.status


def test_report_per_output_and_per_layer(cnn):
    res = quantize(cnn, "static", feeds(), eval_data=feeds(2, seed=7), progress=False)
    rep = res.report
    (out,) = rep.outputs
    assert out.name == "y" and 0 < out.max_abs and 0 < out.max_rel < 0.2 and 0.99 < out.min_cosine <= out.mean_cosine
    assert {l.node for l in rep.layers} == {"c1", "y"} and all(15 < l.sqnr_db < 80 for l in rep.layers)
    assert rep.worst_layers(1)[0].added_sqnr_db == min(l.added_sqnr_db for l in rep.layers)
    text = rep.render()
    assert "held-out" in text and "SQNR" in text and "c1" in text


def test_random_calibration_is_flagged_as_a_smoke_test(cnn):
    from graft.compiler.techniques.calibration import CalibrationData

    res = quantize(cnn, "static", CalibrationData.random(ir.from_onnx(cnn), n=2, dim_sizes={"N": 1}), progress=False)
    assert any("smoke test" in n for n in res.notes)
    assert res.report.synthetic and "RANDOM data" in res.report.render()


def test_accuracy_target_keeps_layers_in_float(cnn):
    # a target no int8 model reaches: the fallback keeps layers in float, best first, and says so
    res = quantize(cnn, "static", feeds(), accuracy_target=0.99999999, max_float_layers=2, progress=False,
                   report=False)
    assert res.excluded and any("kept" in n and "in float" in n for n in res.notes)


def test_static_without_calibration_and_bad_options_fail_clearly(cnn):
    with pytest.raises(QuantizationError, match="needs calibration data"):
        quantize(cnn, "static", progress=False)
    with pytest.raises(QuantizationError, match="unknown quantization format 'int8'"):
        quantize(cnn, "int8", progress=False)
    with pytest.raises(CalibrationDataError, match=r"input 'x' has shape \[2, 3, 8, 8\].*dim 1 must be 2"):
        quantize(cnn, "static", [{"x": np.zeros((2, 3, 8, 8), np.float32)}], progress=False)


def test_compile_api_with_quantize(cnn, tmp_path):
    from graft.compiler import compile

    res = compile(cnn, quantize="static", calibration=feeds())
    assert res.quantization is not None and res.quantization.report.outputs[0].min_cosine > 0.99
    assert res.counts["quantize_conv_weight"] == 1
    types = {n.op_type for n in res.proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= types
    res.save(tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)


def test_cli_compile_quantize(cnn, tmp_path):
    from graft.compiler.driver.cli import main

    src = tmp_path / "cnn.onnx"
    onnx.save(cnn, src)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in feeds()]))
    out = tmp_path / "cnn.int8.onnx"
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(out), "--quantize", "static", "--calibration",
                                  str(tmp_path / "calib.npz"), "--calib-method", "entropy", "--exclude", "y"])
    assert r.exit_code == 0, r.output
    assert out.exists() and "accuracy vs float" in r.output and "SQNR" in r.output
    gemm = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "Gemm")
    assert gemm.input[1] == "wf"                                   # excluded: float weight
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "x.onnx"), "--quantize", "static"])
    assert r.exit_code == 1 and "needs calibration data" in r.output
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 2, 8, 8), np.float64))
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "x.onnx"), "--quantize", "static",
                                  "--calibration", str(tmp_path / "bad.npz")])
    assert r.exit_code == 1 and "input 'x' has dtype float64, the model expects float32" in r.output
    assert not (tmp_path / "x.onnx").exists()
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "x.onnx"), "--quantize",
                                  "weight-only-int4"])
    assert r.exit_code == 1 and "needs ai.onnx opset >= 21" in r.output


def test_torch_target_fake_quant_matches_the_onnx_qdq_model():
    """Issue 4 item 7: quantized torch model out as an fx GraphModule; outputs within one quantization step."""
    import torch
    from graft.compiler import compile
    from graft.compiler.techniques.calibration.ort_runner import run_feeds

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5)).eval()
    rng = np.random.default_rng(0)
    calib = [rng.normal(size=(2, 2, 8, 8)).astype(np.float32) for _ in range(6)]
    res = compile(model, (torch.from_numpy(calib[0]),), target="torch", quantize="static", calibration=calib)
    gm = res.module
    assert isinstance(gm, torch.fx.GraphModule)
    assert "fake_quantize" in gm.code
    proto = ir.to_onnx(res.model)
    x = rng.normal(size=(2, 2, 8, 8)).astype(np.float32)
    ort_out = run_feeds(proto, [{proto.graph.input[0].name: x}])[0][0]
    with torch.no_grad():
        fx_out = gm(torch.from_numpy(x)).numpy()
    out_dq = next(n for n in res.model.graph if n.op_type == "DequantizeLinear" and n.outputs[0].is_graph_output())
    step = float(out_dq.inputs[1].constant())
    assert np.abs(ort_out - fx_out).max() <= step
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(ref - fx_out).max() < 0.1 * np.abs(ref).max()
