"""Pruning through the front doors: compile(prune=...), `graft compile --prune`, `graft diff`, Taylor."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from graft import ir
from graft.compiler import compile
from graft.compiler.techniques import numeric
from graft.compiler.driver.cli import main
from graft.compiler.techniques.pruning import PruneConfig, analyze, select
from graft.compiler.techniques.pruning.api import prepare
from graft.compiler.techniques.pruning.taylor import gradients
from examples.torch_models import resnet_style
from tests.compiler.pruning_models import tiny_bert


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"GRAFT_DEBUG": ""})


@pytest.fixture(scope="module")
def cls_pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "cls.pruned.onnx"
    r = invoke("compile", "ppocr-cls", "-o", out, "--prune", "0.5", "--prune-criterion", "bn_scale",
               "--prune-round", "4", "--dim", "?=48")
    return out, r


def test_cli_prune_writes_smaller_valid_model_and_reports(cls_pruned):
    out, r = cls_pruned
    assert r.exit_code == 0, r.output
    for piece in ("pruning", "MACs", "kept/size", "requested", "params / MACs per layer", "output deviation",
                  "prune_conv", f"wrote {out}"):
        assert piece in r.stdout, piece
    assert "verification FAILED" not in r.stdout
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    # round to 4: every conv output count is a multiple of 4 or a group of at most 4 channels
    outs = [inits[n.input[1]][0] for n in convs]
    assert all(c % 4 == 0 or c <= 4 for c in outs)


def test_cli_diff_shows_params_and_macs_per_layer(cls_pruned):
    out, _ = cls_pruned
    r = invoke("diff", "ppocr-cls", out, "--dim", "?=48")
    assert r.exit_code == 0, r.output
    assert "params / MACs per layer" in r.stdout and "Conv@0" in r.stdout
    r = invoke("diff", "ppocr-cls", out, "--dim", "?=48", "--json")
    data = json.loads(r.stdout)
    tot = data["layers"]["total"]
    assert tot["macs"][1] < 0.5 * tot["macs"][0] and tot["params"][1] < 0.5 * tot["params"][0]
    assert data["layers"]["layers"][0]["op"] == "Conv"


@pytest.mark.parametrize("args, message", [
    (("--prune", "1.0"), "ratio must be in [0, 1)"),
    (("--prune", "-0.2"), "ratio must be in [0, 1)"),
    (("--prune", "0.5", "--prune-criterion", "taylor"), "needs calibration inputs"),
    (("--prune", "0.5", "--prune-criterion", "magic"), "Invalid value for '--prune-criterion'"),
    (("--prune", "0.5", "--prune-zero-only"), "--prune-zero-only removes only exactly removable channels"),
])
def test_cli_bad_prune_requests_fail_clearly(tmp_path, args, message):
    r = invoke("compile", "ppocr-cls", "-o", tmp_path / "x.onnx", *args)
    assert r.exit_code != 0 and message in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_cli_nothing_prunable_is_a_clear_error(tmp_path):
    text = '<ir_version: 8, opset_import: ["" : 17]>\ng (float[1,4] x) => (float[1,4] y) { y = Relu (x) }'
    p = tmp_path / "relu.onnx"
    onnx.save(onnx.parser.parse_model(text), str(p))
    r = invoke("compile", p, "-o", tmp_path / "y.onnx", "--prune", "0.5")
    assert r.exit_code == 1 and "nothing to prune" in r.output and "no Conv, Gemm, MatMul" in r.output


def test_compile_zero_only_is_verified_like_any_rewrite():
    mod, args = resnet_style()
    import torch

    with torch.no_grad():
        mod.layers[0].conv1[0].weight[:3] = 0
        mod.layers[0].conv1[1].weight[:3] = 0
        mod.layers[0].conv1[1].bias[:3] = 0
    res = compile(mod, args, prune=PruneConfig(zero_only=True), target="onnx")
    assert res.verification.status == "passed" and res.prune.zero_only
    assert sum(g.removed for g in res.prune.groups) == 3


def test_compile_torch_target_prunes_transformer_and_updates_config():
    mod, args = tiny_bert()
    res = compile(mod, args, prune=0.5, target="torch")
    assert res.module.config.num_attention_heads == 2 and res.module.config.hidden_size == 32
    assert res.prune.config_updates == {"num_attention_heads": 2, "intermediate_size": 64, "hidden_size": 32}
    assert res.prune.deviation and res.prune.deviation[0].shape == (2, 3)
    assert "pruning" in res.report()
    out = res.module(*args)
    assert tuple(out.shape) == (2, 3)


def test_taylor_ranks_channels_that_never_fire_lowest():
    text = '<ir_version: 8, opset_import: ["" : 17]>\n' + """
g (float[2,3,6,6] x) => (float[2,4] y) {
  a = Conv (x, w1, b1)
  b = Relu (a)
  p = GlobalAveragePool (b)
  f = Flatten (p)
  y = Gemm (f, w2)
}"""
    r = np.random.default_rng(5)
    w1 = r.standard_normal((8, 3, 1, 1)).astype(np.float32)
    b1 = np.zeros(8, np.float32)
    b1[[2, 5]] = -100.0  # channels 2 and 5 never pass the ReLU: large weights, no effect on the loss
    w1[[2, 5]] *= 3.0
    w2 = r.standard_normal((8, 4)).astype(np.float32)
    proto = onnx.parser.parse_model(text)
    for k, v in dict(w1=w1, b1=b1, w2=w2).items():
        proto.graph.initializer.append(numpy_helper.from_array(v, k))
    m = ir.from_onnx(proto)
    prepare(m)
    calib = [numeric.make_inputs(proto, seed=s) for s in range(3)]
    grads = gradients(m, calib)
    assert set(grads) == {"w1", "b1", "w2"} and np.all(grads["w1"][[2, 5]] == 0) and np.all(grads["w2"][[2, 5]] == 0)
    a = analyze(m)
    pos = {c: i for i, c in enumerate(a.groups[0].classes)}
    taylor = select(a, 0.25, criterion="taylor", grads=grads)[0]
    assert sorted(pos[c] for c in taylor.remove) == [2, 5]
    assert np.all(taylor.scores[[0, 1, 3, 4, 6, 7]] > 0)
    l2 = select(a, 0.25, criterion="l2")[0]
    assert sorted(pos[c] for c in l2.remove) != [2, 5]  # by magnitude they are the strongest
    report_calib = compile(proto, prune=PruneConfig(ratio=0.25, criterion="taylor", calibration=calib)).prune
    assert [g.removed for g in report_calib.groups] == [2, 0]
