"""Per-channel constant Add after Conv / ConvTranspose folds into the bias (graft.rules.fuse_bias)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import pytest

from graft import ir
from graft.compiler import compile, explain, rewrite
from conftest import assert_same_outputs, with_initializers
from graft.rules import fold_batchnorm
from graft.rules.fuse_bias import RULES, fuse_add_into_conv_bias

RNG = np.random.default_rng(0)


def build(body: str, **arrays) -> onnx.ModelProto:
    text = '<ir_version: 10, opset_import: ["" : 17]>\n' + body
    return with_initializers(onnx.parser.parse_model(text), **arrays)


def run_rules(proto, rules=RULES):
    model = ir.from_onnx(proto)
    result = rewrite(model, rules)
    return ir.to_onnx(model), result


@pytest.mark.parametrize("c_shape", [(1, 6, 1, 1), (6, 1, 1), (1, 1, 1, 1), (1,)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_add_folds_into_bias(c_shape, bias):
    conv = "t = Conv <pads = [1, 1, 1, 1]> (x, W, B)" if bias else "t = Conv <pads = [1, 1, 1, 1]> (x, W)"
    arrays = dict(W=RNG.normal(size=(6, 3, 3, 3)).astype(np.float32),
                  C=RNG.normal(size=c_shape).astype(np.float32))
    if bias:
        arrays["B"] = RNG.normal(size=6).astype(np.float32)
    proto = build(f"""
        g (float[1, 3, 8, 8] x) => (float[1, 6, 8, 8] y) {{
            {conv}
            y = Add (t, C)
        }}""", **arrays)
    out, result = run_rules(proto)
    assert result.counts["fuse_add_into_conv_bias"] == 1
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert len(out.graph.node[0].input) == 3
    assert_same_outputs(proto, out, atol=1e-5)


def test_grouped_conv_transpose_add_then_bn_fold_to_one_node():
    # The PP-OCRv4 detector's shape: ConvTranspose, a per-channel Add, BatchNormalization.
    C_in, C_out, g = 4, 6, 2
    proto = build(f"""
        g (float[1, {C_in}, 5, 5] x) => (float[1, {C_out}, 10, 10] y) {{
            t = ConvTranspose <group = {g}, strides = [2, 2], kernel_shape = [2, 2]> (x, W)
            u = Add (t, C)
            y = BatchNormalization (u, gamma, beta, mean, var)
        }}""", W=RNG.normal(size=(C_in, C_out // g, 2, 2)).astype(np.float32),
        C=RNG.normal(size=(1, C_out, 1, 1)).astype(np.float32),
        gamma=RNG.uniform(0.5, 2, C_out).astype(np.float32), beta=RNG.normal(size=C_out).astype(np.float32),
        mean=RNG.normal(size=C_out).astype(np.float32), var=RNG.uniform(0.5, 2, C_out).astype(np.float32))
    out, result = run_rules(proto, [*RULES, *fold_batchnorm.RULES])
    assert result.counts == Counter(fuse_add_into_convtranspose_bias=1, fold_batchnorm_into_conv_transpose=1)
    assert [n.op_type for n in out.graph.node] == ["ConvTranspose"]
    assert_same_outputs(proto, out, atol=1e-5)


@pytest.mark.parametrize("c_shape,y_shape,reason", [
    ((1, 1, 8, 8), "1, 6, 8, 8", "not per-channel"),
    ((1, 6, 1, 8), "1, 6, 8, 8", "not per-channel"),
    ((1, 1, 6, 1, 1), "1, 1, 6, 8, 8", "would broadcast Y"),
])
def test_non_per_channel_add_is_refused(c_shape, y_shape, reason):
    proto = build("""
        g (float[1, 3, 8, 8] x) => (float[""" + y_shape + """] y) {
            t = Conv <pads = [1, 1, 1, 1]> (x, W)
            y = Add (t, C)
        }""", W=RNG.normal(size=(6, 3, 3, 3)).astype(np.float32), C=RNG.normal(size=c_shape).astype(np.float32))
    out, result = run_rules(proto)
    assert result.rewrites == 0
    _, misses = explain(ir.from_onnx(proto), fuse_add_into_conv_bias)
    assert reason in misses[0][1].reason


def test_ppocr_det_has_no_batchnorm_left_after_optimize(ppocr_det_path):
    before = Counter(n.op_type for n in onnx.load(str(ppocr_det_path)).graph.node)
    res = compile(str(ppocr_det_path), pipeline="optimize", dim_sizes={"?": 64})
    after = Counter(n.op_type for n in res.proto.graph.node)
    assert before["BatchNormalization"] == 3
    assert after["BatchNormalization"] == 0
    assert res.counts["fuse_add_into_convtranspose_bias"] == 2
    assert all(o.max_abs <= 1e-4 for o in res.verification.outputs)
