"""Quantization on real models: the digits CNN, PP-OCR's text-direction classifier, all-MiniLM-L6-v2.

The targets of issue 4 checked for correctness (speed is measured in bench/bench_quantize.py, never here).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import onnxruntime as ort
import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
sys.path.insert(0, os.path.abspath(EXAMPLES))

from graft.compiler.techniques.quantization import quantize  # noqa: E402


def _session(src):
    return ort.InferenceSession(src if isinstance(src, (str, bytes)) else src.SerializeToString(),
                                providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- digits CNN
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from digits_cnn import make_digits_model

    return make_digits_model(str(tmp_path_factory.mktemp("digits")), epochs=8)


def test_digits_cnn_int8_accuracy_within_half_a_point(digits):
    from digits_cnn import accuracy

    path, x_tr, y_tr, x_te, y_te = digits
    calib = [{"image": x_tr[i:i + 32]} for i in range(0, 256, 32)]
    res = quantize(path, "static", calib, calib_method="percentile", eval_data=[{"image": x_te}], progress=False)
    f_acc, q_acc = accuracy(path, x_te, y_te), accuracy(res.proto, x_te, y_te)
    assert f_acc > 90.0
    assert abs(q_acc - f_acc) <= 0.5, (f_acc, q_acc)
    assert res.report.held_out and res.report.outputs[0].min_cosine > 0.99
    assert len(res.report.layers) == 5 and all(np.isfinite(l.sqnr_db) for l in res.report.layers)
    assert len(res.proto.SerializeToString()) < 0.4 * os.path.getsize(path)


# ---------------------------------------------------------------- PP-OCR text direction
@pytest.fixture(scope="module")
def text_lines():
    from text_lines import render_text_lines

    return render_text_lines(264, seed=0)


def test_ppocr_cls_int8_agrees_with_float_on_rendered_lines(ppocr_cls_path, text_lines):
    x, labels = text_lines
    calib, held_x = [{"x": x[i:i + 8]} for i in range(0, 64, 8)], x[64:]
    res = quantize(str(ppocr_cls_path), "static", calib, upgrade_opset=True, report=False, progress=False)
    f = _session(str(ppocr_cls_path))
    q = _session(res.proto)
    pf = np.concatenate([f.run(None, {"x": held_x[i:i + 25]})[0] for i in range(0, len(held_x), 25)]).argmax(1)
    pq = np.concatenate([q.run(None, {"x": held_x[i:i + 25]})[0] for i in range(0, len(held_x), 25)]).argmax(1)
    assert len(pf) >= 200
    assert (pq == pf).mean() >= 0.99
    assert (pf == labels[64:]).mean() > 0.9          # the rendered lines are real text the model reads
    assert res.model.opset == 13 and any("opset 11 to 13" in n for n in res.notes)


def test_ppocr_cls_per_channel_needs_opset_13(ppocr_cls_path):
    from graft.compiler.techniques.quantization import QuantizationError

    with pytest.raises(QuantizationError, match=r"needs ai.onnx opset >= 13 .*imports opset 11"):
        quantize(str(ppocr_cls_path), "static-per-channel", [{"x": np.zeros((1, 3, 48, 192), np.float32)}],
                 progress=False)


# ---------------------------------------------------------------- all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm_quantized(minilm_onnx_path):
    from sentence_data import feeds, sentences

    calib, held = sentences()
    res = quantize(str(minilm_onnx_path), "dynamic", feeds(calib), smooth="split", report=False, progress=False)
    return res, feeds(held[:24] + [s for s in held if len(s.split()) <= 4])


def test_minilm_dynamic_int8_sentence_embeddings_cosine(minilm_onnx_path, minilm_quantized):
    from sentence_data import embedding_cosine

    res, held = minilm_quantized
    f, q = _session(str(minilm_onnx_path)), _session(res.proto)
    cos = [embedding_cosine(f.run(None, fd), q.run(None, fd), fd) for fd in held]
    assert min(cos) >= 0.99, sorted(cos)[:3]
    assert res.counts["dynamic_quantize_matmul"] == 36 and res.counts["quantize_embedding"] == 3
    assert res.counts["smooth_matmul_input"] > 0


def test_minilm_int8_size(minilm_onnx_path, minilm_quantized):
    res, _ = minilm_quantized
    assert len(res.proto.SerializeToString()) <= 0.27 * os.path.getsize(minilm_onnx_path)
