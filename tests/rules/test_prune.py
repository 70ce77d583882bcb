"""Removal rules (rules/prune.py): zero and constant channels are removed exactly; every rewrite is a rule."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch.nn.utils import prune as torch_prune

from graft import ir
from graft.compiler.techniques import numeric
from graft.compiler.techniques.pruning import PruneConfig, prune
from examples.torch_models import resnet_style
from tests.compiler.pruning_models import export, tiny_bert

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def model_of(text: str, **arrays) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    for name, arr in arrays.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def unchanged(ref: onnx.ModelProto, m: ir.Model, atol=1e-5, dim_sizes=None):
    out = ir.to_onnx(m)
    onnx.checker.check_model(out, full_check=True)
    res = numeric.compare(ref, out, dim_sizes=dim_sizes)
    assert all(r.max_abs <= atol for r in res), [(r.name, r.max_abs) for r in res]
    return out


def rng(seed=0):
    return np.random.default_rng(seed)


CONV_BN = HEAD + """
g (float[1,3,8,8] x) => (float[1,2,8,8] y) {
  a = Conv <pads = [1,1,1,1]> (x, w1)
  b = BatchNormalization (a, gamma, beta, mean, var)
  c = Relu (b)
  y = Conv <pads = [1,1,1,1]> (c, w2)
}"""


def test_zero_group_is_removed_exactly():
    r = rng()
    w1 = r.standard_normal((8, 3, 3, 3)).astype(np.float32)
    gamma, beta = r.random(8).astype(np.float32) + 0.5, r.standard_normal(8).astype(np.float32)
    mean, var = r.standard_normal(8).astype(np.float32), r.random(8).astype(np.float32) + 0.5
    for c in (1, 6):  # a channel zeroed as a group: filter, BN scale, shift
        w1[c], gamma[c], beta[c], mean[c] = 0, 0, 0, 0
    proto = model_of(CONV_BN, w1=w1, gamma=gamma, beta=beta, mean=mean, var=var,
                     w2=r.standard_normal((2, 8, 3, 3)).astype(np.float32))
    m = ir.from_onnx(proto)
    report = prune(m, PruneConfig(zero_only=True))
    out = unchanged(proto, m)
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert shapes["w1"] == (6, 3, 3, 3) and shapes["w2"] == (2, 6, 3, 3) and shapes["gamma"] == (6,)
    assert report.groups[0].removed == 2 and report.groups[0].exact_removed == 2
    assert {n.meta.get("graft.rule") for n in m.graph if n.op_type in ("Conv", "BatchNormalization")} == \
        {"prune_conv", "prune_batchnorm"}


def test_constant_channel_is_compensated_in_the_next_bias_exactly():
    # zero filters, but BN still shifts them: the channel is the constant beta - mean * s,
    # which the next 1x1 conv (no padding) absorbs in its bias
    r = rng(1)
    text = CONV_BN.replace("y = Conv <pads = [1,1,1,1]> (c, w2)", "y = Conv (c, w2, b2)")
    w1 = r.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1[[0, 3, 5]] = 0
    proto = model_of(text, w1=w1, gamma=r.random(8).astype(np.float32) + 0.5,
                     beta=r.standard_normal(8).astype(np.float32), mean=r.standard_normal(8).astype(np.float32),
                     var=r.random(8).astype(np.float32) + 0.5, w2=r.standard_normal((2, 8, 1, 1)).astype(np.float32),
                     b2=r.standard_normal(2).astype(np.float32))
    m = ir.from_onnx(proto)
    report = prune(m, PruneConfig(zero_only=True))
    unchanged(proto, m)
    assert report.groups[0].removed == 3
    last = [n for n in m.graph if n.op_type == "Conv"][-1]
    assert last.inputs[1].const.shape == (2, 5, 1, 1) and last.inputs[2].name != "b2"  # bias rewritten
    # through a padded 3x3 conv the constant is not uniform at the borders: it is compensated by a
    # constant map added after the conv, which needs the spatial size fixed in the model
    pad = model_of(CONV_BN, w1=w1, gamma=np.ones(8, np.float32), beta=np.ones(8, np.float32),
                   mean=np.zeros(8, np.float32), var=np.ones(8, np.float32),
                   w2=r.standard_normal((2, 8, 3, 3)).astype(np.float32))
    m = ir.from_onnx(pad)
    rep = prune(m, PruneConfig(zero_only=True))
    unchanged(pad, m)
    assert sum(g.removed for g in rep.groups) == 3
    add = next(n for n in m.graph if n.op_type == "Add")
    assert add.meta["graft.rule"] == "prune_conv" and add.inputs[1].constant().shape == (1, 2, 8, 8)
    dynamic = onnx.parser.parse_model(CONV_BN.replace("float[1,3,8,8] x", "float[1,3,H,W] x").replace(
        "float[1,2,8,8] y", "float[1,2,H,W] y"))
    dynamic.graph.initializer.extend(pad.graph.initializer)
    rep = prune(ir.from_onnx(dynamic), PruneConfig(zero_only=True))
    assert sum(g.removed for g in rep.groups) == 0  # the map depends on the input size: not exact


def test_consumer_columns_all_zero_make_a_channel_removable_in_ppocr_cls(ppocr_cls_path):
    m = ir.load(ppocr_cls_path)
    from graft.compiler.techniques.pruning.api import prepare

    prepare(m)
    proto = ir.to_onnx(m)
    # the 32-channel residual stream of the last stage is read by conv11/conv12 expand and conv_last
    inits = {t.name: t for t in proto.graph.initializer}
    for name in ("conv11_expand_weights", "conv12_expand_weights", "conv_last_weights"):
        arr = numpy_helper.to_array(inits[name]).copy()
        arr[:, [4, 17, 30]] = 0
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    m = ir.from_onnx(proto)
    report = prune(m, PruneConfig(zero_only=True, dim_sizes={"?": 48}))
    out = unchanged(proto, m, dim_sizes={"?": 48})
    removed = {g.name: g.removed for g in report.groups if g.removed}
    assert list(removed.values()) == [3]
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert shapes["conv_last_weights"] == (200, 29, 1, 1) and shapes["conv12_linear_weights"] == (29, 200, 1, 1)


def test_torch_prune_masks_on_mlp_neurons_are_removed_exactly(tmp_path):
    mod, args = tiny_bert()
    for layer in mod.bert.encoder.layer:  # structured masks on the MLP's first linear (rows = neurons)
        torch_prune.ln_structured(layer.intermediate.dense, "weight", amount=0.25, n=2, dim=0)
        torch_prune.remove(layer.intermediate.dense, "weight")
    names = ["input_ids", "attention_mask"]
    path = export(mod, args, tmp_path / "masked.onnx", names, {n: {0: "batch", 1: "seq"} for n in names},
                  ("logits",))
    ref = onnx.load(path)
    m = ir.from_onnx(ref)
    report = prune(m, PruneConfig(zero_only=True, dim_sizes={"batch": 2, "seq": 8}))
    unchanged(ref, m, dim_sizes={"batch": 2, "seq": 8})
    mlp = [g for g in report.groups if g.kind == "neurons" and g.size == 128]
    # zero rows leave GELU(bias): a constant the output projection absorbs
    assert [g.removed for g in mlp] == [32, 32] and all(g.exact_removed == 32 for g in mlp)


def test_torch_group_masks_on_resnet_are_removed_exactly(tmp_path):
    mod, args = resnet_style()
    with torch.no_grad():
        for block in mod.layers:  # zero 4 channels of each block's inner conv as a group
            conv, bn = block.conv1[0], block.conv1[1]
            mask = torch.ones(conv.out_channels)
            mask[:4] = 0
            torch_prune.custom_from_mask(conv, "weight", mask.view(-1, 1, 1, 1).expand_as(conv.weight))
            torch_prune.remove(conv, "weight")
            bn.weight[:4] = 0
            bn.bias[:4] = 0
    path = export(mod, args, tmp_path / "resnet.onnx", ["x"], {"x": {0: "batch"}})
    ref = onnx.load(path)
    m = ir.from_onnx(ref)
    report = prune(m, PruneConfig(zero_only=True))
    unchanged(ref, m)
    assert sorted(g.removed for g in report.groups if g.removed) == [4, 4, 4]
    assert report.macs_after < report.macs_before


def test_split_with_num_outputs_and_slice_bounds_are_rewritten():
    text = '<ir_version: 9, opset_import: ["" : 18]>\n' + """
g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
  a = Conv (x, w1)
  s1, s2 = Split <axis = 1, num_outputs = 2> (a)
  t = Slice (a, st, en, ax)
  u = Add (s1, s2)
  v = Add (u, t)
  y = Conv (v, w2)
}"""
    r = rng(3)
    w1 = r.standard_normal((8, 3, 1, 1)).astype(np.float32)
    w2 = r.standard_normal((2, 4, 1, 1)).astype(np.float32)
    w1[[1, 5]] = 0  # channel 1 of s1 and channel 1 of s2 (= a[5]) are the same class; t = a[2:6]
    w1[[2, 6]] = 0  # t[0] = a[2], and s1[2]/s2[2] = a[2]/a[6]: class {a2, a6, t[0]?}
    proto = model_of(text, w1=w1, w2=w2, st=np.array([4], np.int64), en=np.array([8], np.int64),
                     ax=np.array([1], np.int64))
    m = ir.from_onnx(proto)
    report = prune(m, PruneConfig(zero_only=True))
    unchanged(proto, m)
    split = next(n for n in m.graph if n.op_type == "Split")
    sl = next(n for n in m.graph if n.op_type == "Slice")
    assert "num_outputs" not in split.attrs and split.inputs[1].constant().tolist() == [2, 2]
    assert sl.inputs[1].constant().tolist() == [2] and sl.inputs[2].constant().tolist() == [4]
    assert report.groups[0].removed == 2


def test_gemm_and_matmul_compensation():
    text = HEAD + """
g (float[3,6] x) => (float[3,2] y, float[3,2] z) {
  h = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w1, b1)
  a = Sigmoid (h)
  y = Gemm (a, w2, b2)
  z = MatMul (a, w3)
}"""
    r = rng(4)
    w1 = r.standard_normal((5, 6)).astype(np.float32)
    w1[[0, 3]] = 0  # neurons 0 and 3 are sigmoid(2 * b1): constants
    proto = model_of(text, w1=w1, b1=r.standard_normal(5).astype(np.float32),
                     w2=r.standard_normal((5, 2)).astype(np.float32), b2=r.standard_normal(2).astype(np.float32),
                     w3=r.standard_normal((5, 2)).astype(np.float32))
    m = ir.from_onnx(proto)
    report = prune(m, PruneConfig(zero_only=True))
    unchanged(proto, m)
    assert report.groups[0].removed == 2
    assert any(n.op_type == "Add" and n.meta.get("graft.rule") == "prune_matmul" for n in m.graph)


def test_torch_ln_structured_filter_masks_on_resnet_are_removed_exactly(tmp_path):
    # only the filters are masked: BatchNormalization turns the zero channel into a constant, which the
    # next (padded) 3x3 conv sees as a constant map: it is compensated after that conv
    mod, args = resnet_style()
    for block in mod.layers:
        torch_prune.ln_structured(block.conv1[0], "weight", amount=0.25, n=1, dim=0)
        torch_prune.remove(block.conv1[0], "weight")
    path = export(mod, args, tmp_path / "resnet_masked.onnx", ["x"], {"x": {0: "batch"}})
    ref = onnx.load(path)
    m = ir.from_onnx(ref)
    report = prune(m, PruneConfig(zero_only=True))
    unchanged(ref, m)
    assert sorted(g.removed for g in report.groups if g.removed) == [4, 8, 16]
    maps = [n for n in m.graph if n.op_type == "Add" and n.meta.get("graft.rule") == "prune_conv"]
    assert len(maps) == 3


@pytest.mark.filterwarnings("ignore:The tensor attributes:UserWarning")  # torch.export on prune's hooks
def test_torch_path_with_attached_prune_masks_removes_masked_filters_exactly():
    from graft.compiler.techniques.pruning import prune_torch

    mod, args = resnet_style()
    for block in mod.layers:  # masks stay attached: the captured graph computes weight_orig * weight_mask
        torch_prune.ln_structured(block.conv1[0], "weight", amount=0.25, n=1, dim=0)
    gm, report = prune_torch(mod, args, PruneConfig(zero_only=True))
    assert [(g.module, g.removed) for g in report.groups if g.removed] == [
        ("layers.0.conv1.0", 4), ("layers.1.conv1.0", 8), ("layers.2.conv1.0", 16)]
    assert report.deviation[0].max_abs < 1e-5
    assert sum(p.numel() for p in gm.parameters()) < sum(p.numel() for p in mod.parameters())
