"""graft's named pipelines and their registry (:func:`register_pipeline`, :func:`get_pipeline`).

- ``cleanup``: shape inference → cleanup rules + constant folding (one rule set,
  to a fixed point) → dead-code elimination.
- ``optimize``: cleanup → BatchNormalization folding → op fusion → cleanup again
  (folds and fusions leave Identity/Reshape chains and constants to tidy; its shape
  inference is skipped when the rewrites left every value typed with a static shape).

:func:`with_user_rules` appends a user :class:`compiler.RuleSet` (e.g. from
``graft compile --rules my_rules.py``) to a pipeline as its own pass.
"""
from __future__ import annotations

from typing import Callable, Iterable

from graft.compiler.engine.passes import FunctionPass, Pipeline, RewritePass
from graft.compiler.engine.rule import Rule, RuleDefinitionError, RuleSet


# --------------------------------------------------------------------------- registry
# Named pipelines: the CLI's --pipeline, compile(pipeline=...). A factory is called on each
# lookup, so every run gets fresh passes.
_REGISTRY: dict[str, tuple[Callable[[], Pipeline], str]] = {}


def register_pipeline(name: str, factory: Callable[[], Pipeline], doc: str = "", *, replace: bool = False) -> None:
    """Register ``factory`` (called on each lookup, so every run gets fresh passes) under ``name``.

    Raises:
        ValueError: ``name`` is taken and ``replace`` is false.
    """
    if not callable(factory):
        raise TypeError(f"pipeline {name!r}: factory must be a callable returning a Pipeline")
    if name in _REGISTRY and not replace:
        raise ValueError(f"pipeline {name!r} is already registered (pass replace=True to override)")
    _REGISTRY[name] = (factory, doc.strip().splitlines()[0] if doc.strip() else "")


def unregister_pipeline(name: str) -> None:
    """Remove ``name`` from the registry (no error if absent)."""
    _REGISTRY.pop(name, None)


def get_pipeline(name: str) -> Pipeline:
    """A fresh :class:`Pipeline` for registered ``name``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        raise KeyError(f"no pipeline named {name!r}; known pipelines: {', '.join(pipeline_names())}")
    p = _REGISTRY[name][0]()
    if not isinstance(p, Pipeline):
        raise TypeError(f"pipeline factory for {name!r} returned {type(p).__name__}, not a Pipeline")
    return p


def pipeline_names() -> list[str]:
    """Registered pipeline names, sorted."""
    return sorted(_REGISTRY)


def pipeline_doc(name: str) -> str:
    """The one-line description given at registration ('' if none)."""
    return _REGISTRY[name][1] if name in _REGISTRY else ""


register_pipeline("none", lambda: Pipeline("none", []), "no passes (with --rules: only the user's rules run)")


def cleanup(*, retype: bool = False) -> Pipeline:
    """Shape inference, then cleanup + constant-folding rules to a fixed point, then dead code.

    ``retype=True`` (a cleanup after other passes) skips inference when every value already
    has a dtype and a static shape (:func:`graft.ir.shapes.infer_missing_shapes`).
    """
    from graft.ir.shapes import infer_missing_shapes, infer_shapes
    from graft.rules import cleanup as cleanup_rules
    from graft.rules import constant_folding
    from graft.rules.dead_code import eliminate_dead_code

    rules = RuleSet([*cleanup_rules.RULES, *constant_folding.RULES], name="cleanup_rules")
    return Pipeline("cleanup", [
        FunctionPass(infer_missing_shapes if retype else infer_shapes, "infer_shapes", analysis=True),
        RewritePass(rules, "cleanup_rules"),
        FunctionPass(eliminate_dead_code, "dead_code"),
    ], doc="shape inference → cleanup + constant folding → dead code")


def optimize() -> Pipeline:
    """cleanup → fold BatchNormalization → fuse ops → cleanup."""
    from graft.rules import fold_batchnorm, fuse, fuse_bias

    # bias Adds fold into Conv/ConvTranspose in the same pass, so a BN after them folds too
    folds = RuleSet([*fuse_bias.RULES, *fold_batchnorm.RULES], name="fold_batchnorm")
    return Pipeline("optimize", [
        cleanup(),
        RewritePass(folds, "fold_batchnorm"),
        RewritePass(RuleSet(fuse.RULES, name="fuse"), "fuse"),
        cleanup(retype=True),
    ], doc="cleanup → fold BatchNormalization → fuse → cleanup")


def with_user_rules(pipeline: str | Pipeline | None, rules: Rule | RuleSet | Iterable[Rule] | None,
                    name: str = "user_rules") -> Pipeline:
    """``pipeline`` (a name, a Pipeline, or None/"none" for nothing) followed by ``rules`` as one pass.

    Raises:
        KeyError: unknown pipeline name.
        compiler.RuleDefinitionError: two user rules share a name, or a user rule has the name of
            another rule of the pipeline.
    """
    if pipeline is None:
        pipeline = "none"
    base = get_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    if rules is None:
        return base
    if isinstance(rules, Rule):
        rules = [rules]
    ruleset = rules if isinstance(rules, RuleSet) else RuleSet(list(rules), name=name)
    if len(ruleset) == 0:
        return base
    # reports, provenance and `graft diff` know rules by name: another rule under a pipeline
    # rule's name would have its rewrites counted as that rule's
    taken = {r.name: r for p in base.leaf_passes() if isinstance(p, RewritePass) for r in p.ruleset}
    for r in ruleset:
        if r.name in taken and taken[r.name] is not r:
            raise RuleDefinitionError(f"rule {r.name!r} ({r.where}) has the name of a rule of pipeline "
                                      f"{base.name!r} ({taken[r.name].where})")
    return Pipeline(base.name, [*base.passes, RewritePass(ruleset, name)], doc=base.doc)


def lower_aten() -> Pipeline:
    """ATen → ONNX lowering rules to a fixed point, then dead code (runs first for torch input)."""
    # imported on use: 200+ lowering rules are not needed to compile an ONNX file
    from graft.rules.lower_aten_pipeline import lower_aten as build

    return build()


register_pipeline("lower_aten", lower_aten, lower_aten.__doc__)
register_pipeline("cleanup", cleanup, cleanup.__doc__)
register_pipeline("optimize", optimize, optimize.__doc__)
