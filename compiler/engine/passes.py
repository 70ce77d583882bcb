"""Passes and pipelines.

A :class:`Pass` takes an :class:`ir.Model`, changes it in place and returns a
:class:`PassResult` (the onnx-ir convention: ``PassResult(model, modified)``,
plus statistics). Three kinds:

- :class:`RewritePass`: a :class:`compiler.RuleSet` run to a fixed point by
  :class:`compiler.Rewriter`; reports per-rule rewrite counts and the typed
  :class:`compiler.StopReason`.
- :class:`FunctionPass`: a function ``fn(model) -> int`` (an analysis such as
  shape inference, or a sweep such as dead-code elimination) returning how many
  things it changed.
- :class:`Pipeline`: a named sequence of passes, itself a pass, so pipelines
  compose: ``Pipeline("optimize", [cleanup, folds, fusions, cleanup])``.

The registry of named pipelines (``cleanup``, ``optimize``, ``none``) sits one layer
up, next to the rules it runs: :mod:`graft.rules.pipelines`.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from graft.compiler.engine.rewriter import Rewriter, StopReason
from graft.compiler.engine.rule import Rule, RuleSet
from graft.ir import Model


@dataclass
class RewriteRecord:
    """One rewrite: which rule fired in which pass, the nodes it replaced and the nodes it created."""

    pass_name: str
    rule: str
    replaced: tuple[str, ...]
    created: tuple[str, ...]


@dataclass
class PassRecord:
    """What one leaf pass did.

    Attributes:
        name: path of the pass inside its pipelines, e.g. ``optimize/cleanup/cleanup_rules``.
        kind: ``"rewrite"``, ``"function"``, or ``"custom"`` (a Pass subclass that keeps no records).
        seconds: wall time.
        changes: rewrites (RewritePass) or the count the function returned (FunctionPass).
        modified: whether the model changed.
        stop_reason: the rewriter's stop reason (RewritePass only).
        counts: rule name → rewrites (RewritePass only).
    """

    name: str
    kind: str
    seconds: float
    changes: int
    modified: bool
    stop_reason: StopReason | None = None
    counts: Counter = field(default_factory=Counter)


@dataclass
class PassStats:
    """Statistics of a pass or of a whole pipeline.

    Attributes:
        counts: rule name → rewrites, summed over every pass that ran it.
        passes: one :class:`PassRecord` per leaf pass, in execution order.
        rewrites: every rewrite in order (the log numeric blame falls back on).
    """

    counts: Counter = field(default_factory=Counter)
    passes: list[PassRecord] = field(default_factory=list)
    rewrites: list[RewriteRecord] = field(default_factory=list)

    @property
    def stop_reasons(self) -> dict[str, StopReason]:
        """Rewrite-pass path → its :class:`StopReason`."""
        return {p.name: p.stop_reason for p in self.passes if p.stop_reason is not None}

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.passes)

    def extend(self, other: "PassStats", prefix: str) -> None:
        """Append ``other``'s records with their pass names prefixed by ``prefix/``."""
        self.counts.update(other.counts)
        for p in other.passes:
            self.passes.append(PassRecord(f"{prefix}/{p.name}", p.kind, p.seconds, p.changes, p.modified,
                                          p.stop_reason, Counter(p.counts)))
        for r in other.rewrites:
            self.rewrites.append(RewriteRecord(f"{prefix}/{r.pass_name}", r.rule, r.replaced, r.created))


@dataclass
class PassResult:
    """Outcome of a pass: the (same, edited in place) model, whether it changed, and statistics."""

    model: Model
    modified: bool
    stats: PassStats = field(default_factory=PassStats)


class Pass:
    """Base class: a named transformation of an :class:`ir.Model`, edited in place.

    Subclasses implement :meth:`run`; calling the pass runs it.
    """

    name: str = "pass"

    def run(self, model: Model) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} must implement run(model)")

    def __call__(self, model: Model) -> PassResult:
        if not isinstance(model, Model):
            raise TypeError(f"pass {self.name!r} needs an ir.Model, got {type(model).__name__} "
                            f"(convert with ir.from_onnx(proto) or ir.load(path))")
        return self.run(model)

    def describe(self) -> str:
        """One line: the pass name (pipelines list their stages)."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class RewritePass(Pass):
    """Run a rule set to a fixed point.

    Args:
        ruleset: a :class:`RuleSet` or an iterable of :class:`Rule`.
        name: pass name shown in reports.
        max_rewrites: per-graph rewrite limit (default: the rewriter's, 4 × nodes + 1000).

    Raises (when run):
        compiler.RuleError: a rule's check or replacement raised (names the rule and node).
    """

    def __init__(self, ruleset: RuleSet | Iterable[Rule], name: str | None = None, max_rewrites: int | None = None):
        if not isinstance(ruleset, RuleSet):
            ruleset = RuleSet(list(ruleset), name=name or "rules")
        self.ruleset = ruleset
        self.name = name or ruleset.name
        self.max_rewrites = max_rewrites

    def run(self, model: Model) -> PassResult:
        log: list[RewriteRecord] = []
        # Unnamed nodes are known by their first output's name as it was before the pass
        # (a rewrite may rename a graph output), which is how the input model knows them.
        keys = {n: n.outputs[0].name for n in model.all_nodes() if not n.name and n.outputs}

        def record(rule, m, new_nodes):
            log.append(RewriteRecord(self.name, rule.name,
                                     tuple(n.name or keys.get(n) or n.outputs[0].name for n in m.nodes),
                                     tuple(n.name for n in new_nodes)))

        t0 = time.perf_counter()
        res = Rewriter(self.ruleset, max_rewrites=self.max_rewrites, on_rewrite=record).run(model)
        rec = PassRecord(self.name, "rewrite", time.perf_counter() - t0, res.rewrites, res.modified,
                         res.stop_reason, Counter(res.counts))
        return PassResult(model, res.modified, PassStats(Counter(res.counts), [rec], log))

    def describe(self) -> str:
        return f"{self.name} ({len(self.ruleset)} rules)"


class FunctionPass(Pass):
    """Wrap ``fn(model) -> int`` (number of changes) as a pass.

    Args:
        fn: edits the model in place and returns how many things it changed.
        name: pass name (default: the function's name).
        analysis: the function only annotates the IR (e.g. shape inference): the pass
            never reports the model as modified; ``changes`` still records fn's count.

    Raises (when run):
        TypeError: ``fn`` returned something other than an int.
    """

    def __init__(self, fn: Callable[[Model], int], name: str | None = None, *, analysis: bool = False):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.analysis = analysis

    def run(self, model: Model) -> PassResult:
        t0 = time.perf_counter()
        n = self.fn(model)
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"pass {self.name!r}: {getattr(self.fn, '__qualname__', self.fn)!r} returned "
                            f"{type(n).__name__}; a FunctionPass function must return the number of changes (int)")
        modified = (n > 0) and not self.analysis
        rec = PassRecord(self.name, "function", time.perf_counter() - t0, n, modified)
        return PassResult(model, modified, PassStats(Counter(), [rec], []))


class Pipeline(Pass):
    """A named sequence of passes (themselves pipelines or leaf passes), run in order.

    Per-rule counts are summed across all passes; each leaf pass keeps its own
    :class:`PassRecord` under a path like ``optimize/cleanup/dead_code`` (a second
    occurrence of the same stage name gets ``#2``).
    """

    def __init__(self, name: str, passes: Iterable[Pass], doc: str = ""):
        self.name = name
        self.passes = list(passes)
        self.doc = doc
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"pipeline {name!r}: {p!r} is not a Pass (wrap rules in RewritePass, "
                                f"functions in FunctionPass)")

    def run(self, model: Model) -> PassResult:
        stats = PassStats()
        modified = False
        seen: Counter = Counter()
        for p in self.passes:
            seen[p.name] += 1
            label = p.name if seen[p.name] == 1 else f"{p.name}#{seen[p.name]}"
            t0 = time.perf_counter()
            r = p(model)
            if not isinstance(r, PassResult):
                raise TypeError(f"pass {p.name!r} returned {type(r).__name__}, not a PassResult")
            modified |= r.modified
            if not r.stats.passes:  # a custom Pass that keeps no records: time it here
                r.stats.passes.append(PassRecord(p.name, "custom", time.perf_counter() - t0, 0, r.modified))
            if label != p.name:
                # records start with the stage's own name: keep repeated stages apart
                for rec in r.stats.passes:
                    if rec.name.startswith(p.name):
                        rec.name = label + rec.name[len(p.name):]
                for rw in r.stats.rewrites:
                    if rw.pass_name.startswith(p.name):
                        rw.pass_name = label + rw.pass_name[len(p.name):]
            stats.extend(r.stats, self.name)
        return PassResult(model, modified, stats)

    def describe(self) -> str:
        return " → ".join(p.name for p in self.passes) or "(no passes)"

    def leaf_passes(self) -> list[Pass]:
        out = []
        for p in self.passes:
            out.extend(p.leaf_passes() if isinstance(p, Pipeline) else [p])
        return out
