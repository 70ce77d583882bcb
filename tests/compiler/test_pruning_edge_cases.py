"""Pruning edge cases found by trying to break it: ranges that would become empty, padding around constant
channels, grouped convolutions with rounding, bad option types, transformers configs that cannot describe
the pruned shapes, leftover aten ops, unprunable weights, and the Torch-Pruning bench."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graft import ir
from graft.compiler.techniques import numeric
from graft.compiler.techniques.pruning import PruneConfig, PruneError, SelectionError, analyze, prune
from graft.compiler.techniques.pruning.report import GroupRow
from tests.compiler.pruning_models import prune_with_oracle

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def proto_of(text: str, **arrays) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    for name, arr in arrays.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def w(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def close(a: onnx.ModelProto, b: onnx.ModelProto, atol=1e-5):
    res = numeric.compare(a, b)
    assert all(r.max_abs <= atol for r in res), [(r.name, r.max_abs) for r in res]


def no_empty_dims(m: ir.Model) -> None:
    for v in m.graph.initializers.values():
        assert 0 not in v.const.shape, (v.name, v.const.shape)


# --------------------------------------------------------------------------- empty sub-ranges
SPLIT3 = HEAD + """
g (float[1,3,8,8] x) => (float[1,2,8,8] y) {
  a = Conv (x, w1)
  s1, s2, s3 = Split <axis=1> (a, sp)
  t1 = Conv (s1, w2)
  t2 = Conv (s2, w3)
  t3 = Conv (s3, w4)
  u = Add (t1, t2)
  v = Add (u, t3)
  y = Conv (v, w5)
}"""


def test_a_split_part_never_becomes_empty():
    # the 2-channel part is the weakest of the 10: the ratio alone would remove all of it, leaving a Split
    # output and a Conv input with 0 channels
    rng = np.random.default_rng(0)
    w1 = w(rng, 10, 3, 1, 1)
    w1[:2] *= 1e-3
    proto = proto_of(SPLIT3, w1=w1, sp=np.array([2, 3, 5], np.int64), w2=w(rng, 4, 2, 1, 1, scale=1e-3),
                     w3=w(rng, 4, 3, 1, 1), w4=w(rng, 4, 5, 1, 1), w5=w(rng, 2, 4, 1, 1))
    m = ir.from_onnx(proto)
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.5))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    close(masked, p)
    no_empty_dims(m)
    split = next(n for n in m.graph if n.op_type == "Split")
    sizes = split.inputs[1].constant().tolist()
    # the strongest weak channel stays, and the weakest other channel goes instead: the ratio still holds
    assert sizes[0] == 1 and sum(sizes) == 5
    row = report.groups[0]
    assert (row.size, row.kept) == (10, 5) and "'s1'" in row.note and "empty" in row.note


def test_a_conv_feeding_part_of_a_concat_never_loses_all_its_channels():
    # a (4 channels) and b (6) are concatenated and added to d (10): one group of 10 classes, of which a
    # holds 4 weak ones; removing all of them would leave Conv a with 0 output channels
    rng = np.random.default_rng(6)
    w4 = w(rng, 2, 10, 1, 1)
    w4[:, :4] *= 1e-3
    proto = proto_of(HEAD + """
g (float[1,3,8,8] x) => (float[1,2,8,8] y) {
  a = Conv (x, w1)
  b = Conv (x, w2)
  c = Concat <axis=1> (a, b)
  d = Conv (x, w3)
  e = Add (c, d)
  y = Conv (e, w4)
}""", w1=w(rng, 4, 3, 1, 1, scale=1e-3), w2=w(rng, 6, 3, 1, 1), w3=w(rng, 10, 3, 1, 1), w4=w4)
    m = ir.from_onnx(proto)
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.5))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    close(masked, p)
    no_empty_dims(m)
    shapes = {t.name: tuple(t.dims) for t in p.graph.initializer}
    assert shapes["w1"] == (1, 3, 1, 1) and shapes["w2"] == (4, 3, 1, 1) and shapes["w3"] == (5, 3, 1, 1)
    assert report.groups[0].kept == 5 and "'a'" in report.groups[0].note


def test_a_split_part_stays_nonempty_with_rounding_and_zero_only():
    rng = np.random.default_rng(1)
    w1 = w(rng, 10, 3, 1, 1)
    w1[:2] = 0  # the whole first part is zero channels: exactly removable, but it must keep one
    proto = proto_of(SPLIT3, w1=w1, sp=np.array([2, 3, 5], np.int64), w2=w(rng, 4, 2, 1, 1),
                     w3=w(rng, 4, 3, 1, 1), w4=w(rng, 4, 5, 1, 1), w5=w(rng, 2, 4, 1, 1))
    m = ir.from_onnx(proto)
    prune(m, PruneConfig(zero_only=True))
    no_empty_dims(m)
    close(proto, ir.to_onnx(m))
    assert next(n for n in m.graph if n.op_type == "Split").inputs[1].constant().tolist() == [1, 3, 5]
    m = ir.from_onnx(proto)
    report = prune(m, PruneConfig(ratio=0.5, round_to=4))
    no_empty_dims(m)
    assert report.groups[0].kept % 4 == 0
    onnx.checker.check_model(ir.to_onnx(m), full_check=True)


def test_a_slice_range_never_becomes_empty():
    rng = np.random.default_rng(2)
    w1 = w(rng, 10, 3, 1, 1)
    w1[2:5] *= 1e-4
    w3 = w(rng, 2, 10, 1, 1)
    w3[:, 2:5] *= 1e-4
    proto = proto_of(HEAD + """
g (float[1,3,8,8] x) => (float[1,2,8,8] y) {
  a = Conv (x, w1)
  s = Slice (a, st, en, ax)
  t = Conv (a, w3)
  z = Conv (s, w2)
  y = Add (z, t)
}""", w1=w1, st=np.array([2], np.int64), en=np.array([5], np.int64), ax=np.array([1], np.int64),
        w2=w(rng, 2, 3, 1, 1, scale=1e-4), w3=w3)
    m = ir.from_onnx(proto)
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.7))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    close(masked, p)
    no_empty_dims(m)
    z = next(n for n in m.graph if n.outputs[0].name == "z")
    assert z.inputs[1].const.shape == (2, 1, 1, 1)
    assert "empty" in report.groups[0].note


# --------------------------------------------------------------------------- padding around constant channels
PAD = HEAD + """
g (float[1,3,8,8] x) => (float[1,2,8,8] y) {
  a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  c = Relu (a)
  q = Pad <mode="MODE"> (c, pads, pv)
  y = Conv (q, w3)
}"""


@pytest.mark.parametrize("mode,value", [("constant", 0.0), ("constant", 0.7), ("edge", 0.0), ("reflect", 0.0)])
def test_zero_channels_through_pad_are_removed_exactly(mode, value):
    # zero filters with a bias: a constant channel; constant-mode Pad surrounds it with the pad value,
    # so it is a constant map (not a constant) at the unpadded 3x3 conv that reads it
    rng = np.random.default_rng(3)
    w1 = w(rng, 6, 3, 3, 3)
    w1[[1, 4]] = 0
    proto = proto_of(PAD.replace("MODE", mode), w1=w1, b1=w(rng, 6) + 1.0,
                     pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), pv=np.array(value, np.float32),
                     w3=w(rng, 2, 6, 3, 3))
    m = ir.from_onnx(proto)
    report = prune(m, PruneConfig(zero_only=True))
    assert report.groups[0].removed == 2
    out = ir.to_onnx(m)
    onnx.checker.check_model(out, full_check=True)
    close(proto, out)


# --------------------------------------------------------------------------- grouped convolutions
GROUPED = HEAD + """
g (float[1,3,8,8] x) => (float[1,2,8,8] y) {
  a = Conv (x, w1)
  b = Conv <group=4, pads=[1,1,1,1]> (a, w2)
  c = Relu (b)
  y = Conv (c, w3)
}"""


@pytest.mark.parametrize("round_to,kept", [(1, 8), (8, 8), (16, 16), (32, 16)])
def test_grouped_conv_groups_are_channels_rounded_in_channels(round_to, kept):
    # 16 channels in 4 conv groups of 4: a class is a whole conv group; round_to counts channels
    rng = np.random.default_rng(4)
    proto = proto_of(GROUPED, w1=w(rng, 16, 3, 1, 1), w2=w(rng, 16, 4, 3, 3), w3=w(rng, 2, 16, 1, 1))
    m = ir.from_onnx(proto)
    g = analyze(m).groups[0]
    assert (g.kind, g.size, g.block) == ("channels", 4, 4)
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.5, round_to=round_to))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    close(masked, p)
    conv = next(n for n in m.graph if n.outputs[0].name == "b")
    assert conv.inputs[1].const.shape == (kept, 4, 3, 3) and conv.attrs["group"] == kept // 4
    assert "num_attention_heads" not in report.config_updates  # conv groups are not attention heads


# --------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("ratio", ["0.5", b"0.5", True, None, [0.5]])
def test_ratio_of_the_wrong_type_is_a_clear_error(ratio):
    with pytest.raises(SelectionError, match=r"ratio must be a number in \[0, 1\), got"):
        PruneConfig(ratio=ratio).validate()


@pytest.mark.parametrize("round_to", [float("nan"), float("inf"), True, "8", 2.5, 0])
def test_round_to_that_is_not_a_positive_integer_is_a_clear_error(round_to):
    with pytest.raises(PruneError, match="round_to must be a positive integer"):
        PruneConfig(round_to=round_to).validate()


def test_numpy_numbers_are_accepted():
    c = PruneConfig(ratio=np.float32(0.25), round_to=np.int64(8)).validate()
    assert c.ratio == 0.25 and c.round_to == 8 and type(c.round_to) is int


def _weights_from(kind: str) -> ir.Model:
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["c"]),
             helper.make_node("Conv", ["c", "w3"], ["y"])]
    w1, w3 = np.ones((8, 3, 1, 1), np.float32), np.ones((2, 8, 1, 1), np.float32)
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w3, "w3")]
    if kind == "input":  # old exporters list initializers as graph inputs: callers may override them
        inputs += [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(a.shape))
                   for n, a in (("w1", w1), ("w3", w3))]
    else:  # QDQ: the weights are DequantizeLinear outputs
        nodes = [helper.make_node("DequantizeLinear", [f"{n}q", "s", "z"], [n]) for n in ("w1", "w3")] + nodes
        inits = [numpy_helper.from_array(a.astype(np.int8), f"{n}q") for n, a in (("w1", w1), ("w3", w3))] + \
            [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8),
                                                                                              "z")]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                                             [1, 2, 8, 8])], inits)
    return ir.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


@pytest.mark.parametrize("kind,why", [("input", "reads its weight from graph input 'w1'"),
                                      ("qdq", "quantized weight through DequantizeLinear: prune the float model")])
def test_unprunable_weights_say_why(kind, why):
    with pytest.raises(PruneError, match="nothing to prune") as e:
        prune(_weights_from(kind), PruneConfig(ratio=0.5))
    assert why in str(e.value)


# --------------------------------------------------------------------------- leftover aten ops
def test_aten_ops_left_after_lowering_are_opaque_not_fatal():
    # an aten op with no ONNX lowering (aten::diff of position ids in transformers masks) must not stop
    # pruning the rest; one that reads channels blocks them
    rng = np.random.default_rng(5)
    text = '<ir_version: 8, opset_import: ["" : 17, "aten" : 1]>\n' + """
g (float[1,3,8,8] x, int64[1,8] ids) => (float[1,2,8,8] y, int64[1,8] d, float[1,4,8,8] e) {
  a = Conv (x, w1)
  c = Relu (a)
  y = Conv (c, w2)
  d = aten.diff (ids)
  b = Conv (x, w3)
  e = aten.gelu (b)
}"""
    proto = onnx.parser.parse_model(text)
    for n, arr in (("w1", w(rng, 8, 3, 1, 1)), ("w2", w(rng, 2, 8, 1, 1)), ("w3", w(rng, 4, 3, 1, 1))):
        proto.graph.initializer.append(numpy_helper.from_array(arr, n))
    m = ir.from_onnx(proto)
    report = prune(m, PruneConfig(ratio=0.5))
    rows = {g.name: g for g in report.groups}
    assert rows["a"].kept == 4 and rows["b"].removed == 0 and "aten::gelu" in rows["b"].note
    assert sum(1 for n in m.graph if n.domain == "aten") == 2


# --------------------------------------------------------------------------- transformers configs
def _report(heads: list[tuple[int, int, int]], hidden: tuple[int, int] | None):
    groups = [GroupRow(f"h{i}", "heads", size, block, size - kept, 0.5, 0, 0) for i, (size, kept, block)
              in enumerate(heads)]
    if hidden:
        groups.append(GroupRow("emb", "hidden", hidden[0], 1, hidden[0] - hidden[1], 0.5, 0, 0))
    return SimpleNamespace(groups=groups, notes=[])


@pytest.mark.parametrize("heads,hidden,updates,problem", [
    ([(4, 2, 16)] * 2, (64, 32), {"num_attention_heads": 2, "hidden_size": 32}, None),
    ([(4, 2, 16)] * 2, None, {"num_attention_heads": 2}, "64 / 2, but the pruned heads are 16 wide"),
    ([(3, 2, 16)] * 2, (48, 24), {"num_attention_heads": 2, "hidden_size": 24}, "24 / 2"),
    ([(4, 2, 16), (4, 1, 16)], (64, 32), {"hidden_size": 32}, "different head counts ([1, 2])"),
])
def test_transformer_config_updates_say_when_the_config_cannot_rebuild_the_model(heads, hidden, updates, problem):
    import transformers

    from graft.compiler.techniques.pruning.torch_path import transformer_config_updates

    cfg = transformers.BertConfig(hidden_size=heads[0][0] * heads[0][2], num_attention_heads=heads[0][0])
    report = _report(heads, hidden)
    assert transformer_config_updates(report, cfg) == updates
    if problem is None:
        assert report.notes == []
    else:
        assert len(report.notes) == 1 and problem in report.notes[0] and "GraphModule" in report.notes[0]


# --------------------------------------------------------------------------- the Torch-Pruning bench
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_bench_counts_both_tools_alike_and_graft_cuts_at_least_as_much(tmp_path, ratio):
    # at 0.3, 16 / 32 / 64 channels keep 11 / 22 / 44 (at least the ratio goes): rounding the kept count to
    # the nearest (11 / 22 / 45) cut fewer MACs than Torch-Pruning
    spec = importlib.util.spec_from_file_location("bench_prune", Path(__file__).resolve().parents[2] / "bench" /
                                                  "bench_prune.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(bench)
    from examples.torch_models import resnet_style

    module, args = resnet_style(batch=1, image=32)
    onnx_row, torch_row = bench.run_graft("resnet", module, args, None, ratio, tmp_path)
    tp_row = bench.run_torch_pruning("resnet", module, args, None, ratio, tmp_path)
    for row in (onnx_row, torch_row, tp_row):
        assert row.runs and not row.error and np.isfinite(row.max_abs), row
        assert ratio <= row.group_ratios[0] <= row.group_ratios[1] < ratio + 0.1
    assert onnx_row.macs[0] == torch_row.macs[0] == tp_row.macs[0]  # one counter, one source model
    assert onnx_row.macs[1] == torch_row.macs[1] <= tp_row.macs[1]
    assert torch_row.tool_macs[1] == torch_row.macs[1]  # graft's report agrees with the export's count


# --------------------------------------------------------------------------- torch modules left in train mode
def test_torch_module_in_train_mode_is_compared_in_eval_mode_and_left_untouched():
    import torch

    from graft.compiler.techniques.pruning.torch_path import prune_torch
    from examples.torch_models import resnet_style

    module, args = resnet_style()
    module.train()
    bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    _, report = prune_torch(module, args, PruneConfig(ratio=0.0))  # nothing removed: the same function
    assert report.deviation and all(d.max_abs < 1e-5 for d in report.deviation)
    assert module.training and bn.training and torch.equal(bn.running_mean, stats)
