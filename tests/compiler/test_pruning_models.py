"""Structured pruning of real models: PP-OCR cls (ONNX), ResNet- and MobileNetV3-style CNNs (ONNX export and
torch), BERT and ViT built from transformers configs (heads, MLP neurons, residual dimension), MiniLM."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from graft import ir
from graft.compiler.techniques import numeric
from graft.compiler.techniques.pruning import PruneConfig, prune
from graft.compiler.techniques.pruning.torch_path import prune_torch
from examples.torch_models import mobilenetv3_style, resnet_style
from tests.compiler.pruning_models import export, prune_with_oracle, tiny_bert, tiny_vit


def close(a: onnx.ModelProto, b: onnx.ModelProto, atol=1e-4, dim_sizes=None):
    res = numeric.compare(a, b, dim_sizes=dim_sizes)
    assert all(r.max_abs <= atol for r in res), [(r.name, r.max_abs) for r in res]


def weights(proto: onnx.ModelProto) -> dict:
    return {t.name: tuple(t.dims) for t in proto.graph.initializer}


# --------------------------------------------------------------------------- PP-OCR cls
def test_ppocr_cls_half_is_checker_valid_smaller_and_equals_masked_original(ppocr_cls_path):
    m = ir.load(ppocr_cls_path)
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.5, dim_sizes={"?": 48}))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    close(masked, p, dim_sizes={"?": 48})
    w = weights(p)
    # stem 8 -> 4, first block expand 8 -> 4 (depthwise follows), SE squeeze 2 -> 1, last conv 200 -> 100
    assert w["conv1_weights"] == (4, 3, 3, 3)
    assert w["conv2_depthwise_weights"] == (4, 1, 3, 3) and w["conv2_se_1_weights"] == (1, 4, 1, 1)
    assert w["conv_last_weights"] == (100, 16, 1, 1) and w["fc_0.w_0"] == (100, 2)
    dw = [n for n in m.graph if n.op_type == "Conv" and n.attrs.get("group", 1) > 1]
    assert all(n.attrs["group"] == n.inputs[1].const.shape[0] for n in dw)
    assert report.macs_after < 0.4 * report.macs_before and report.params_after < 0.4 * report.params_before
    assert all(abs(g.actual - 0.5) < 1e-9 for g in report.groups if g.removed)
    out = [g for g in report.groups if not g.removed]
    assert len(out) == 1 and "graph output" in out[0].note  # the classifier's 2 logits stay


# --------------------------------------------------------------------------- CNNs from examples/torch_models.py
@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnn")
    out = {}
    for name, fac in (("resnet", resnet_style), ("mobilenet", mobilenetv3_style)):
        mod, args = fac()
        out[name] = export(mod, args, d / f"{name}.onnx", ["x"], {"x": {0: "batch"}})
    return out


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_cnn_onnx_half_prunes_every_stage_and_equals_masked_original(cnn_onnx, name):
    m = ir.load(cnn_onnx[name])
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.5, round_to=4))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    close(masked, p)
    assert report.macs_after < 0.5 * report.macs_before
    for g in report.groups:
        if g.removed:
            assert g.kept % 4 == 0 or g.size <= 4
    convs = [n for n in ir.load(cnn_onnx[name]).graph if n.op_type == "Conv"]
    after = {n.name: n for n in m.graph if n.op_type == "Conv"}
    for n in convs:  # every conv shrank; its output channels are its group's kept count
        assert after[n.name].inputs[1].const.shape[0] < n.inputs[1].const.shape[0]


def test_resnet_residual_stage_is_one_group(cnn_onnx):
    from graft.compiler.techniques.pruning import analyze
    from graft.compiler.techniques.pruning.api import prepare

    m = ir.load(cnn_onnx["resnet"])
    prepare(m)
    a = analyze(m)
    # the stem conv, the first block's conv2 and the residual add form one 16-channel group
    stem = a.groups[0]
    assert stem.size == 16 and len(stem.sources) == 2
    assert sum(1 for mb in stem.members if mb.role == "consumer") == 3  # block 1 conv1, block 2 conv1 + shortcut


@pytest.mark.parametrize("fac", [resnet_style, mobilenetv3_style], ids=["resnet", "mobilenet"])
def test_torch_input_gives_smaller_trainable_graphmodule(fac):
    mod, args = fac()
    gm, report = prune_torch(mod, args, PruneConfig(ratio=0.5))
    assert isinstance(gm, torch.fx.GraphModule)
    n_before = sum(p.numel() for p in mod.parameters())
    n_after = sum(p.numel() for p in gm.parameters())
    assert n_after < 0.4 * n_before
    out = gm(*args)
    assert out.shape == mod(*args).shape
    out.sum().backward()  # trainable: gradients reach the pruned weights
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
    assert report.macs_after < 0.5 * report.macs_before
    assert any(g.module.startswith("layers.") or g.module.startswith("blocks.") for g in report.groups)


# --------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    mod, args = tiny_bert()
    names = ["input_ids", "attention_mask"]
    return export(mod, args, tmp_path_factory.mktemp("bert") / "bert.onnx", names,
                  {n: {0: "batch", 1: "seq"} for n in names}, ("logits",))


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory):
    mod, args = tiny_vit()
    return export(mod, args, tmp_path_factory.mktemp("vit") / "vit.onnx", ["pixel_values"],
                  {"pixel_values": {0: "batch"}}, ("logits",))


@pytest.mark.parametrize("which", ["bert", "vit"])
def test_transformer_heads_and_mlp_equal_masked_original(which, bert_onnx, vit_onnx):
    path = bert_onnx if which == "bert" else vit_onnx
    m = ir.load(path)
    masked, report = prune_with_oracle(m, PruneConfig(ratio=0.5, kinds=("heads", "neurons"),
                                                      dim_sizes={"batch": 2, "seq": 8}))
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    close(masked, p, dim_sizes={"batch": 2, "seq": 8})
    heads = [g for g in report.groups if g.kind == "heads"]
    assert len(heads) == 2 and all((g.size, g.kept, g.block) == (4, 2, 16) for g in heads)
    assert report.config_updates["num_attention_heads"] == 2


@pytest.mark.parametrize("which", ["bert", "vit"])
def test_transformer_residual_dimension_prunes_and_keeps_heads_whole(which, bert_onnx, vit_onnx):
    path = bert_onnx if which == "bert" else vit_onnx
    m = ir.load(path)
    ref = onnx.load(path)
    report = prune(m, PruneConfig(ratio=0.5, dim_sizes={"batch": 2, "seq": 8}), check=True)
    p = ir.to_onnx(m)
    onnx.checker.check_model(p, full_check=True)
    hidden = [g for g in report.groups if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].kept == 32
    assert report.config_updates == {"num_attention_heads": 2, "hidden_size": 32}
    # every projection feeding a head split now has 2 heads x 16 columns; every one reading the
    # residual stream has 32 rows
    for n in m.graph:
        if n.op_type == "MatMul" and n.inputs[1].constant() is not None:
            rows, cols = n.inputs[1].constant().shape
            assert rows in (32, 64) and cols in (32, 64)  # 64 = kept MLP neurons
    for d in report.deviation:  # runs in onnxruntime with the original output shapes
        assert np.isfinite(d.max_abs) and d.shape == tuple(numeric.run(ref, numeric.make_inputs(
            ref, dim_sizes={"batch": 2, "seq": 8}))[d.name].shape)
    assert report.macs_after < 0.3 * report.macs_before


@pytest.mark.parametrize("fac", [tiny_bert, tiny_vit], ids=["bert", "vit"])
def test_transformer_torch_path_updates_config(fac):
    mod, args = fac()
    gm, report = prune_torch(mod, args, PruneConfig(ratio=0.5))
    assert gm.config.num_attention_heads == 2 and gm.config.intermediate_size == 64 and gm.config.hidden_size == 32
    assert mod.config.num_attention_heads == 4  # the source model's config is untouched
    sd = gm.state_dict()
    emb = "bert.embeddings.word_embeddings.weight" if fac is tiny_bert else "vit.embeddings.cls_token"
    assert sd[emb].shape[-1] == 32  # parameters keep their state_dict keys, pruned
    out = gm(*args)
    assert out.shape == mod(*args).logits.shape
    out.sum().backward()


def test_minilm_heads_prune_and_hidden_is_blocked_by_its_output(minilm_onnx_path):
    m = ir.load(minilm_onnx_path)
    report = prune(m, PruneConfig(ratio=0.5, kinds=("heads",), dim_sizes={"batch": 1, "seq": 8}))
    onnx.checker.check_model(ir.to_onnx(m), full_check=False)
    heads = [g for g in report.groups if g.kind == "heads"]
    assert len(heads) == 6 and all((g.size, g.kept, g.block) == (12, 6, 32) for g in heads)
    hidden = next(g for g in report.groups if g.kind == "hidden")
    assert hidden.removed == 0 and "last_hidden_state" in hidden.note


@pytest.mark.parametrize("name", ["ppocr-det", "ppocr-rec"])
def test_ppocr_det_and_rec_prune_to_valid_running_models(name):
    # det: FPN with ConvTranspose upsampling and Concat; rec: SVTR blocks with packed q/k/v
    # projections, LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div
    from graft.ir import zoo

    m = ir.load(zoo.ppocr_path(name))
    report = prune(m, PruneConfig(ratio=0.5, dim_sizes={"?": 48}), check=True)
    onnx.checker.check_model(ir.to_onnx(m), full_check=True)
    assert report.macs_after < 0.35 * report.macs_before
    assert all(np.isfinite(d.max_abs) for d in report.deviation)
    blocked = [g for g in report.groups if g.blocked == g.size]
    assert len(blocked) == 1 and "graph output" in blocked[0].note
    if name == "ppocr-rec":
        heads = [g for g in report.groups if g.kind == "heads"]
        # 8 heads of 15: one head is 45 positions of the packed q/k/v projection (3 x 15)
        assert len(heads) == 2 and all((g.size, g.kept, g.block) == (8, 4, 45) for g in heads)
        # the 120-wide stream normalized by the decomposed LayerNorm is pruned too (approximately)
        assert any(g.size == 120 and g.removed == 60 for g in report.groups)
    else:
        assert any(n.op_type == "ConvTranspose" and n.meta.get("graft.rule") == "prune_conv_transpose"
                   for n in m.graph)
