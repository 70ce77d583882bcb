"""ONNX→torch on the ONNX backend test suite, generated from the installed onnx package.

Every node test case (``onnx.backend.test.case.node``) and every model test stored in the package
(``simple``, ``pytorch-converted``, ``pytorch-operator``) goes through ``ir.from_onnx`` →
``ir.to_torch`` and runs; its outputs are checked with the ONNX runner's own comparison and tolerances
(``tests/ir/onnx_conformance.py``). The outcome of every case must be exactly the one recorded: pass
when not listed in ``onnx_torch_expected_failures.txt``, else the listed ``refused`` / ``mismatch``.
A run-time crash is never acceptable, and a refusal must name the op (or the graph input/output) it
refuses. The cases are split into shards so ``pytest -n 2`` spreads them over workers; a failure
names every case whose outcome changed, with what happened.
"""
from __future__ import annotations

import re

import pytest

from tests.ir.onnx_conformance import EXPECTED_FAILURES, all_cases, read_expected_failures, run_graft

SHARDS = 8


@pytest.fixture(scope="module")
def expected():
    return read_expected_failures()


def _op_types(graph) -> set[str]:
    """Op types of ``graph`` and of every subgraph in it."""
    out = set()
    for n in graph.node:
        out.add(n.op_type)
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out |= _op_types(g)
    return out


def _names_its_subject(case, detail: str) -> bool:
    """A refusal names op types of the model (each with its node) or the graph input/output it cannot hold."""
    ops = _op_types(case.model.graph)
    listed = re.findall(r"- (?:[\w.]+::)?(\w+) \(node ", detail)
    return bool(listed) and all(op in ops for op in listed) or bool(re.search(r"- graph (input|output) '", detail))


@pytest.mark.parametrize("shard", range(SHARDS))
def test_backend_cases_end_as_recorded(shard, expected):
    cases = all_cases()[shard::SHARDS]
    wrong = []
    for case in cases:
        got = run_graft(case)
        want = expected.get(case.name, ("pass", ""))[0]
        if got.status != want:
            wrong.append(f"{case.name}: expected {want}, got {got.status} {got.detail}".strip())
        elif got.status == "refused" and not _names_its_subject(case, got.detail):
            wrong.append(f"{case.name}: the refusal does not name the op it refuses: {got.detail}")
    assert not wrong, f"{len(wrong)} of {len(cases)} cases changed (update {EXPECTED_FAILURES.name} if " \
                      f"intended):\n" + "\n".join(wrong)


def test_expected_failures_list_only_existing_cases(expected):
    names = {c.name for c in all_cases()}
    stale = sorted(set(expected) - names)
    assert not stale, f"{EXPECTED_FAILURES.name} lists cases the installed onnx does not have: {stale}"


def test_wrong_outputs_are_only_the_explained_ones(expected):
    """The file is the record of every outcome; this pins what may not grow quietly: the number of
    passing cases (a regression cannot be hidden by listing it) and the few accepted wrong outputs."""
    total = len(all_cases())
    passing = total - len(expected)
    mismatches = sorted(k for k, (s, _) in expected.items() if s == "mismatch")
    assert passing >= 1814, (passing, total)
    # the only accepted wrong outputs: random dropout masks and reference roundoff (see their reasons)
    assert mismatches == ["test_attention_4d_causal_fp16_expanded", "test_dft_inverse", "test_dft_inverse_opset19",
                          "test_training_dropout", "test_training_dropout_default",
                          "test_training_dropout_default_mask", "test_training_dropout_mask"], mismatches


# ----------------------------------------------------------------------------- lowerings on model-like graphs
# Each graph is built the way exporters write these ops, run by onnxruntime and by the emitted GraphModule.
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from graft import ir  # noqa: E402
from graft.compiler.techniques import numeric  # noqa: E402
from graft.ir import torch_ops  # noqa: E402
from graft.ir.torch_backend import load_module, save_module  # noqa: E402


def _model(nodes, inputs, outputs, inits=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])  # onnxruntime validates it


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _both(m, feeds, atol=1e-5):
    """onnxruntime's outputs and the GraphModule's on the same feeds (asserted equal within atol); the module."""
    ref = numeric.run(m, feeds)
    gm = ir.to_torch(ir.from_onnx(m))
    with torch.no_grad():
        out = gm(*[torch.from_numpy(feeds[i.name]) for i in m.graph.input if i.name in feeds])
    out = out if isinstance(out, tuple) else (out,)
    for (name, r), o in zip(ref.items(), out):
        assert tuple(o.shape) == r.shape, name
        np.testing.assert_allclose(o.numpy(), r, atol=atol, rtol=1e-5, err_msg=name)
    return gm, ref


def _rng():
    return np.random.default_rng(0)


def test_lrn_in_an_alexnet_block_matches_onnxruntime_and_trains():
    rng = _rng()
    w = rng.standard_normal((16, 3, 5, 5)).astype(np.float32) * 0.2
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[2, 2, 2, 2], strides=[2, 2]),
                helper.make_node("Relu", ["c"], ["r"]),
                helper.make_node("LRN", ["r"], ["n"], size=5, alpha=1e-3, beta=0.75, bias=2.0),
                helper.make_node("MaxPool", ["n"], ["y"], kernel_shape=[3, 3], strides=[2, 2])],
               [_vi("x", TensorProto.FLOAT, [2, 3, 32, 32])], [_vi("y", TensorProto.FLOAT, None)], [("w", w)])
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32) * 3
    gm, _ = _both(m, {"x": x})
    (p,) = list(gm.parameters())
    loss = gm(torch.from_numpy(x)).square().sum()
    loss.backward()
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


def _if_model(cond_nodes, cond_name):
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                               [_vi("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e0"]), helper.make_node("Mul", ["e0", "k"], ["e"])],
                               "else", [], [_vi("e", TensorProto.FLOAT, None)])
    k = np.full((1, 4), 3.0, np.float32)
    return _model(cond_nodes + [helper.make_node("If", [cond_name], ["y"], then_branch=then_g, else_branch=else_g)],
                  [_vi("x", TensorProto.FLOAT, [2, 4])], [_vi("y", TensorProto.FLOAT, None)], [("k", k)])


def _calls(gm, fn):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


def test_if_with_a_shape_condition_is_folded_at_conversion():
    """Exporters guard code paths on shapes (`if x.shape[0] == 2`): with static shapes the branch is chosen
    when converting and inlined; no If runs."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0),
             helper.make_node("Equal", ["d0", "two"], ["c"])]
    m = _model(nodes + _if_model([], "c").graph.node[:], [_vi("x", TensorProto.FLOAT, [2, 4])],
               [_vi("y", TensorProto.FLOAT, None)],
               [("zero", np.array(0, np.int64)), ("two", np.array(2, np.int64)),
                ("k", np.full((1, 4), 3.0, np.float32))])
    x = _rng().standard_normal((2, 4)).astype(np.float32)
    gm, _ = _both(m, {"x": x})
    assert not _calls(gm, torch_ops.If)
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and "branch" in str(n.target)]
    np.testing.assert_array_equal(gm(torch.from_numpy(x)).numpy(), np.maximum(x, 0))  # the then branch


def test_if_with_a_runtime_condition_runs_the_selected_branch_and_survives_save_load(tmp_path):
    m = _if_model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                   helper.make_node("Greater", ["s", "z"], ["c"])], "c")
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.0, np.float32), "z"))
    rng = _rng()
    pos = np.abs(rng.standard_normal((2, 4))).astype(np.float32)
    gm, ref_pos = _both(m, {"x": pos})
    gm, ref_neg = _both(m, {"x": -pos})
    assert len(_calls(gm, torch_ops.If)) == 1
    np.testing.assert_array_equal(ref_pos["y"], pos)  # then: Relu
    np.testing.assert_allclose(ref_neg["y"], pos * 3)  # else: -x * 3
    save_module(gm, tmp_path / "if.pt")
    back = load_module(tmp_path / "if.pt")
    for x in (pos, -pos):
        torch.testing.assert_close(back(torch.from_numpy(x)), gm(torch.from_numpy(x)), rtol=0, atol=0)


def _rnn_model(op, x_shape, hidden, dirs, extra_inputs, attrs, n_gates, rng, n_out=3, layout=0):
    """X → op (weights as initializers) → Y → Transpose/Reshape → MatMul head, as speech/text encoders
    exported from PyTorch look."""
    feat = x_shape[-1]
    w = (rng.standard_normal((dirs, n_gates * hidden, feat)) * 0.3).astype(np.float32)
    r = (rng.standard_normal((dirs, n_gates * hidden, hidden)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((dirs, 2 * n_gates * hidden)) * 0.1).astype(np.float32)
    head = (rng.standard_normal((dirs * hidden, 5)) * 0.3).astype(np.float32)
    names = ["x", "w", "r", "b"] + [n for n, _ in extra_inputs]
    outs = ["y", "yh", "yc"][:n_out]
    perm = [0, 2, 1, 3] if layout == 0 else [0, 1, 2, 3]  # to [seq|batch, batch|seq, dirs, hidden]
    nodes = [helper.make_node(op, names, outs, hidden_size=hidden, layout=layout, **attrs),
             helper.make_node("Transpose", ["y"], ["yt"], perm=perm),
             helper.make_node("Reshape", ["yt", "shape"], ["yr"]),
             helper.make_node("MatMul", ["yr", "head"], ["logits"])]
    inits = [("w", w), ("r", r), ("b", b), ("head", head),
             ("shape", np.array([x_shape[0], x_shape[1], dirs * hidden], np.int64))] + list(extra_inputs)
    outputs = [_vi("logits", TensorProto.FLOAT, None)] + [_vi(o, TensorProto.FLOAT, None) for o in outs[1:]]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, list(x_shape))], outputs, inits, opset=14)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lstm_encoder_matches_onnxruntime(direction):
    rng = _rng()
    t, b, f, h = 7, 3, 6, 5
    dirs = 2 if direction == "bidirectional" else 1
    lens = np.array([7, 4, 1], np.int32)
    h0 = (rng.standard_normal((dirs, b, h)) * 0.5).astype(np.float32)
    c0 = (rng.standard_normal((dirs, b, h)) * 0.5).astype(np.float32)
    p = (rng.standard_normal((dirs, 3 * h)) * 0.2).astype(np.float32)
    m = _rnn_model("LSTM", (t, b, f), h, dirs, [("lens", lens), ("h0", h0), ("c0", c0), ("p", p)],
                   {"direction": direction}, 4, rng)
    x = rng.standard_normal((t, b, f)).astype(np.float32)
    _both(m, {"x": x})


def test_lstm_variants_match_onnxruntime():
    """Clip, coupled input/forget gates and non-default activations with alpha/beta (onnxruntime has no
    batch-first layout; the backend test cases cover it against onnx.reference)."""
    rng = _rng()
    t, b, f, h = 5, 2, 4, 3
    m = _rnn_model("LSTM", (t, b, f), h, 2, [], {
        "direction": "bidirectional", "clip": 0.7, "input_forget": 1,
        "activations": ["HardSigmoid", "ScaledTanh", "Tanh", "Sigmoid", "Affine", "Softsign"],
        "activation_alpha": [0.3, 0.9, 0.5], "activation_beta": [0.4, 1.1, 0.2]}, 4, rng)
    _both(m, {"x": rng.standard_normal((t, b, f)).astype(np.float32)})


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_gru_encoder_matches_onnxruntime(linear_before_reset):
    rng = _rng()
    t, b, f, h = 6, 3, 4, 5
    lens = np.array([6, 2, 5], np.int32)
    h0 = (rng.standard_normal((2, b, h)) * 0.5).astype(np.float32)
    m = _rnn_model("GRU", (t, b, f), h, 2, [("lens", lens), ("h0", h0)],
                   {"direction": "bidirectional", "linear_before_reset": linear_before_reset}, 3, rng, n_out=2)
    _both(m, {"x": rng.standard_normal((t, b, f)).astype(np.float32)})


def test_lstm_module_trains_through_time():
    rng = _rng()
    m = _rnn_model("LSTM", (4, 2, 3), 4, 1, [], {}, 4, rng)
    gm = ir.to_torch(ir.from_onnx(m))
    w = dict(gm.named_parameters())
    assert {"w", "r", "b", "head"} <= set(w)
    gm(torch.from_numpy(rng.standard_normal((4, 2, 3)).astype(np.float32)))[0].square().sum().backward()
    assert all(float(w[k].grad.abs().sum()) > 0 for k in ("w", "r", "b"))


def test_nms_detection_postprocess_matches_onnxruntime():
    """Boxes and class scores → NonMaxSuppression → Gather of the kept boxes, as SSD/YOLO exports end."""
    rng = _rng()
    n, c = 60, 3
    xy = rng.uniform(0, 50, (1, n, 2)).astype(np.float32)
    wh = rng.uniform(5, 20, (1, n, 2)).astype(np.float32)
    boxes = np.concatenate([xy[..., 1:], xy[..., :1], xy[..., 1:] + wh[..., 1:], xy[..., :1] + wh[..., :1]], -1)
    scores = rng.uniform(0, 1, (1, c, n)).astype(np.float32)
    scores[0, 1, :5] = 0.5  # ties: the lower box index is taken first
    inits = [("max", np.array([7], np.int64)), ("iou", np.array([0.4], np.float32)),
             ("thr", np.array([0.2], np.float32)), ("col", np.array([2], np.int64)),
             ("flat", np.array([-1, 4], np.int64))]
    m = _model([helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "thr"], ["sel"]),
                helper.make_node("Gather", ["sel", "col"], ["idx2"], axis=1),
                helper.make_node("Squeeze", ["idx2"], ["idx"], ),
                helper.make_node("Reshape", ["boxes", "flat"], ["bf"]),
                helper.make_node("Gather", ["bf", "idx"], ["kept"], axis=0)],
               [_vi("boxes", TensorProto.FLOAT, [1, n, 4]), _vi("scores", TensorProto.FLOAT, [1, c, n])],
               [_vi("sel", TensorProto.INT64, None), _vi("kept", TensorProto.FLOAT, None)], inits, opset=12)
    _, ref = _both(m, {"boxes": boxes, "scores": scores}, atol=0)
    assert 10 <= len(ref["sel"]) <= 3 * 7
    # center-point boxes
    m2 = _model([helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou"], ["sel"], center_point_box=1)],
                [_vi("boxes", TensorProto.FLOAT, [1, n, 4]), _vi("scores", TensorProto.FLOAT, [1, c, n])],
                [_vi("sel", TensorProto.INT64, None)], inits[:2], opset=12)
    _both(m2, {"boxes": np.concatenate([xy, wh], -1), "scores": scores}, atol=0)


def test_loop_and_scan_match_onnxruntime_and_survive_save_load(tmp_path):
    """A Loop with a data-dependent trip count and a Scan accumulating over time (cumulative sums)."""
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "x"], ["acc_out"]), helper.make_node("Mul", ["acc_out", "half"], ["acc_h"]),
         helper.make_node("ReduceSum", ["acc_h"], ["tot"], keepdims=0),
         helper.make_node("Less", ["tot", "limit"], ["cond_out"]), helper.make_node("Identity", ["acc_h"], ["scan"])],
        "body", [_vi("i", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, []),
                 _vi("acc_in", TensorProto.FLOAT, [3])],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("acc_h", TensorProto.FLOAT, [3]),
         _vi("scan", TensorProto.FLOAT, [3])])
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "row"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["seen"])],
        "scan_body", [_vi("s_in", TensorProto.FLOAT, [3]), _vi("row", TensorProto.FLOAT, [3])],
        [_vi("s_out", TensorProto.FLOAT, [3]), _vi("seen", TensorProto.FLOAT, [3])])
    m = _model([helper.make_node("Loop", ["trips", "go", "x0"], ["final", "steps"], body=body),
                helper.make_node("Scan", ["zeros", "steps"], ["total", "cums"], body=scan_body, num_scan_inputs=1,
                                 scan_input_directions=[1])],
               [_vi("x0", TensorProto.FLOAT, [3]), _vi("x", TensorProto.FLOAT, [3])],
               [_vi("final", TensorProto.FLOAT, None), _vi("steps", TensorProto.FLOAT, None),
                _vi("total", TensorProto.FLOAT, None), _vi("cums", TensorProto.FLOAT, None)],
               [("trips", np.array(20, np.int64)), ("go", np.array(True)), ("half", np.array(0.9, np.float32)),
                ("limit", np.array(20.0, np.float32)), ("zeros", np.zeros(3, np.float32))])
    feeds = {"x0": np.array([1.0, 2.0, 3.0], np.float32), "x": np.array([2.0, 1.0, 0.5], np.float32)}
    gm, ref = _both(m, feeds)
    assert 1 < ref["steps"].shape[0] < 20  # stopped by the condition, not the trip count
    save_module(gm, tmp_path / "loop.pt")
    back = load_module(tmp_path / "loop.pt")
    for a, b in zip(back(*map(torch.from_numpy, feeds.values())), gm(*map(torch.from_numpy, feeds.values()))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_refusals_name_op_attribute_and_value():
    """What torch cannot express is refused when converting, naming the node, the attribute and its value."""
    from graft.ir.torch_backend import TorchBackendError

    m = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT4, name="to_int4")],
               [_vi("x", TensorProto.FLOAT, [4])], [_vi("y", TensorProto.INT4, [4])], opset=21)
    with pytest.raises(TorchBackendError, match=r"Cast \(node 'to_int4'\): attribute to=INT4 \(22\)"):
        ir.to_torch(ir.from_onnx(m))
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x", TensorProto.FLOAT, [4])],
               [_vi("y", TensorProto.FLOAT, [4])])
    m.graph.node[0].attribute.append(helper.make_attribute("future_knob", 3))
    with pytest.raises(TorchBackendError, match=r"Relu \(node 'r'\): attribute future_knob=3 is not supported"):
        ir.to_torch(ir.from_onnx(m))


def test_training_dropout_keeps_rate_and_scale():
    """The four training-mode Dropout cases are listed as mismatches (random masks): check what they cannot,
    that kept elements are scaled by 1/(1-ratio), dropped ones are 0 and the mask says which."""
    m = _model([helper.make_node("Dropout", ["x", "r", "t"], ["y", "mask"])], [_vi("x", TensorProto.FLOAT, [200, 100])],
               [_vi("y", TensorProto.FLOAT, None), _vi("mask", TensorProto.BOOL, None)],
               [("r", np.array(0.3, np.float32)), ("t", np.array(True))])
    gm = ir.to_torch(ir.from_onnx(m))
    torch.manual_seed(0)
    x = torch.rand(200, 100) + 1
    y, mask = gm(x)
    torch.testing.assert_close(y[mask], x[mask] / 0.7)
    assert bool((y[~mask] == 0).all())
    assert abs(float(mask.float().mean()) - 0.7) < 0.01


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_arithmetic_is_exact_over_the_whole_range(dtype):
    """torch has no CPU kernels for uint16/32/64 arithmetic; the backend's bit-view and long-division
    forms must agree with numpy's wrapping unsigned arithmetic, values above the signed range included."""
    rng = _rng()
    info = np.iinfo(dtype)
    a = rng.integers(0, info.max, 4000, dtype=dtype, endpoint=True)
    b = rng.integers(1, info.max, 4000, dtype=dtype, endpoint=True)
    b[:1000] = rng.integers(1, 1000, 1000, dtype=dtype)  # small divisors: large quotients
    a[:10], b[10:20] = info.max, info.max
    ta, tb = torch.from_numpy(a.copy()), torch.from_numpy(b.copy())
    with np.errstate(over="ignore"):
        want = {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": a // b, "Mod": a % b, "Greater": a > b,
                "LessOrEqual": a <= b, "Max": np.maximum(a, b), "BitwiseXor": a ^ b}
    for op, w in want.items():
        got = torch_ops.lookup(op, 18)(ta, tb).numpy()
        np.testing.assert_array_equal(got, w, err_msg=op)
    for op, w in {"ReduceMax": a.max(keepdims=True), "ReduceMin": a.min(keepdims=True),
                  "ReduceSum": a.sum(keepdims=True, dtype=dtype), "ArgMax": np.argmax(a, keepdims=True)}.items():
        np.testing.assert_array_equal(torch_ops.lookup(op, 18)(ta).numpy(), w, err_msg=op)
    np.testing.assert_array_equal(torch_ops.CumSum(ta, torch.tensor(0)).numpy(), np.cumsum(a, dtype=dtype))
    np.testing.assert_array_equal(torch_ops.Abs(ta).numpy(), a)
    np.testing.assert_array_equal(torch_ops.lookup("Clip", 18)(ta, tb[:1], tb[1:2]).numpy(),
                                  np.minimum(np.maximum(a, b[0]), b[1]))
    v, i = torch_ops.lookup("TopK", 18)(ta, torch.tensor([5]))
    np.testing.assert_array_equal(v.numpy(), np.sort(a)[::-1][:5])
    shifts = rng.integers(0, np.iinfo(dtype).bits, 4000, dtype=dtype)
    np.testing.assert_array_equal(torch_ops.BitShift(ta, torch.from_numpy(shifts), direction="RIGHT").numpy(),
                                  a >> shifts)
