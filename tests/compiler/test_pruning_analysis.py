"""Channel-dependency analysis on small ONNX graphs: which tensors shrink together, and why not."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graft import ir
from graft.compiler.techniques import numeric
from graft.compiler.techniques.pruning import PruneConfig, analyze, prune
from graft.compiler.techniques.pruning.api import prepare
from tests.compiler.pruning_models import prune_with_oracle

RNG = np.random.default_rng(0)


def w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def model_of(text: str, **arrays) -> ir.Model:
    """An IR model from ONNX text whose weights are ``arrays`` (added as initializers, then checked)."""
    proto = onnx.parser.parse_model(text)
    for name, arr in arrays.items():
        proto.graph.initializer.append(numpy_helper.from_array(arr, name))
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_onnx(proto)


def same(a: onnx.ModelProto, b: onnx.ModelProto, atol=1e-5):
    res = numeric.compare(a, b)
    assert all(r.max_abs <= atol for r in res), [(r.name, r.max_abs) for r in res]
    return res


HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'
RESIDUAL = HEAD + """
g (float[1,4,8,8] x) => (float[1,3,8,8] y) {
  a = Conv <pads = [1,1,1,1]> (x, w1)
  b = Relu (a)
  c = Conv <pads = [1,1,1,1]> (b, w2)
  d = Add (a, c)
  y = Conv (d, w3)
}"""


def residual():
    return model_of(RESIDUAL, w1=w(8, 4, 3, 3), w2=w(8, 8, 3, 3), w3=w(3, 8, 1, 1))


def test_residual_add_couples_both_branches_into_one_group():
    m = residual()
    a = analyze(m)
    g = a.group("a")  # unnamed nodes are known by their first output
    assert g.kind == "channels" and g.size == 8 and g.prunable == g.classes
    assert {n.inputs[1].name for n in g.sources} == {"w1", "w2"}
    roles = sorted((mb.node.inputs[mb.input].name, mb.axis_map, mb.role) for mb in g.members)
    assert roles == [("w1", (0,), "producer"), ("w2", (0,), "producer"), ("w2", (1,), "consumer"),
                     ("w3", (1,), "consumer")]
    out = a.group("y")
    assert out.prunable == [] and "graph output 'y'" in out.reason


def test_residual_prune_matches_masked_original_and_shrinks_weights():
    m = residual()
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.5))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    shapes = {t.name: tuple(t.dims) for t in p.graph.initializer}
    assert shapes == {"w1": (4, 4, 3, 3), "w2": (4, 4, 3, 3), "w3": (3, 4, 1, 1)}
    same(masked, p)
    assert report.macs_after < report.macs_before
    assert [(g.size, g.removed) for g in report.groups] == [(8, 4), (3, 0)]


CONCAT_SPLIT = HEAD + """
g (float[1,3,6,6] x) => (float[1,2,6,6] y, float[1,2,6,6] z) {
  a = Conv (x, wa)
  b = Conv (x, wb)
  c = Concat <axis = 1> (a, b)
  r = Relu (c)
  y = Conv (r, wc)
  s1, s2 = Split <axis = 1> (r, sizes)
  t = Slice (s2, st, en, ax)
  u = Add (s1, t)
  z = Conv (u, wd)
}"""


def test_concat_offsets_split_and_slice_subranges():
    # a: 4 ch, b: 6 ch -> concat 10 -> split [5, 5]: s1 = a0..a3,b0 ; s2 = b1..b5 -> slice [0:5] = s2
    m = model_of(CONCAT_SPLIT, wa=w(4, 3, 1, 1), wb=w(6, 3, 1, 1), wc=w(2, 10, 1, 1), wd=w(2, 5, 1, 1),
                 sizes=np.array([5, 5], np.int64), st=np.array([0], np.int64), en=np.array([5], np.int64),
                 ax=np.array([1], np.int64))
    a = analyze(m)
    g = a.group("a")
    # Add(s1, t) unites a0..a3,b0 with b1..b5 position by position: a and b form one group of 5
    assert g.size == 5 and {n.inputs[1].name for n in g.sources} == {"wa", "wb"}
    wc = next(mb for mb in g.members if mb.node.inputs[1].name == "wc")
    roots = a.classes.roots(wc.atoms).tolist()
    assert roots[:5] == roots[5:]  # concat offsets: position i and 5 + i are the same class
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.4))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    same(masked, p)
    inits = {t.name: numpy_helper.to_array(t) for t in p.graph.initializer}
    kept = inits["wa"].shape[0] + inits["wb"].shape[0]
    assert inits["wc"].shape == (2, kept, 1, 1)
    split = next(n for n in m.graph if n.op_type == "Split")
    sizes = split.inputs[1].constant().tolist()
    assert sum(sizes) == kept and sizes[0] == inits["wd"].shape[1]


DEPTHWISE = HEAD + """
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  a = Conv (x, w1)
  b = Conv <group = 8, pads = [1,1,1,1]> (a, wdw)
  c = Conv <group = 2> (b, wg)
  d = Relu (c)
  y = Conv (d, w3)
}"""


def test_depthwise_and_grouped_conv_update_group():
    m = model_of(DEPTHWISE, w1=w(8, 3, 1, 1), wdw=w(8, 1, 3, 3), wg=w(6, 4, 1, 1), w3=w(4, 6, 1, 1))
    a = analyze(m)
    g1 = a.groups[0]
    # depthwise ties its outputs to its inputs, the grouped conv takes its 2 input groups whole
    assert g1.size == 2 and g1.block == 4
    masked, _ = prune_with_oracle(m, PruneConfig(ratio=0.5))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    same(masked, p)
    convs = [n for n in m.graph if n.op_type == "Conv"]
    assert convs[0].inputs[1].const.shape == (4, 3, 1, 1)
    assert convs[1].attrs["group"] == 4 and convs[1].inputs[1].const.shape == (4, 1, 3, 3)
    assert convs[2].attrs["group"] == 1 and convs[2].inputs[1].const.shape[1] == 4


FLATTEN = HEAD + """
g (float[1,3,4,4] x) => (float[1,5] y) {
  a = Conv <strides = [2,2]> (x, w1)
  b = Relu (a)
  f = Flatten (b)
  h = Gemm <transB = 1> (f, w2, b2)
  r = Relu (h)
  y = MatMul (r, w3)
}"""


def test_flatten_into_linear_prunes_channel_by_spatial_blocks():
    m = model_of(FLATTEN, w1=w(6, 3, 1, 1), w2=w(7, 24), b2=w(7), w3=w(7, 5))
    a = analyze(m)
    conv = a.groups[0]
    gemm_member = [mb for mb in conv.members if mb.node.op_type == "Gemm"][0]
    # channel c covers columns 4c..4c+3 (2x2 spatial block) of the Gemm weight
    roots = a.classes.roots(gemm_member.atoms)
    assert gemm_member.axis_map == (1,) and all(len(set(roots[4 * c:4 * c + 4])) == 1 for c in range(6))
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.5))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    same(masked, p)
    inits = {t.name: numpy_helper.to_array(t) for t in p.graph.initializer}
    # 7 neurons at 0.5 keep floor(3.5) = 3: at least the requested fraction goes
    assert inits["w2"].shape == (3, 12) and inits["b2"].shape == (3,) and inits["w3"].shape == (3, 5)


def test_reshape_constant_target_is_rewritten():
    text = HEAD + """
g (float[2,3,4,4] x) => (float[2,5] y) {
  a = Conv (x, w1)
  f = Reshape (a, shape)
  y = MatMul (f, w2)
}"""
    m = model_of(text, w1=w(6, 3, 1, 1), shape=np.array([2, 96], np.int64), w2=w(96, 5))
    masked, _ = prune_with_oracle(m, PruneConfig(ratio=0.5))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    same(masked, p)
    reshape = next(n for n in m.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].constant().tolist() == [2, 48]
    assert reshape.meta["graft.rule"] == "prune_reshape"


def test_unknown_op_and_graph_input_block_with_reasons():
    text = '<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>\n' + """
g (float[1,3,4,4] x, float[1,6,4,4] e) => (float[1,2,4,4] y, float[1,6,4,4] z) {
  a = Conv (x, w1)
  b = Add (a, e)
  y = Conv (b, w2)
  c = Conv (x, w3)
  z = my.ops.Weird (c)
}"""
    proto = onnx.parser.parse_model(text)
    for name, arr in dict(w1=w(6, 3, 1, 1), w2=w(2, 6, 1, 1), w3=w(6, 3, 1, 1)).items():
        proto.graph.initializer.append(numpy_helper.from_array(arr, name))
    m = ir.from_onnx(proto)
    a = analyze(m)
    by_weight = {g.sources[0].inputs[1].name: g for g in a.groups}
    assert "'e', which no prunable layer produces" in by_weight["w1"].reason
    assert "my.ops::Weird" in by_weight["w3"].reason
    with pytest.raises(ValueError, match="nothing to prune"):
        prune(m, PruneConfig(ratio=0.5))


def test_layernorm_marks_hidden_group_inexact_and_slices_its_parameters():
    text = HEAD + """
g (float[2,5,8] x) => (float[2,5,3] y) {
  a = MatMul (x, w1)
  n = LayerNormalization <axis = -1> (a, gamma, beta)
  y = MatMul (n, w2)
}"""
    m = model_of(text, w1=w(8, 6), gamma=w(6), beta=w(6), w2=w(6, 3))
    a = analyze(m)
    g = a.groups[0]
    assert g.kind == "hidden" and all("LayerNormalization" in why for why in g.inexact.values())
    assert not any(g.exact.values())
    report = prune(m, PruneConfig(ratio=0.5))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    inits = {t.name: tuple(t.dims) for t in p.graph.initializer}
    assert inits == {"w1": (8, 3), "gamma": (3,), "beta": (3,), "w2": (3, 3)}
    assert report.groups[0].removed == 3


def test_prepare_folds_bias_reshape_so_the_bias_is_sliced():
    text = HEAD + """
g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
  a = Conv (x, w1)
  bb = Reshape (bias, bshape)
  c = Add (a, bb)
  y = Conv (c, w2)
}"""
    m = model_of(text, w1=w(4, 3, 1, 1), bias=w(4), bshape=np.array([1, 4, 1, 1], np.int64), w2=w(2, 4, 1, 1))
    prepare(m)
    masked, _ = prune_with_oracle(m, PruneConfig(ratio=0.5))
    p = ir.to_onnx(m)
    same(masked, p)
    add = next(n for n in m.graph if n.op_type == "Add")
    assert add.inputs[1].constant().shape == (1, 2, 1, 1) and add.meta["graft.rule"] == "prune_constant_operand"
