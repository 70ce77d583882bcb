"""graft's named pipelines and their registry (:func:`register_pipeline`, :func:`get_pipeline`).

- ``cleanup``: shape inference → cleanup rules + constant folding (one rule set,
  to a fixed point) → dead-code elimination.
- ``optimize``: cleanup → BatchNormalization folding → op fusion → cleanup again
  (folds and fusions leave Identity/Reshape chains and constants to tidy; its shape
  inference is skipped when the rewrites left every value typed with a static shape).
- ``fuse_ort``: for onnxruntime: cleanup → transformer fusions into ``com.microsoft`` ops
  (MultiHeadAttention / Attention, Gelu / FastGelu / BiasGelu / QuickGelu; decomposed layer norms
  into LayerNormalization-17) → the ``optimize`` folds. ``optimize`` never emits ``com.microsoft``
  ops; ``fuse_ort_skiplayernorm`` adds SkipLayerNormalization.

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


def forget_inferred_symbols(model) -> int:
    """Make unknown the symbolic dims shape inference gave to values the input model left untyped
    (``graft.compiler.compile`` calls it on every ONNX output, after all passes).

    Why: ``unk__7``-style symbols written into the output's value_info tell onnxruntime two tensors
    have the same shape, which its session optimizer needs to fuse SkipLayerNormalization — a kernel
    that is slower than Add + LayerNormalization on a CPU at one thread (all-MiniLM-L6-v2: +9%,
    bench/bench_fusions.py). The output then carries no more shape facts than the input did; static
    dims and the dims of values the input annotated are kept. Returns the number of values changed.
    """
    changed = 0
    for g in model.all_graphs():
        annotated = g.value_info
        for node in g:
            for o in node.outputs:
                shape = o.shape
                if shape is None or o.name in annotated or o.is_graph_output() or \
                        not any(isinstance(d, str) for d in shape):
                    continue
                o.shape = tuple(None if isinstance(d, str) else d for d in shape)
                changed += 1
    return changed


def fuse_ort(*, skip_layernorm: bool = False) -> Pipeline:
    """optimize, plus transformer fusions into onnxruntime's com.microsoft ops (attention, GELU, LayerNorm)."""
    from graft.rules import cleanup as cleanup_rules
    from graft.rules import fold_batchnorm, fuse, fuse_attention, fuse_bias, fuse_gelu, fuse_layernorm
    from graft.ir.shapes import infer_shapes
    from graft.rules.fuse_facts import import_contrib_domain

    folds = RuleSet([*fuse_bias.RULES, *fold_batchnorm.RULES], name="fold_batchnorm")
    fusions = [*fuse_layernorm.LAYERNORM_RULES, *fuse_gelu.RULES, *fuse_attention.FUSE_RULES]
    if skip_layernorm:
        fusions += fuse_layernorm.ORT_RULES
    return Pipeline("fuse_ort" + ("_skiplayernorm" if skip_layernorm else ""), [
        cleanup(),
        # again on the folded graph: shapes computed by ops constant folding has just removed
        # (static exports' Expand targets) become static, which the fusions' dim proofs read
        FunctionPass(infer_shapes, "infer_shapes", analysis=True),
        # K's transpose written through a 3-D view, then composed with its split-heads Transpose
        RewritePass(RuleSet([*fuse_attention.NORMALIZE_RULES, *cleanup_rules.RULES], name="normalize"),
                    "normalize_attention"),
        RewritePass(RuleSet(fusions, name="fuse_transformer"), "fuse_transformer"),
        RewritePass(RuleSet(fuse_attention.PACK_RULES, name="pack_attention"), "pack_attention"),
        FunctionPass(import_contrib_domain, "import_contrib_domain"),
        RewritePass(folds, "fold_batchnorm"),
        RewritePass(RuleSet(fuse.RULES, name="fuse"), "fuse"),
        cleanup(retype=True),
    ], doc="cleanup → transformer fusions (com.microsoft) → fold BatchNormalization → fuse → cleanup")


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
register_pipeline("fuse_ort", fuse_ort, fuse_ort.__doc__)
register_pipeline("fuse_ort_skiplayernorm", lambda: fuse_ort(skip_layernorm=True),
                  "fuse_ort plus Add + LayerNormalization -> com.microsoft SkipLayerNormalization")
