"""ONNX → IR → ONNX on the real models: lossless, checker-valid, bit-identical outputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graft import ir
from graft.compiler.techniques import numeric
from graft.ir import zoo
from graft.ir.verifier import problems

# Feeds that fit each model (PP-OCR: NCHW images; MiniLM: token ids + mask).
FEEDS = {
    "ppocr-cls": lambda rng: {"x": rng.standard_normal((1, 3, 48, 192)).astype(np.float32)},
    "ppocr-det": lambda rng: {"x": rng.standard_normal((1, 3, 64, 96)).astype(np.float32)},
    "ppocr-rec": lambda rng: {"x": rng.standard_normal((1, 3, 48, 160)).astype(np.float32)},
    "minilm": lambda rng: {"input_ids": rng.integers(0, 1000, (2, 11)).astype(np.int64),
                           "attention_mask": np.array([[1] * 11, [1] * 7 + [0] * 4], dtype=np.int64)},
}


@pytest.fixture(scope="module", params=list(FEEDS))
def real(request):
    path = zoo.resolve(request.param)
    original = onnx.load(str(path))
    model = ir.load(path)
    return request.param, path, original, model, ir.to_onnx(model)


def test_serialized_bytes_identical(real):
    _, _, original, _, out = real
    assert out.SerializeToString() == original.SerializeToString()


def test_passes_full_checker_and_verifier(real):
    _, _, _, model, out = real
    onnx.checker.check_model(out, full_check=True)
    assert problems(model) == []


def test_interface_and_metadata_preserved(real):
    _, _, original, model, out = real
    assert [(o.domain, o.version, o.HasField("domain")) for o in out.opset_import] == \
        [(o.domain, o.version, o.HasField("domain")) for o in original.opset_import]
    assert [(p.key, p.value) for p in out.metadata_props] == [(p.key, p.value) for p in original.metadata_props]
    assert [o.name for o in out.graph.output] == [o.name for o in original.graph.output]
    assert [i.name for i in out.graph.input] == [i.name for i in original.graph.input]
    assert list(out.graph.value_info) == list(original.graph.value_info)
    assert [n.name for n in out.graph.node] == [n.name for n in original.graph.node]
    assert [(n.op_type, list(n.input), list(n.output)) for n in out.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in original.graph.node]
    assert [t.name for t in out.graph.initializer] == [t.name for t in original.graph.initializer]
    assert (out.ir_version, out.producer_name, out.producer_version) == \
        (original.ir_version, original.producer_name, original.producer_version)
    assert len(model.graph) == len(original.graph.node)


def test_outputs_bit_identical_in_onnxruntime(real):
    name, _, original, _, out = real
    feeds = FEEDS[name](np.random.default_rng(0))
    ref = numeric.run(original, feeds)
    got = numeric.run(out, feeds)
    assert list(ref) == list(got)
    for k in ref:
        assert ref[k].shape == got[k].shape and ref[k].size > 0
        assert np.array_equal(ref[k], got[k]), f"{name} output {k} differs after round trip"


def test_save_and_reload_identical(real, tmp_path):
    _, _, original, model, _ = real
    p = tmp_path / "m.onnx"
    ir.save(model, p)
    assert not (tmp_path / "m.onnx.data").exists()  # small models stay in one file
    assert p.read_bytes() == original.SerializeToString()
    again = ir.to_onnx(ir.load(p))
    assert again.SerializeToString() == original.SerializeToString()
