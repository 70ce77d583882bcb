"""Structured pruning as a pass: prepare → analyze + select + plan → removal rules → finish.

::

    from graft.compiler.techniques.pruning import PruneConfig, prune
    report = prune(model, PruneConfig(ratio=0.5, criterion="l2"))   # ir.Model, edited in place
    print(report.macs_before, report.macs_after)

:func:`prune_pipeline` gives the same as a :class:`graft.compiler.engine.passes.Pipeline` (what
``graft compile --prune`` runs before the chosen pipeline); the removal itself is the
rule set of ``rules/prune.py``, so every pruned node carries ``graft.rule`` provenance.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graft.compiler.engine.passes import FunctionPass, Pipeline, RewritePass
from graft.compiler.techniques.pruning.config_updates import transformer_config_updates
from graft.compiler.techniques.pruning.dependency import Analysis, analyze
from graft.compiler.techniques.pruning.macs import layer_costs, total_params
from graft.compiler.techniques.pruning.plan import build
from graft.rules.prune_plan import PLAN_KEY, store
from graft.compiler.techniques.pruning.report import GroupRow, PruneReport
from graft.compiler.techniques.pruning.select import SelectionError, check_ratio, check_round_to, select
from graft.compiler.techniques.pruning.shapes import input_sizes, static_shapes
from graft.compiler.engine.rule import RuleSet
from graft.ir import Model

REPORT_KEY = "graft.prune_report"
_FOLD_KEEPING_PARAMETERS = None
_STATE_KEY = "graft.prune_state"
KINDS = ("channels", "neurons", "heads", "hidden")


class PruneError(ValueError):
    """A pruning request that cannot be carried out: nothing prunable, bad options (says why)."""


@dataclass
class PruneConfig:
    """What to prune and how.

    Attributes:
        ratio: fraction of channels/heads/neurons to remove per group (``local``: at least this
            fraction, ``floor(n * (1 - ratio))`` kept) or overall (``global``), a number in [0, 1).
        criterion: ``l1``, ``l2``, ``bn_scale`` or ``taylor``.
        scope: ``local`` (per layer) or ``global``.
        round_to: kept channel counts are multiples of this, a positive int (heads are never rounded; the
            input channels of a grouped Conv go by whole conv groups).
        zero_only: remove only channels whose removal is exact (all-zero / constant channels).
        kinds: group kinds to prune (``channels``, ``neurons``, ``heads``, ``hidden``); default all.
        exclude: group names (first source node) to leave whole.
        dim_sizes: sizes for symbolic input dims (analysis and MACs).
        calibration: input feeds (list of dict name → array) for ``taylor``.
    """

    ratio: float = 0.5
    criterion: str = "l2"
    scope: str = "local"
    round_to: int = 1
    zero_only: bool = False
    kinds: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    dim_sizes: dict[str, int] | None = None
    calibration: list | None = field(default=None, repr=False)

    def validate(self) -> "PruneConfig":
        """Raises PruneError / SelectionError for a bad request before any work is done."""
        from graft.compiler.techniques.pruning.importance import CRITERIA

        self.ratio = check_ratio(self.ratio)
        if self.criterion not in CRITERIA:
            raise PruneError(f"unknown pruning criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.scope not in ("local", "global"):
            raise PruneError(f"pruning scope must be 'local' or 'global', got {self.scope!r}")
        try:
            self.round_to = check_round_to(self.round_to)
        except SelectionError as e:
            raise PruneError(str(e)) from None
        bad = [k for k in (self.kinds or ()) if k not in KINDS]
        if bad:
            raise PruneError(f"unknown group kind(s) {bad}; choose from {', '.join(KINDS)}")
        if self.criterion == "taylor" and not self.zero_only and not self.calibration:
            raise PruneError("the taylor criterion needs calibration inputs (PruneConfig.calibration: a list of "
                             "feeds dicts)")
        return self


def as_config(prune, dim_sizes: dict | None = None) -> PruneConfig:
    """A validated :class:`PruneConfig` from a config or a ratio (``compile(prune=0.5)``); the compile's
    ``dim_sizes`` fill in the config's when it has none.

    Raises:
        PruneError / SelectionError: a bad request.
    """
    if not isinstance(prune, PruneConfig):
        prune = PruneConfig(ratio=prune)
    if prune.dim_sizes is None and dim_sizes:
        prune.dim_sizes = dict(dim_sizes)
    return prune.validate()


def attach_report(result, model: Model, torch_module=None) -> None:
    """Put the pruning report on a :class:`graft.compiler.driver.api.CompileResult` (with a transformers model's
    config updates when compiling a torch model)."""
    report = model.meta.get(REPORT_KEY)
    result.prune = report
    cfg = getattr(torch_module, "config", None)
    if report is not None and cfg is not None:
        report.config_updates = transformer_config_updates(report, cfg)


# --------------------------------------------------------------------------- passes
# ops that only re-lay out a tensor: folding them into a parameter would lose its identity
_VIEWS = frozenset({"Transpose", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


def _not_viewing_parameters(node) -> bool:
    return not (node.op_type in _VIEWS and any(
        v is not None and v.meta.get("torch.kind") == "parameter" for v in node.inputs))


def _fold_rule():
    # constant folding as rules/constant_folding.py does it, except views of torch parameters: a
    # Transpose(W) of a linear layer stays, so the pruned W keeps its state_dict key and stays trainable
    # (arithmetic such as weight_orig * weight_mask of torch.nn.utils.prune is folded)
    from graft.rules.constant_folding import fold_constants_rule

    return fold_constants_rule("fold_constants_keep_parameters", also=_not_viewing_parameters)


def prepare(model: Model) -> int:
    """Fold constants so biases behind Reshape / Identity / Cast are constants (shape reads are left alone:
    a ``Shape`` of a channel dim must keep following it at run time)."""
    from graft.compiler.engine.rewriter import Rewriter
    from graft.ir.shapes import infer_shapes
    from graft.rules import cleanup
    from graft.rules.dead_code import eliminate_dead_code

    global _FOLD_KEEPING_PARAMETERS
    if _FOLD_KEEPING_PARAMETERS is None:
        _FOLD_KEEPING_PARAMETERS = _fold_rule()
    infer_shapes(model)
    rules = RuleSet([cleanup.remove_identity, cleanup.remove_dropout, cleanup.remove_noop_cast,
                     _FOLD_KEEPING_PARAMETERS, cleanup.constant_to_initializer], name="prune_prepare")
    n = Rewriter(rules).run(model).rewrites
    return n + eliminate_dead_code(model)


def plan_pass(model: Model, config: PruneConfig) -> int:
    """Analyze, select and store the plan for the removal rules; returns the number of nodes to rewrite.

    Raises:
        PruneError: nothing in the model can be pruned (the message lists why, per group).
    """
    shapes = static_shapes(model, config.dim_sizes)
    before = layer_costs(model, shapes)
    params_before = total_params(model)
    analysis = analyze(model, shapes=shapes)
    groups = [g for g in analysis.prunable_groups if (config.kinds is None or g.kind in config.kinds)
              and g.name not in config.exclude and g.module not in config.exclude]
    if not groups:
        raise PruneError(_nothing_prunable(analysis, config))
    grads = None
    if config.criterion == "taylor" and not config.zero_only:
        from graft.compiler.techniques.pruning.taylor import gradients

        grads = gradients(model, config.calibration)
    choices = select(analysis, config.ratio, criterion=config.criterion, scope=config.scope,
                     round_to=config.round_to, zero_only=config.zero_only, grads=grads, groups=groups)
    plan = build(analysis, choices)
    store(model, plan)
    model.meta[_STATE_KEY] = (analysis, choices, before, params_before, config, input_sizes(model, config.dim_sizes))
    return len(plan.edits)


def _nothing_prunable(analysis: Analysis, config: PruneConfig) -> str:
    if not analysis.groups:
        return ("nothing to prune: the model has no Conv, Gemm, MatMul or embedding with constant weights whose "
                "output channels could shrink" + _why_no_constant_weights(analysis.model))
    lines = []
    for g in analysis.groups[:6]:
        why = g.reason or (f"kind {g.kind!r} not selected" if config.kinds and g.kind not in config.kinds
                           else "excluded")
        lines.append(f"{g.name} ({g.kind}, {g.size}): {why}")
    more = f"; and {len(analysis.groups) - 6} more" if len(analysis.groups) > 6 else ""
    return "nothing to prune: no channel group can shrink — " + "; ".join(lines) + more


def _why_no_constant_weights(model: Model) -> str:
    """Where the first Conv / Gemm / MatMul gets a weight that is not a constant, and what to do."""
    for n in model.graph:
        w = n.inputs[1] if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.inputs) > 1 else None
        if w is None or w.constant() is not None:
            continue
        where = f"{n.op_type} node {n.name!r}" if n.name else f"the {n.op_type} writing {n.outputs[0].name!r}"
        if w.graph is not None and w in w.graph.inputs:  # an input, with or without an initializer
            return (f" ({where} reads its weight from graph input {w.name!r}, which can be overridden at run time; "
                    f"remove the initializers from the graph inputs (ONNX IR version 4 and later does not need "
                    f"them there))")
        p = w.producer
        if p is not None and p.op_type in ("DequantizeLinear", "QuantizeLinear"):
            return f" ({where} reads a quantized weight through {p.op_type}: prune the float model, then quantize)"
        if p is not None:
            return f" (e.g. {where} reads its weight from a {p.op_type} op that is not constant)"
    return ""


def finish(model: Model) -> int:
    """Check every planned node was rewritten, restore node/value names, re-infer shapes, store the report."""
    plan = model.meta.pop(PLAN_KEY, None)
    state = model.meta.pop(_STATE_KEY, None)
    if plan is None or state is None:
        return 0
    analysis, choices, before, params_before, config, inputs = state
    alive = set(model.graph)
    left = [n for n in plan.edits if n in alive]
    if left:
        raise PruneError(f"the removal rules did not rewrite {len(left)} planned node(s), e.g. {left[0].op_type} "
                         f"{left[0].name!r}; the model is inconsistent (please report this with the model)")
    _restore_names(model)
    _reset_shapes(model)
    from graft.ir.verifier import problems

    broken = problems(model)
    if broken:
        raise PruneError(f"pruning left the model inconsistent: {broken[0]} (please report this with the model)")
    after = layer_costs(model, static_shapes(model, config.dim_sizes))
    rows = []
    chosen = {ch.group.id: ch for ch in choices}
    for g in analysis.groups:
        ch = chosen.get(g.id)
        removed = ch.remove if ch else []
        note = ch.note if ch else (g.reason or ("not selected" if g.prunable else ""))
        rows.append(GroupRow(g.name, g.kind, g.size, g.block, len(removed), ch.requested if ch else 0.0,
                             len(g.blocked), sum(1 for c in removed if g.exact.get(c)), note, g.module))
    report = PruneReport(config.criterion, config.scope, config.ratio, config.round_to, config.zero_only, rows,
                         before, after, params_before, total_params(model), inputs)
    report.config_updates = _uniform_counts(rows)
    model.meta[REPORT_KEY] = report
    return sum(r.removed for r in rows)


def _uniform_counts(rows: list[GroupRow]) -> dict:
    out = {}
    heads = {r.kept for r in rows if r.kind == "heads" and r.removed}
    if heads and len(heads) == 1 and all(r.kept in heads for r in rows if r.kind == "heads"):
        out["num_attention_heads"] = heads.pop()
    hidden = [r for r in rows if r.kind == "hidden" and r.removed]
    if len(hidden) == 1:
        out["hidden_size"] = hidden[0].kept
    return out


def _restore_names(model: Model) -> None:
    """Pruned nodes and their outputs take back the names of what they replaced (diffs then match them)."""
    from graft.compiler.engine.rewriter import PROVENANCE_REPLACED, PROVENANCE_RULE

    graph = model.graph
    node_names = {n.name for n in graph}
    value_names = {o.name for n in graph for o in n.outputs} | {v.name for v in graph.inputs} | set(graph.initializers)
    for n in graph:
        if not str(n.meta.get(PROVENANCE_RULE, "")).startswith("prune_"):
            continue
        old = n.meta.get(PROVENANCE_REPLACED, "")
        if old and "," not in old and old not in node_names and n.op_type != "Add":
            node_names.discard(n.name)
            n.name = old
            node_names.add(old)
        for i, v in enumerate(n.inputs):
            want = v.meta.get("graft.pruned_from") if v is not None and v.const is not None else None
            if want and want not in graph.initializers and want not in value_names and v.name in graph.initializers \
                    and v.num_uses == 1:
                del graph.initializers[v.name]
                value_names.discard(v.name)
                v.name = want
                graph.initializers[want] = v
                value_names.add(want)
        for o in n.outputs:
            want = o.meta.get("graft.replaces")
            if want and want not in value_names and not o.is_graph_output():
                value_names.discard(o.name)
                o.name = want
                value_names.add(want)


def _reset_shapes(model: Model) -> None:
    from graft.ir.shapes import infer_shapes

    for n in model.graph:
        for o in n.outputs:
            if not o.is_graph_output():
                o.shape = None
                o.type_proto = None
                o.meta.pop("_typed_as", None)
    model.graph.value_info = {}
    infer_shapes(model)


def prune_pipeline(config: PruneConfig) -> Pipeline:
    """The pruning stage: prepare → plan → removal rules (``rules/prune.py``) → finish."""
    from graft.rules import prune as prune_rules

    config.validate()
    return Pipeline("prune", [
        FunctionPass(prepare, "prune_prepare"),
        FunctionPass(lambda m: plan_pass(m, config), "prune_plan", analysis=True),
        RewritePass(RuleSet(prune_rules.RULES, name="prune"), "prune_rules"),
        FunctionPass(finish, "prune_finish"),
    ], doc="fold constants → channel groups + selection → removal rules → report")


def prune(model: Model, config: PruneConfig | None = None, *, check: bool = False, **kw) -> PruneReport:
    """Prune ``model`` in place and return the report.

    Args:
        model: an IR model with ONNX ops.
        config: a :class:`PruneConfig`; keyword arguments build one (``prune(m, ratio=0.5)``).
        check: check the result with ``onnx.checker`` (full_check), run the original and pruned
            model in onnxruntime on the same generated inputs and record the output deviation.

    Raises:
        PruneError / SelectionError: bad request, or nothing prunable.
        graft.compiler.techniques.pruning.plan.PlanError: an internal inconsistency.
    """
    from graft import ir

    config = config or PruneConfig(**kw)
    reference = ir.to_onnx(model) if check else None
    prune_pipeline(config)(model)
    report = model.meta[REPORT_KEY]
    if check:
        import onnx

        out = ir.to_onnx(model)
        onnx.checker.check_model(out, full_check=True)
        report.deviation = deviation(reference, out, config.dim_sizes)
    return report


def deviation(reference, pruned, dim_sizes: dict | None = None, seed: int = 0) -> list:
    """Output agreement of ``pruned`` with ``reference`` (ONNX protos) on generated inputs, in onnxruntime."""
    from graft.compiler.techniques import numeric

    sizes, default = numeric.default_dim_sizes(reference, dim_sizes)
    feeds = numeric.make_inputs(reference, seed=seed, dim_sizes=sizes, default_dim=default)
    ra, rb = numeric.run(reference, feeds), numeric.run(pruned, feeds)
    return [numeric.agreement(ra[k], rb.get(k, np.array(np.nan)), k) for k in ra]
