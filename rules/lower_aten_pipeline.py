"""The ``lower_aten`` pipeline: rewrite ATen ops captured from torch into ONNX ops.

Lowering is ordinary rewriting: the rules in ``rules/lower_aten_nn.py``,
``lower_aten_math.py``, ``lower_aten_shape.py`` and ``lower_aten_stats.py`` run to a fixed
point like any other rule set, then dead code is dropped. Ops without a lowering (or whose
lowering refused, e.g. training-mode BatchNorm) stay in the ``aten`` domain: the
torch backend still runs them, the ONNX backend refuses the model with
:class:`graft.ir.torch_aten.UnloweredOpError` listing each one and its module.

``compile`` runs this pipeline first for torch input, before the user's pipeline,
so rules written against ONNX ops (BatchNorm folding, fusions) serve torch models too.
The lowered graph imports ONNX opset 18 (:data:`graft.ir.torch_import.ONNX_OPSET`).
"""
from __future__ import annotations

from graft.compiler.engine.passes import FunctionPass, Pipeline, RewritePass
from graft.compiler.engine.rule import RuleSet
from graft.ir import Model
from graft.ir.torch_aten import ATEN_DOMAIN
from graft.rules import lower_aten_math, lower_aten_nn, lower_aten_shape, lower_aten_stats

LOWERING_RULES = [*lower_aten_nn.RULES, *lower_aten_math.RULES, *lower_aten_shape.RULES, *lower_aten_stats.RULES]


def drop_aten_opset(model: Model) -> int:
    """Remove the ``aten`` opset import once no ``aten`` node is left (1 if removed)."""
    if ATEN_DOMAIN in model.opset_imports and not any(n.domain == ATEN_DOMAIN for n in model.all_nodes()):
        del model.opset_imports[ATEN_DOMAIN]
        return 1
    return 0


def _dead_code(model: Model) -> int:
    from graft.rules.dead_code import eliminate_dead_code

    return eliminate_dead_code(model)


def lower_aten() -> Pipeline:
    """ATen → ONNX lowering rules to a fixed point, then dead code."""
    return Pipeline("lower_aten", [
        RewritePass(RuleSet(LOWERING_RULES, name="lower_aten"), "lower_aten_rules"),
        FunctionPass(_dead_code, "dead_code"),
        FunctionPass(drop_aten_opset, "drop_aten_opset"),
    ], doc="lower ATen ops to ONNX ops → dead code")


def lower(model: Model):
    """Run the ``lower_aten`` pipeline on ``model`` in place; returns its :class:`graft.compiler.engine.passes.PassResult`."""
    return lower_aten()(model)


