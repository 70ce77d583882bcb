"""The rewrite engine: the pattern language, matches, rules, the rewriter and passes.

This is the public API a rule is written against (the built-in rules in
:mod:`graft.rules` import only from here and from :mod:`graft.ir`)::

    from graft.compiler.engine import Const, Rule, Var, op

The engine imports nothing above it: no rule, technique or driver module.
"""
from graft.compiler.engine.match import Failure, Match
from graft.compiler.engine.passes import FunctionPass, Pass, PassResult, Pipeline, RewritePass
from graft.compiler.engine.pattern import Attr, Const, PatternError, Var, op, variables
from graft.compiler.engine.rewriter import (PROVENANCE_REPLACED, PROVENANCE_RULE, RewriteResult, Rewriter, RuleError,
                                            StopReason, explain, rewrite)
from graft.compiler.engine.rule import Rule, RuleDefinitionError, RuleSet

__all__ = ["Attr", "Const", "Failure", "FunctionPass", "Match", "Pass", "PassResult", "PatternError", "Pipeline",
           "PROVENANCE_REPLACED", "PROVENANCE_RULE", "RewritePass", "RewriteResult", "Rewriter", "Rule",
           "RuleDefinitionError", "RuleError", "RuleSet", "StopReason", "explain", "op", "rewrite", "variables"]
