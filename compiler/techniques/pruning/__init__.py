"""Structured pruning: channel-dependency analysis and physical removal of channels, heads and neurons.

- :func:`analyze` finds the coupled channel groups of an IR model (:mod:`.dependency`).
- :func:`select` ranks classes by ``l1`` / ``l2`` / ``bn_scale`` / ``taylor`` and chooses what to remove.
- :func:`prune` (or :func:`prune_pipeline` as a pass) removes them with the rules of ``rules/prune.py``
  and returns a :class:`PruneReport` (parameters and MACs per layer, requested vs actual ratio).
- :func:`prune_torch` prunes a torch model into a smaller, trainable ``torch.fx.GraphModule``.
- :func:`layer_costs` counts parameters and MACs per layer.
"""
from graft.compiler.techniques.pruning.api import PruneConfig, PruneError, deviation, prune, prune_pipeline, REPORT_KEY
from graft.compiler.techniques.pruning.dependency import Analysis, AnalysisError, Group, analyze
from graft.compiler.techniques.pruning.macs import LayerCost, layer_costs, total_params
from graft.compiler.techniques.pruning.report import PruneReport, layer_diff
from graft.compiler.techniques.pruning.select import SelectionError, select
from graft.compiler.techniques.pruning.torch_path import prune_torch

__all__ = ["Analysis", "AnalysisError", "Group", "LayerCost", "PruneConfig", "PruneError", "PruneReport",
           "REPORT_KEY", "SelectionError", "analyze", "deviation", "layer_costs", "layer_diff", "prune",
           "prune_pipeline", "prune_torch", "select", "total_params"]
