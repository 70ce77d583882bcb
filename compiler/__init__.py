"""graft compiler: the pattern language, rules, the rewriter, passes and pipelines.

Public rule API (what a rule file imports)::

    from compiler import op, Var, Const, Attr, Rule, RuleSet, variables

Running rules::

    from compiler import rewrite, compile
    result = rewrite(model, [my_rule])          # in place, to a fixed point
    out = compile("model.onnx", pipeline="optimize")
"""
from compiler.match import Failure, Match
from compiler.pattern import Attr, Const, PatternError, Var, op, variables
from compiler.rewriter import (PROVENANCE_REPLACED, PROVENANCE_RULE, RewriteResult, Rewriter, RuleError,
                               StopReason, explain, rewrite)
from compiler.rule import Rule, RuleDefinitionError, RuleSet


def __getattr__(name):
    # the pipeline/compile layer pulls in rules/ and onnxruntime: load on first use
    if name in ("compile", "CompileResult"):
        import compiler.api as _api
        return getattr(_api, name)
    if name in ("Pass", "PassResult", "Pipeline", "RewritePass", "FunctionPass", "get_pipeline",
                "register_pipeline", "pipeline_names"):
        import compiler.passes as _p
        return getattr(_p, name)
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")


__all__ = ["Attr", "Const", "Failure", "Match", "PatternError", "Rule", "RuleDefinitionError", "RuleError",
           "RuleSet", "Rewriter", "RewriteResult", "StopReason", "Var", "explain", "op", "rewrite", "variables",
           "compile", "PROVENANCE_RULE", "PROVENANCE_REPLACED"]
