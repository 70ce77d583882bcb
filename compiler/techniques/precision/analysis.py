"""The per-node decision: which float32 nodes run in float16/bfloat16, and why the others do not.

Nodes are decided in graph order (a producer before its readers; enclosing graphs before their
If/Loop bodies). For each node with float32 tensors, the first reason that applies keeps it in
float32, else it moves to the target type:

1. ``overflowed in fp16 ...``: a previous round of conversion produced inf/NaN outputs traced
   back to this node (:mod:`graft.compiler.techniques.precision.driver`);
2. ``user block list``: the caller's ``exclude`` names it (node name, op type or name glob);
3. the schema says no (:mod:`~graft.compiler.techniques.precision.support`): ``op not supported in
   fp16``, control flow, no schema, an output type set by an attribute;
4. a node that computes no float values of its own (Reshape, Gather, Where, Shape, ...) follows
   its float input: it stays float32 when that input does, so it never costs a Cast;
5. ``range exceeds fp16``: a float input or output measured in float32 beyond the target's largest
   finite value divided by ``headroom`` (default 4: float16 16376), or a constant input beyond the
   range that may not saturate (:mod:`~graft.compiler.techniques.precision.ranges`);
6. ``reduction over N elements``: a normalization/reduction/softmax whose measured error in the
   target type exceeds the tolerance (:mod:`~graft.compiler.techniques.precision.reductions`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from graft import ir
from graft.ir.dtypes import DataType
from graft.rules.precision import SHORT_NAMES, PrecisionPlan, limits, node_key
from graft.compiler.techniques.precision import reductions
from graft.compiler.techniques.precision.ranges import Measurements
from graft.compiler.techniques.precision.support import domain_opset, node_support


@dataclass
class Decision:
    """One float node's outcome: ``converted`` or ``kept`` (with ``reason``); ``graph`` is its graph's name."""

    node: str
    op_type: str
    graph: str
    converted: bool
    reason: str = ""


@dataclass
class Analysis:
    """The plan and what led to it.

    Attributes:
        plan: the :class:`~graft.rules.precision.PrecisionPlan` the rules apply.
        decisions: one per float node, in graph order.
        needs_opset: ``Op-version`` → first opset allowing the type, for ops kept only because of the opset.
        denormals: constant name → (values that become subnormal, values that become 0, elements), for
            the constants converted nodes read.
        reductions: the measured errors of normalization/reduction nodes.
        unmeasured: converted nodes whose tensors had no measured range (inside subgraphs, no data).
        saturated: the out-of-range constants converted nodes read (saturated to the type's largest value).
    """

    plan: PrecisionPlan
    decisions: list[Decision] = field(default_factory=list)
    needs_opset: dict[str, int] = field(default_factory=dict)
    denormals: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    reductions: list[reductions.ReductionError] = field(default_factory=list)
    unmeasured: int = 0
    saturated: set[str] = field(default_factory=set)

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if not d.converted]

    @property
    def converted(self) -> list[Decision]:
        return [d for d in self.decisions if d.converted]


def _blocked(node: ir.Node, exclude) -> str | None:
    for pat in exclude or ():
        if pat == node.name or pat == node.op_type or (node.name and fnmatch.fnmatchcase(node.name, pat)):
            return pat
    return None


def _finite_absmax(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    fin = np.isfinite(a)
    return float(np.abs(a[fin]).max()) if fin.any() else 0.0


def analyse(model: ir.Model, target: DataType, meas: Measurements | None, *, exclude=None, headroom: float = 4.0,
            reduction_tolerance: float | None = None, keep_io_types: bool = True,
            force_keep: dict[str, str] | None = None) -> Analysis:
    """Decide every float node of ``model`` (float32, types inferred); see the module doc.

    Args:
        meas: measured ranges and captured inputs, or None (schema-only decisions).
        exclude: node names, op types or name globs kept in float32.
        headroom: a tensor may reach the type's largest finite value divided by this.
        reduction_tolerance: largest accepted error of a reduction node (default 16 roundoffs).
        keep_io_types: graph inputs stay float32 (else they arrive in the target type).
        force_keep: node key → reason, from earlier rounds.
    """
    lim = limits(target)
    safe = lim.max / headroom
    tol = reduction_tolerance if reduction_tolerance is not None else reductions.ROUNDOFFS * lim.eps
    short = SHORT_NAMES[target]
    plan = PrecisionPlan(target, saturate=set(meas.saturated) if meas is not None else set())
    out = Analysis(plan)
    force_keep = force_keep or {}
    low: set[ir.Value] = set()
    if not keep_io_types:
        low.update(v for v in model.graph.inputs if v.dtype == DataType.FLOAT and v.const is None)
    for g in model.all_graphs():
        gname = "main" if g is model.graph else g.name
        for node in g:
            sup = node_support(node, model, target)
            if sup is None:
                continue
            key = node_key(node)
            reason = force_keep.get(key)
            if reason is None:
                pat = _blocked(node, exclude)
                if pat is not None:
                    reason = "user block list" + (f" ({pat!r})" if pat not in (node.name, key) else "")
            if reason is None and sup.kind == "keep":
                reason = sup.reason
                if sup.needs_opset is not None:
                    out.needs_opset[f"{node.op_type}"] = max(out.needs_opset.get(node.op_type, 0), sup.needs_opset)
            if reason is None and sup.kind == "follow":
                runtime = [node.inputs[i] for i in sup.float_inputs if node.inputs[i].constant() is None]
                if runtime and not any(v in low for v in runtime):
                    reason = f"follows its float32 input {runtime[0].name!r} (computes no float values of its own)"
            if reason is None and sup.kind == "convert":
                reason = _range_reason(node, sup, meas, plan, lim.max, safe, headroom, short)
                if reason is None and meas is not None and reductions.is_reduction(node):
                    reason = _reduction_reason(node, sup, meas, model, target, tol, short, out, low)
                if meas is None or any(o.name not in meas.absmax for o, c in zip(node.outputs, sup.conversion.outputs)
                                       if c and o.name):
                    out.unmeasured += reason is None
            if reason is not None:
                out.decisions.append(Decision(key, node.op_type, gname, False, reason))
                continue
            plan.convert[key] = sup.conversion
            out.decisions.append(Decision(key, node.op_type, gname, True))
            for o, c in zip(node.outputs, sup.conversion.outputs):
                if c:
                    low.add(o)
            _count_denormals(node, sup, lim, out)
    return out


def _range_reason(node, sup, meas, plan, max_finite, safe, headroom, short) -> str | None:
    values = [node.inputs[i] for i in sup.float_inputs] + \
             [o for o, c in zip(node.outputs, sup.conversion.outputs) if c]
    for v in values:
        c = v.constant() if v.producer is None or v.producer.op_type == "Constant" else None
        if c is not None:
            big = _finite_absmax(c)
            if big > max_finite and v.name not in plan.saturate:
                why = ""
                if meas is not None and v.name in meas.unsaturable:
                    why = f"; {meas.unsaturable[v.name][1]}"
                return f"range exceeds {short} (max |x| = {big:.3g} in constant {v.name!r}{why})"
            continue
        if meas is None:
            continue
        m = meas.absmax.get(v.name)
        if m is not None and m > safe:
            return (f"range exceeds {short} (max |x| = {m:.3g} at {v.name!r}, measured in float32; "
                    f"limit {safe:.3g} = {max_finite:.6g}/{headroom:g})")
    return None


def _reduction_reason(node, sup, meas, model, target, tol, short, out: Analysis, low) -> str | None:
    rows = []
    k = 0
    while True:
        row = []
        for v in node.inputs:
            if v is None:
                row.append(None)
                continue
            c = v.constant()
            if c is not None:
                row.append(c)
                continue
            got = meas.captures.get(v.name)
            if got is None or len(got) <= k:
                row = None
                break
            row.append(got[k])
        if row is None:
            break
        rows.append(row)
        k += 1
    if not rows:
        return None
    opset = domain_opset(model, node.domain)
    rounded = tuple(v is not None and c and (v in low or v.constant() is not None)
                    for v, c in zip(node.inputs, sup.conversion.inputs))
    err = reductions.measure_error(node, rows, sup.conversion, target, opset, rounded)
    if err is None:
        return None
    n = reductions.reduced_elements(node, opset, tuple(np.shape(rows[0][0])))
    out.reductions.append(reductions.ReductionError(node_key(node), node.op_type, n or 0, err))
    if err > tol:
        what = f"{n} elements" if n else "its input"
        return f"reduction over {what} (measured error {err:.2g} in {short} > {tol:.2g})"
    return None


def _count_denormals(node, sup, lim, out: Analysis) -> None:
    for i in sup.float_inputs:
        v = node.inputs[i]
        if v is None or v.name in out.denormals:
            continue
        c = v.constant()
        if c is None or c.dtype.kind != "f":
            continue
        if v.name in out.plan.saturate:
            out.saturated.add(v.name)
        a = np.abs(np.asarray(c, dtype=np.float64))
        nz = (a > 0) & np.isfinite(a)
        sub = int(np.count_nonzero(nz & (a < lim.tiny)))
        if sub:
            zero = int(np.count_nonzero(nz & (a <= lim.smallest_subnormal / 2)))  # ties round to even: 0
            out.denormals[v.name] = (sub - zero, zero, int(a.size))
