"""What a pruned transformers model's config must say: the head, MLP and hidden sizes the pruning left.

Used by :func:`graft.compiler.techniques.pruning.torch_path.prune_torch` (``gm.config``) and by the compile
driver (``CompileResult.prune.config_updates``) through :func:`graft.compiler.techniques.pruning.api.attach_report`.
The field names are the ``transformers`` ``PretrainedConfig`` ones (BERT, ViT, ...).
"""
from __future__ import annotations

import numpy as np


def transformer_config_updates(report, hf_config) -> dict:
    """Config fields implied by the pruned shapes, when uniform across layers.

    ``num_attention_heads`` from the head groups, ``intermediate_size`` from the MLP
    neuron groups (groups of ``intermediate_size`` neurons), ``hidden_size`` from the
    residual group. A field is left out when layers differ (it cannot describe them).
    """
    out = {}
    heads = [g for g in report.groups if g.kind == "heads"]
    if heads and len({g.kept for g in heads}) == 1 and getattr(hf_config, "num_attention_heads", None):
        out["num_attention_heads"] = heads[0].kept
    inter = getattr(hf_config, "intermediate_size", None)
    mlp = [g for g in report.groups if g.kind == "neurons" and g.size == inter]
    if mlp and len({g.kept for g in mlp}) == 1:
        out["intermediate_size"] = mlp[0].kept
    hidden = [g for g in report.groups if g.kind == "hidden" and g.size == getattr(hf_config, "hidden_size", -1)]
    if len(hidden) == 1 and hidden[0].removed:
        out["hidden_size"] = hidden[0].kept
    out = {k: int(v) for k, v in out.items() if isinstance(v, (int, np.integer))}
    problem = _head_size_problem(out, heads, hf_config)
    if problem and hasattr(report, "notes") and problem not in report.notes:
        report.notes.append(problem)
    return out


def _head_size_problem(updates: dict, heads: list, hf_config) -> str:
    """Why the updated config cannot rebuild the pruned model, '' when it can.

    BERT, ViT and most transformers configs have no head size of their own: the attention
    modules derive it as ``hidden_size // num_attention_heads``. Pruning the residual width
    and the heads by different fractions (rounding to whole heads, or a global ratio) leaves
    heads whose width is not that quotient.
    """
    n_heads = updates.get("num_attention_heads", getattr(hf_config, "num_attention_heads", None))
    hidden = updates.get("hidden_size", getattr(hf_config, "hidden_size", None))
    if not heads or not n_heads or not hidden or getattr(hf_config, "head_dim", None) or \
            not ({"num_attention_heads", "hidden_size"} & set(updates)):
        return ""
    sizes = {g.block for g in heads}
    kept = {g.kept for g in heads}
    if len(kept) > 1:
        return (f"config: the layers keep different head counts ({sorted(kept)}), which num_attention_heads "
                f"cannot describe; rebuild from the pruned GraphModule, not from the config")
    if len(sizes) == 1 and hidden % n_heads == 0 and hidden // n_heads == next(iter(sizes)):
        return ""
    return (f"config: transformers derives the head size as hidden_size / num_attention_heads = {hidden} / "
            f"{n_heads}, but the pruned heads are {'/'.join(map(str, sorted(sizes)))} wide, so this config "
            f"cannot rebuild the pruned model (its counts are right; the pruned GraphModule is the model)")
