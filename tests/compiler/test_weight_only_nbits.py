"""Weight-only int4/int8 (issue 11): MatMulNBits and DequantizeLinear(block_size) → MatMul.

The integers are checked bit for bit against onnxruntime's own ``MatMulNBitsQuantizer``; the
outputs of both forms against a numpy dequantization of graft's integers; and the standard-ONNX
form against the graph onnxruntime writes after optimizing it (it must have become MatMulNBits).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graft import ir
from graft.compiler import compile
from graft.compiler.techniques.quantization import QuantizationError, quantize
from graft.rules.quantize_nbits import NBitsOptions, matmulnbits_tensors, quantize_blockwise


def _matmul_model(k: int, n: int, *, rows: int = 3, bias: bool = False, relu: bool = False, trans_b: bool = False,
                  seed: int = 0, opset: int = 21) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k) if trans_b else (k, n)) * 0.05).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    if trans_b or bias:
        b = (rng.standard_normal(n) * 0.1).astype(np.float32) if bias else np.zeros(n, np.float32)
        inits.append(numpy_helper.from_array(b, "b"))
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm", transB=int(trans_b))]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")]
    nodes.append(helper.make_node("Relu" if relu else "Identity", ["h"], ["y"], name="act"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), w


def _session(model, level: str | None = None, optimized: str | None = None):
    so = ort.SessionOptions()
    if level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
    if optimized:
        so.optimized_model_filepath = optimized
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_integers_match_onnxruntime_quantizer(bits, symmetric):
    """Same codes, scales and zero points as onnxruntime's MatMulNBitsQuantizer (RTN), byte for byte."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n, bs = 128, 48, 32
    model, w = _matmul_model(k, n, seed=bits + symmetric)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=bs, is_symmetric=symmetric)
    q.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    b, s, z = matmulnbits_tensors(quantize_blockwise(w, bits, bs, symmetric))
    packed = next(v for k_, v in theirs.items() if k_.endswith(f"_Q{bits}"))
    scales = next(v for k_, v in theirs.items() if k_.endswith("_scales"))
    assert packed.shape == b.shape == (n, k // bs, bs * bits // 8)
    np.testing.assert_array_equal(scales.reshape(s.shape), s)
    # onnxruntime rounds half away from zero, numpy half to even: exact ties may differ by one step
    assert (packed != b).mean() < 1e-3
    if symmetric:
        assert z is None and not any(k_.endswith("_zero_points") for k_ in theirs)
    else:
        zp = next(v for k_, v in theirs.items() if k_.endswith("_zero_points"))
        np.testing.assert_array_equal(zp.reshape(z.shape), z)


@pytest.mark.parametrize("bits,symmetric,k,block", [(4, True, 200, 32), (4, False, 200, 32), (8, True, 96, 64),
                                                    (8, False, 256, 16), (4, True, 256, 128)])
@pytest.mark.parametrize("form", ["matmulnbits", "dq"])
def test_output_is_numpy_dequantization(form, bits, symmetric, k, block):
    """onnxruntime's result of either form is x @ ((q - z) * s) of graft's integers (float32
    accumulation); K not a multiple of the block is padded; the weight error is within RTN's bound."""
    n = 40
    model, w = _matmul_model(k, n)
    res = quantize(model, f"weight-only-int{bits}", block_size=block, symmetric=symmetric, weight_format=form,
                   progress=False, report=False)
    ops = [node.op_type for node in res.model.graph]
    assert ("MatMulNBits" in ops) == (form == "matmulnbits") and ("DequantizeLinear" in ops) == (form == "dq")
    bw = quantize_blockwise(w, bits, block, symmetric)
    wq = bw.dequantize()
    # RTN: each weight within half a step of its block's grid, but those clipped at the grid's ends: one step
    step = np.abs(np.repeat(bw.scales, block, axis=0)[:k])
    err = np.abs(w - wq)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    clipped = (bw.q == lo) | (bw.q == hi)
    assert np.all(err <= step * (1 + 1e-6))
    assert np.all((err <= step * 0.5 * (1 + 1e-6)) | clipped)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    want = x.astype(np.float64) @ wq.astype(np.float64)
    # accuracy level 1: onnxruntime computes the fused form in float32 too
    got = _session(res.proto, level="1").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    f = x @ w
    rel = np.abs(got - f).max() / np.abs(f).max()
    assert rel < (0.12 if bits == 4 else 0.01)


def test_dq_form_becomes_matmulnbits_in_onnxruntime(tmp_path):
    """The standard-ONNX form is what onnxruntime 1.32 fuses: its optimized graph has MatMulNBits and
    no DequantizeLinear, even where the pipeline made a Gemm (+ Relu, which onnxruntime would fuse first)."""
    model, w = _matmul_model(256, 64, bias=True, relu=True)
    res = compile(model, quantize="weight-only-int4", verify=False, quantize_options={"progress": False})
    ops = [node.op_type for node in res.model.graph]
    assert "Gemm" not in ops and ops.count("MatMul") == 1 and ops.count("DequantizeLinear") == 1
    dq = next(node for node in res.model.graph if node.op_type == "DequantizeLinear")
    assert dq.attrs == {"axis": 0, "block_size": 32} and dq.inputs[0].dtype == ir.DataType.INT4
    opt = tmp_path / "ort.onnx"
    _session(res.proto, optimized=str(opt))
    fused = [node for node in onnx.load(str(opt)).graph.node]
    kinds = [node.op_type for node in fused]
    assert "MatMulNBits" in kinds and "DequantizeLinear" not in kinds and "Gemm" not in kinds
    level = {a.name: a.i for a in next(n for n in fused if n.op_type == "MatMulNBits").attribute}["accuracy_level"]
    assert level == 4  # onnxruntime's default for this fusion: int8 activations
    # the optimize pipeline run again cannot fold the dequantized weight back into a Gemm
    again = compile(res.proto, pipeline="optimize", verify=False)
    assert [node.op_type for node in again.model.graph].count("Gemm") == 0


def test_gemm_trans_b_weight_is_quantized_along_k():
    model, w = _matmul_model(128, 32, trans_b=True, bias=True)
    for form in ("dq", "matmulnbits"):
        res = quantize(model, "weight-only-int4", weight_format=form, progress=False, report=False)
        x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)
        b = numpy_helper.to_array(model.graph.initializer[1])
        want = x.astype(np.float64) @ quantize_blockwise(np.ascontiguousarray(w.T), 4, 32).dequantize() + b
        got = _session(res.proto, level="1").run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_matmulnbits_needs_no_opset_21_and_imports_its_domain():
    model, _ = _matmul_model(64, 16, opset=17)
    with pytest.raises(QuantizationError, match="needs ai.onnx opset >= 21"):
        quantize(model, "weight-only-int4", progress=False, report=False)
    res = quantize(model, "weight-only-int4", weight_format="matmulnbits", progress=False, report=False)
    assert res.model.opset == 17 and res.model.opset_imports["com.microsoft"] == 1
    onnx.checker.check_model(res.proto)


@pytest.mark.parametrize("kw,msg", [({"block_size": 48}, "power of two from 16 to 256"),
                                    ({"block_size": 8}, "power of two from 16 to 256"),
                                    ({"weight_format": "qdq"}, "form must be one of dq, matmulnbits"),
                                    ({"weight_format": "matmulnbits", "accuracy_level": 7}, "accuracy_level")])
def test_bad_options_are_named(kw, msg):
    model, _ = _matmul_model(64, 16)
    with pytest.raises(QuantizationError, match=msg):
        quantize(model, "weight-only-int4", progress=False, report=False, **kw)
    assert NBitsOptions().check().block_size == 32


def test_cli_weight_format_and_block_size(tmp_path):
    from graft.compiler.driver.cli import main

    model, w = _matmul_model(128, 32)
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src))
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(out), "-q", "--quantize", "weight-only-int8",
                                  "--weight-format", "matmulnbits", "--block-size", "64", "--asymmetric",
                                  "--accuracy-level", "4"])
    assert r.exit_code == 0, r.output
    node = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    assert node.domain == "com.microsoft" and len(node.input) == 4  # zero points: asymmetric
    assert attrs == {"K": 128, "N": 32, "bits": 8, "block_size": 64, "accuracy_level": 4}
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "x.onnx"), "--block-size", "64"])
    assert r.exit_code == 1 and "apply to --quantize weight-only-int4 and weight-only-int8 only" in r.output
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("form", ["matmulnbits", "dq"])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_embedding_table_rows_are_blockwise_quantized(form, bits, symmetric):
    """Gather on a (V, H) table → GatherBlockQuantized / DequantizeLinear of the gathered rows; the
    rows come back as the numpy dequantization of graft's integers, exactly."""
    from graft.rules.quantize_nbits import quantize_rows

    rng = np.random.default_rng(3)
    table = (rng.standard_normal((50, 64)) * 0.05).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 64])],
                          [numpy_helper.from_array(table, "table")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    plain = quantize(model, f"weight-only-int{bits}", progress=False, report=False)
    assert [n.op_type for n in plain.model.graph] == ["Gather"]  # off by default, as in onnxruntime
    res = quantize(model, f"weight-only-int{bits}", weight_format=form, symmetric=symmetric, block_size=16,
                   quantize_embeddings=True, progress=False, report=False)
    ops = [n.op_type for n in res.model.graph]
    if form == "dq" and bits == 4:  # ONNX Gather takes no int4: the table stays float, with the reason
        assert ops == ["Gather"]
        return
    assert ops == (["GatherBlockQuantized"] if form == "matmulnbits" else ["Gather"] * (2 + (not symmetric)) +
                   ["DequantizeLinear"])
    q, s, z = quantize_rows(table, bits, 16, symmetric)
    deq = (q.astype(np.float32) - (0 if z is None else np.repeat(z, 16, axis=1))) * np.repeat(s, 16, axis=1)
    ids = rng.integers(0, 50, (2, 5))
    got = _session(res.proto).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, deq[ids], rtol=1e-6, atol=1e-9)
    assert np.abs(got - table[ids]).max() <= np.abs(np.repeat(s, 16, axis=1)).max()
