"""Models and an oracle for the pruning tests.

The oracle: removing a set of channels is the same function as keeping them and zeroing
every weight that reads them at a contraction (Conv / Gemm / MatMul inputs), as long as
no normalization averages over them (LayerNorm) and no constant is compensated. So a
pruned model must match the *masked* original within float rounding, which checks every
slice, offset, group count and reshape literal the removal rules wrote.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import numpy_helper

from graft import ir
from graft.compiler.engine.passes import RewritePass
from graft.compiler.techniques.pruning.api import _STATE_KEY, PruneConfig, finish, plan_pass, prepare
from graft.rules.prune_plan import PLAN_KEY
from graft.compiler.engine.rule import RuleSet
from graft.rules import prune as prune_rules


def masked_reference(model: ir.Model) -> onnx.ModelProto:
    """The planned (not yet rewritten) model with every weight reading a removed class zeroed."""
    plan = model.meta[PLAN_KEY]
    analysis = model.meta[_STATE_KEY][0]
    proto = ir.to_onnx(model)
    inits = {t.name: t for t in proto.graph.initializer}
    removed = np.array(sorted(plan.removed), dtype=np.int64)
    for leak in analysis.leaks:
        if leak.weight_axis is None:
            continue
        gone = np.isin(analysis.classes.roots(leak.atoms).ravel(), removed)
        if not gone.any():
            continue
        t = inits[leak.node.inputs[1].name]
        arr = np.moveaxis(numpy_helper.to_array(t).copy(), leak.weight_axis, 0)
        arr[np.flatnonzero(gone)] = 0
        t.CopyFrom(numpy_helper.from_array(np.moveaxis(arr, 0, leak.weight_axis), t.name))
    return proto


def prune_with_oracle(model: ir.Model, config: PruneConfig):
    """Prune ``model`` in place stage by stage; returns (masked reference proto, report)."""
    config.validate()
    prepare(model)
    plan_pass(model, config)
    masked = masked_reference(model)
    RewritePass(RuleSet(prune_rules.RULES, name="prune"), "prune_rules")(model)
    finish(model)
    return masked, model.meta["graft.prune_report"]


def export(module, args, path, names, dynamic=None, output_names=("output",)) -> str:
    """torch.onnx.export(dynamo=False), opset 17."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(names), output_names=list(output_names),
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return str(path)


def tiny_bert(num_labels: int = 3, seed: int = 0):
    """BertForSequenceClassification from a config (random weights): hidden 64, 4 heads of 16, 2 layers."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=num_labels)
    model = transformers.BertForSequenceClassification(cfg).eval()
    _randomize_biases(model, seed)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
    return model, (ids, torch.ones(2, 8, dtype=torch.int64))


def tiny_vit(seed: int = 0):
    """ViTForImageClassification from a config: 32x32 images, patches of 8, hidden 64, 4 heads, 2 layers."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    _randomize_biases(model, seed)
    return model, (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),)


def _randomize_biases(model, seed: int) -> None:
    """Fresh transformers models have zero biases and unit LayerNorm scales; make them real numbers."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm.weight" in name or "layernorm" in name.lower():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
