"""Acceptance: the `optimize` pipeline on real models (PP-OCR det/rec/cls, all-MiniLM-L6-v2).

Each must lose nodes, pass onnx.checker (full_check), run in onnxruntime, and keep
every output within 1e-4 (abs) of the original on realistic inputs.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from graft.compiler.techniques import numeric
from graft.ir import zoo
from graft.compiler.driver.api import compile
from conftest import assert_same_outputs


def _image(h: int, w: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32)}


def _tokens(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 1000, (2, 16)).astype(np.int64),
            "attention_mask": np.ones((2, 16), np.int64)}


# name → realistic feeds (PP-OCR: cls 48×192 crops, det multiples of 32, rec height 48)
FEEDS = {
    "ppocr-cls": lambda seed=0: _image(48, 192, seed),
    "ppocr-det": lambda seed=0: _image(96, 128, seed),
    "ppocr-rec": lambda seed=0: _image(48, 160, seed),
    "minilm": _tokens,
}

_cache: dict = {}


def compiled(name: str):
    if name not in _cache:
        path = zoo.resolve(name)
        _cache[name] = (onnx.load(str(path)), compile(path, example_inputs=FEEDS[name](), pipeline="optimize"))
    return _cache[name]


@pytest.mark.parametrize("name", list(FEEDS))
def test_optimize_real_model(name):
    ref, res = compiled(name)
    assert res.after.nodes < res.before.nodes
    assert res.after.nodes == len(res.proto.graph.node)
    assert res.verification.status == "passed"
    assert all(o.max_abs <= 1e-4 for o in res.outputs), res.outputs
    assert all(r.value == "saturated" for r in res.stop_reasons.values())
    onnx.checker.check_model(res.proto, full_check=True)
    # other inputs than the ones verification used, run fresh in onnxruntime
    assert_same_outputs(ref, res.proto, atol=1e-4, feeds=FEEDS[name](seed=1))
    assert [o.name for o in res.proto.graph.output] == [o.name for o in ref.graph.output]


def test_cnn_batchnorms_are_folded():
    _, cls = compiled("ppocr-cls")
    ops = Counter(n.op_type for n in cls.proto.graph.node)
    assert cls.counts["fold_batchnorm_into_conv"] == 35 and ops["BatchNormalization"] == 0
    assert ops["Constant"] == 0 and cls.counts["constant_to_initializer"] == 308
    assert cls.after.parameters < cls.before.parameters
    _, rec = compiled("ppocr-rec")
    assert Counter(n.op_type for n in rec.proto.graph.node)["BatchNormalization"] == 0


def test_transformer_shape_chains_shrink():
    ref, res = compiled("minilm")
    before = Counter(n.op_type for n in ref.graph.node)
    after = Counter(n.op_type for n in res.proto.graph.node)
    assert after["Constant"] == 0 and after["Shape"] < before["Shape"]
    assert res.counts["fold_constants"] > 0
    # the compiled model serves every sequence length the original did
    feeds = {"input_ids": np.arange(2 * 7, dtype=np.int64).reshape(2, 7), "attention_mask": np.ones((2, 7), np.int64)}
    [a] = numeric.run(ref, feeds).values()
    [b] = numeric.run(res.proto, feeds).values()
    assert a.shape == b.shape == (2, 7, 384) and np.abs(a - b).max() <= 1e-4
