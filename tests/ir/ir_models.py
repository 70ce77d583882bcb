"""Small ONNX models built with onnx.helper for the IR tests (opset sweep, subgraphs, custom domains)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def _init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def make(graph: onnx.GraphProto, opset: int = 17, extra_opsets: dict | None = None) -> onnx.ModelProto:
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    m = helper.make_model(graph, opset_imports=ops, producer_name="graft-tests",
                          ir_version=helper.find_min_ir_version_for(ops[:1]))
    onnx.checker.check_model(m, full_check=True)
    return m


def conv_bn_params(rng, c_out=4, c_in=3):
    return dict(W=rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32),
                B=rng.standard_normal(c_out).astype(np.float32),
                gamma=rng.uniform(0.5, 1.5, c_out).astype(np.float32),
                beta=rng.standard_normal(c_out).astype(np.float32),
                mean=rng.standard_normal(c_out).astype(np.float32),
                var=rng.uniform(0.5, 2.0, c_out).astype(np.float32))


def opset_model(opset: int, c_in: int = 3, c_out: int = 4) -> onnx.ModelProto:
    """Conv → BatchNormalization → Relu → ReduceMean(2,3) → Add, written for ``opset``.

    ReduceMean takes ``axes`` as an attribute before opset 18 and as an input from 18.
    """
    rng = np.random.default_rng(opset)
    p = conv_bn_params(rng, c_out, c_in)
    inits = [_init(k, v) for k, v in p.items()] + [_init("one", np.ones(c_out, np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn",
                         epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
    ]
    if opset >= 18:
        inits.append(_init("axes", np.array([2, 3], np.int64)))
        nodes.append(helper.make_node("ReduceMean", ["r", "axes"], ["pooled"], name="pool", keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMean", ["r"], ["pooled"], name="pool", axes=[2, 3], keepdims=0))
    nodes.append(helper.make_node("Add", ["pooled", "one"], ["y"], name="add"))
    g = helper.make_graph(nodes, f"opset{opset}", [helper.make_tensor_value_info("x", F, [1, c_in, 8, 8])],
                          [helper.make_tensor_value_info("y", F, [1, c_out])], inits)
    return make(g, opset)


def if_model() -> onnx.ModelProto:
    """If(cond): then = BN(Conv(x, W, B)), else = Relu(Conv(x, W, B)); x, W, B, BN stats read from the outer scope."""
    p = conv_bn_params(np.random.default_rng(1))
    out = helper.make_tensor_value_info
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["then_c"], name="then_conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["then_c", "gamma", "beta", "mean", "var"], ["then_out"],
                          name="then_bn")],
        "then_branch", [], [out("then_out", F, [1, 4, 8, 8])])
    else_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["else_c"], name="else_conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["else_c"], ["else_out"], name="else_relu")],
        "else_branch", [], [out("else_out", F, [1, 4, 8, 8])])
    g = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["xs"], name="pre"),
         helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
         helper.make_node("Add", ["y", "y"], ["z"], name="post")],
        "if_main", [out("x", F, [1, 3, 8, 8]), out("cond", TensorProto.BOOL, [])],
        [out("z", F, [1, 4, 8, 8]), out("xs", F, [1, 3, 8, 8])], [_init(k, v) for k, v in p.items()])
    return make(g, 17)


def loop_model() -> onnx.ModelProto:
    """Loop M times: acc += step (outer initializer); scan out acc * x (outer input); the body
    holds an If whose branches read ``step`` (two scopes up) and ``acc_in`` (one scope up)."""
    out = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("Sub", ["acc_in", "step"], ["inner_then"], name="inner_sub")],
                               "inner_then", [], [out("inner_then", F, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Add", ["acc_in", "step"], ["inner_else"], name="inner_add")],
                               "inner_else", [], [out("inner_else", F, [2, 3])])
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "step"], ["acc_next"], name="body_add"),
         helper.make_node("Mul", ["acc_next", "x"], ["scan_out"], name="body_mul"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("If", ["flag"], ["side"], name="body_if", then_branch=then_g, else_branch=else_g),
         helper.make_node("Add", ["scan_out", "side"], ["scan_out2"], name="body_add2")],
        "loop_body",
        [out("iter", TensorProto.INT64, []), out("cond_in", TensorProto.BOOL, []), out("acc_in", F, [2, 3])],
        [out("cond_out", TensorProto.BOOL, []), out("acc_next", F, [2, 3]), out("scan_out2", F, [2, 3])])
    g = helper.make_graph(
        [helper.make_node("Loop", ["M", "", "x"], ["acc_final", "scans"], name="loop", body=body)],
        "loop_main",
        [out("M", TensorProto.INT64, []), out("x", F, [2, 3]), out("flag", TensorProto.BOOL, [])],
        [out("acc_final", F, [2, 3]), out("scans", F, [None, 2, 3])],
        [_init("step", np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], np.float32))])
    return make(g, 17)


def scan_model() -> onnx.ModelProto:
    """Scan over the rows of ``seq``: state = state + x_t + bias (bias an outer initializer)."""
    out = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Add", ["state_in", "x_t"], ["s"], name="scan_add"),
         helper.make_node("Add", ["s", "bias"], ["state_out"], name="scan_bias"),
         helper.make_node("Mul", ["state_out", "x_t"], ["y_t"], name="scan_mul")],
        "scan_body", [out("state_in", F, [3]), out("x_t", F, [3])],
        [out("state_out", F, [3]), out("y_t", F, [3])])
    g = helper.make_graph(
        [helper.make_node("Scan", ["init", "seq"], ["final", "ys"], name="scan", body=body,
                          num_scan_inputs=1)],
        "scan_main", [out("init", F, [3]), out("seq", F, [5, 3])],
        [out("final", F, [3]), out("ys", F, [5, 3])],
        [_init("bias", np.array([0.1, -0.2, 0.3], np.float32))])
    return make(g, 17)


def custom_domain_model() -> onnx.ModelProto:
    """Conv → BN, then an op of domain ``my.domain`` with attributes, then Relu."""
    p = conv_bn_params(np.random.default_rng(2))
    out = helper.make_tensor_value_info
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
         helper.make_node("Swizzle", ["bn", "W"], ["sw", "sw_aux"], name="custom", domain="my.domain",
                          mode="fast", factors=[1.5, 2.0], depth=3),
         helper.make_node("Relu", ["sw"], ["y"], name="relu")],
        "custom_main", [out("x", F, [1, 3, 8, 8])], [out("y", F, [1, 4, 8, 8]), out("sw_aux", F, [1, 4, 8, 8])],
        [_init(k, v) for k, v in p.items()])
    return make(g, 17, {"my.domain": 1})
