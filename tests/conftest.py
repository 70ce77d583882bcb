"""Shared fixtures: real models from PyPI packages and small ONNX-text helpers."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from graft.compiler.techniques import numeric
from graft.ir import zoo


@pytest.fixture(scope="session")
def ppocr_cls_path():
    return zoo.ppocr_path("ppocr-cls")


@pytest.fixture(scope="session")
def ppocr_det_path():
    return zoo.ppocr_path("ppocr-det")


@pytest.fixture(scope="session")
def ppocr_rec_path():
    return zoo.ppocr_path("ppocr-rec")


@pytest.fixture(scope="session")
def minilm_onnx_path():
    return zoo.minilm_onnx()


def parse_model(text: str) -> onnx.ModelProto:
    """An ONNX model from ONNX text syntax (``onnx.parser``), checked."""
    m = onnx.parser.parse_model(text)
    onnx.checker.check_model(m, full_check=True)
    return m


def with_initializers(model: onnx.ModelProto, **arrays: np.ndarray) -> onnx.ModelProto:
    """Add numpy arrays as initializers (by name) and re-check the model."""
    for name, arr in arrays.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_same_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto, atol: float = 1e-5,
                        feeds=None, dim_sizes=None):
    """Both models run in onnxruntime and agree within ``atol`` on every output."""
    onnx.checker.check_model(candidate, full_check=True)
    res = numeric.compare(reference, candidate, feeds, dim_sizes=dim_sizes)
    for r in res:
        assert r.max_abs <= atol, f"output {r.name}: max abs {r.max_abs} > {atol}"
    return res
