"""Pruning torch models: capture → lower to ONNX ops → prune → a smaller, trainable GraphModule.

::

    from graft.compiler.techniques.pruning.torch_path import prune_torch
    gm, report = prune_torch(model, (x,), PruneConfig(ratio=0.5))
    gm.train(); loss = gm(x).sum(); loss.backward()          # fine-tune as usual

The GraphModule's parameters keep the source model's state_dict keys (pruned to their
new shapes). For a transformers model the report's ``config_updates`` gives the new
``num_attention_heads`` / ``intermediate_size`` / ``hidden_size`` when every layer
shrank alike, and ``gm.config`` is a copy of the model's config with them applied;
the per-group counts are in the report when layers differ (global ratio).
"""
from __future__ import annotations

import copy

from graft.compiler.techniques.pruning.api import REPORT_KEY, PruneConfig, prune_pipeline
from graft.compiler.techniques.pruning.config_updates import transformer_config_updates


def prune_torch(module, example_inputs, config: PruneConfig | None = None, *, example_kwargs: dict | None = None,
                dynamic_shapes=None, check: bool = True, **kw):
    """Prune a ``torch.nn.Module`` (or GraphModule) and return ``(GraphModule, PruneReport)``.

    Args:
        module: the model (captured in eval mode with ``ir.from_torch``).
        example_inputs: positional inputs (a tensor or a tuple) used to capture it.
        config: the request (keywords build one).
        check: run both models on ``example_inputs`` and record the output deviation.

    Raises:
        graft.ir.torch_frontend.TorchCaptureError: the model cannot be captured.
        PruneError / SelectionError: see :func:`graft.compiler.techniques.pruning.prune`.
    """
    import torch

    from graft import ir
    from graft.rules.lower_aten_pipeline import lower_aten

    config = config or PruneConfig(**kw)
    config.validate()
    model = ir.from_torch(module, example_inputs, dynamic_shapes, example_kwargs=example_kwargs)
    lower_aten()(model)
    prune_pipeline(config)(model)
    report = model.meta[REPORT_KEY]
    gm = ir.to_torch(model, class_name=f"Pruned{type(module).__name__}")
    hf = getattr(module, "config", None)
    if hf is not None:
        report.config_updates = transformer_config_updates(report, hf)
        gm.config = copy.deepcopy(hf)
        for k, v in report.config_updates.items():
            setattr(gm.config, k, v)
    gm.graft_prune_report = report
    if check:
        from graft.ir.torch_frontend import eval_mode

        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        # the reference in eval mode, as captured: a module left in train mode would compare batch
        # statistics (and update its BatchNormalization running stats as a side effect)
        with torch.no_grad(), eval_mode(module), eval_mode(gm):
            ref = _flatten(module(*args, **(example_kwargs or {})))
            got = _flatten(gm(*args, *(example_kwargs or {}).values()))
        from graft.compiler.techniques.numeric import agreement

        report.deviation = [agreement(a.detach().numpy(), b.detach().numpy(), f"output{i}")
                            for i, (a, b) in enumerate(zip(ref, got))]
    return gm, report


def _flatten(out) -> list:
    if isinstance(out, (tuple, list)):
        return [y for x in out for y in _flatten(x)]
    if isinstance(out, dict):
        return [y for x in out.values() for y in _flatten(x)]
    if hasattr(out, "to_tuple"):
        return _flatten(out.to_tuple())
    return [out]
