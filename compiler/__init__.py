"""graft.compiler: the rewrite engine, the compression techniques and the compile driver.

Writing a rule (the engine's public API, re-exported here)::

    from graft.compiler import op, Var, Const, Attr, Rule, RuleSet, variables

Running rules and compiling::

    from graft.compiler import rewrite, compile
    result = rewrite(model, [my_rule])          # in place, to a fixed point
    out = compile("model.onnx", pipeline="optimize")

Sub-packages, one per layer (``ARCHITECTURE.md`` has the map):
:mod:`graft.compiler.engine` → :mod:`graft.rules` → :mod:`graft.compiler.techniques`
→ :mod:`graft.compiler.driver`.
"""
from importlib import import_module

from graft.compiler.engine import (PROVENANCE_REPLACED, PROVENANCE_RULE, Attr, Const, Failure, FunctionPass, Match,
                                   Pass, PassResult, PatternError, Pipeline, RewritePass, RewriteResult, Rewriter,
                                   Rule, RuleDefinitionError, RuleError, RuleSet, StopReason, Var, explain, op,
                                   rewrite, variables)

# Names from the layers above the engine, loaded on first use: the driver pulls in the rules,
# the techniques and onnxruntime, and importing graft.compiler.engine (as every rule does) runs
# this file first, so an eager import here would be circular at run time.
_LAZY = {
    "compile": "graft.compiler.driver.api",
    "CompileResult": "graft.compiler.driver.api",
    "get_pipeline": "graft.rules.pipelines",
    "register_pipeline": "graft.rules.pipelines",
    "unregister_pipeline": "graft.rules.pipelines",
    "pipeline_names": "graft.rules.pipelines",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'graft.compiler' has no attribute {name!r}")


__all__ = ["Attr", "Const", "Failure", "FunctionPass", "Match", "Pass", "PassResult", "PatternError", "Pipeline",
           "PROVENANCE_REPLACED", "PROVENANCE_RULE", "RewritePass", "RewriteResult", "Rewriter", "Rule",
           "RuleDefinitionError", "RuleError", "RuleSet", "StopReason", "explain", "op", "rewrite", "variables",
           *_LAZY]
