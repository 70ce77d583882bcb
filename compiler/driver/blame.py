"""Which rule broke the numbers, or the graph: blame from provenance.

Numeric blame. Every node a rule creates carries ``node.meta["graft.rule"]``,
and the value that takes the place of an original one carries
``value.meta["graft.replaces"]`` (the original value's name). So each such value
has a counterpart in the input model that it must equal. Both models run once
in onnxruntime with those values (and every value whose name both models share)
exposed as extra graph outputs; walking the compiled graph in topological
order, the first value that disagrees names the culprit:

- a rule-created value → its rule and node;
- an original value → one of its inputs was redirected by a rule that created
  no node (e.g. ``Mul(x, c) → x``); the rewrite log (which nodes each rewrite
  replaced) names that rule.

Structural blame. Checker and verifier messages name nodes and values; the
rule-created ones among them name their rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx

from graft.compiler.techniques import numeric
from graft.compiler.engine.rewriter import PROVENANCE_REPLACED, PROVENANCE_RULE

REPLACES = "graft.replaces"


@dataclass
class Blame:
    """The first value of the compiled model that disagrees with its counterpart in the input model.

    Attributes:
        rule: the rule held responsible (None when no rewrite could be tied to it).
        node: the compiled-model node that produced ``value`` (rule-created, or the first
            original node reading a redirected input).
        op_type: that node's op type.
        value: the diverging value's name in the compiled model.
        original: the name of the input-model value it should equal.
        replaced: names of the input-model nodes the rule replaced.
        max_abs, max_rel, cosine: agreement between the two values; ``inf`` when shapes differ.
        shapes: (compiled shape, original shape).
        compared: number of intermediate values compared.
        subgraph_rules: when ``node`` is an If/Loop/Scan that no rule created but whose
            subgraphs rules rewrote, those rules (``rule`` is set when there is one).
    """

    rule: str | None
    node: str
    op_type: str
    value: str
    original: str
    replaced: str
    max_abs: float
    max_rel: float
    cosine: float
    shapes: tuple
    compared: int
    subgraph_rules: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.shapes[0] != self.shapes[1]:
            diff = f"has shape {list(self.shapes[0])} instead of {list(self.shapes[1])}"
        else:
            diff = f"differs by max abs {self.max_abs:.3g} (max rel {self.max_rel:.3g}, cosine {self.cosine:.6f})"
        node = f"{self.op_type} node {self.node!r}" if self.node else f"an unnamed {self.op_type} node"
        if self.subgraph_rules:
            who = (f"rule {self.subgraph_rules[0]!r}" if len(self.subgraph_rules) == 1 else
                   "one of the rules " + ", ".join(repr(r) for r in self.subgraph_rules))
            return (f"{who}, which rewrote the subgraph(s) of {node}, is the likely cause: that node is the first "
                    f"to diverge (its value {self.value!r} should equal {self.original!r} of the input model but "
                    f"{diff}; values inside subgraphs cannot be compared one by one)")
        who = f"rule {self.rule!r}" if self.rule else "no recorded rule"
        return (f"{who} is the first to diverge: value {self.value!r} of {node} "
                f"should equal {self.original!r} of the input model but {diff}"
                + (f"; the rule replaced {self.replaced}" if self.replaced else ""))


def _close(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> bool:
    if np.shape(a) != np.shape(b):
        return False
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    return bool(np.allclose(a64, b64, atol=atol, rtol=rtol, equal_nan=True))


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs ``names`` (untyped: onnxruntime infers the types)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    have = {o.name for o in out.graph.output}
    for n in names:
        if n not in have:
            out.graph.output.add().name = n
            have.add(n)
    return out


def find_blame(reference: onnx.ModelProto, compiled, compiled_proto: onnx.ModelProto,
               feeds: dict[str, np.ndarray], rewrites=(), *, atol: float = 1e-4, rtol: float = 1e-3) -> Blame | None:
    """The first value of ``compiled`` (an ``ir.Model``) that disagrees with the input model.

    Only the main graph is searched (values inside If/Loop bodies cannot be exposed as outputs).

    Args:
        reference: the input model.
        compiled: the compiled IR model (with provenance metadata).
        compiled_proto: ``ir.to_onnx(compiled)``.
        feeds: the inputs the outputs disagreed on.
        rewrites: :class:`graft.compiler.engine.passes.RewriteRecord` log, for rules that created no node.
        atol, rtol: closeness per element, ``|a - b| <= atol + rtol * |b|``.

    Returns:
        a :class:`Blame`, or None when every intermediate value agrees.
    """
    ref_producer: dict[str, onnx.NodeProto] = {}
    for n in reference.graph.node:
        for o in n.output:
            if o:
                ref_producer[o] = n
    candidates = []  # (value, original name, node, rule-created?)
    for node in compiled.graph:
        created = PROVENANCE_RULE in node.meta
        for o in node.outputs:
            if not o.name:
                continue
            orig = o.meta.get(REPLACES) if created else None
            if orig is not None and orig in ref_producer:
                candidates.append((o, orig, node, True))
            elif not created and o.name in ref_producer:
                candidates.append((o, o.name, node, False))
    if not candidates:
        return None
    ref_run = numeric.run(_with_outputs(reference, sorted({c[1] for c in candidates})), feeds)
    cmp_run = numeric.run(_with_outputs(compiled_proto, [c[0].name for c in candidates]), feeds)
    for value, orig, node, created in candidates:
        a, b = cmp_run.get(value.name), ref_run.get(orig)
        if a is None or b is None or _close(a, b, atol, rtol):
            continue
        ag = numeric.agreement(b, a, value.name)
        rule, replaced = None, ""
        if created:
            rule = node.meta.get(PROVENANCE_RULE)
            replaced = node.meta.get(PROVENANCE_REPLACED, "")
        else:
            rule, replaced = _redirect_culprit(node, orig, ref_producer, rewrites)
        inside: tuple[str, ...] = ()
        if rule is None:  # an If/Loop/Scan whose body a rule rewrote
            inside = _subgraph_rules(node, ref_producer.get(orig), rewrites)
            rule = inside[0] if len(inside) == 1 else None
        return Blame(rule, node.name, node.op_type, value.name, orig, replaced, ag.max_abs, ag.max_rel,
                     ag.cosine, (tuple(np.shape(a)), tuple(np.shape(b))), len(candidates), inside)
    return None


def _subgraph_rules(node, ref_node: onnx.NodeProto | None, rewrites) -> tuple[str, ...]:
    """Rules that rewrote inside ``node``'s subgraphs: by the provenance of the nodes they created
    there, else by the rewrite log naming nodes of the input model's subgraphs."""
    found = {n.meta[PROVENANCE_RULE] for sg in node.subgraphs() for g in sg.all_graphs() for n in g
             if PROVENANCE_RULE in n.meta}
    if ref_node is not None:
        keys = set()
        stack = [ref_node]
        while stack:
            for a in stack.pop().attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                          a.graphs if a.type == onnx.AttributeProto.GRAPHS else []):
                    keys.update(_key(n) for n in g.node)
                    stack.extend(g.node)
        found.update(rec.rule for rec in rewrites if keys.intersection(rec.replaced))
    return tuple(sorted(found))


def _key(node: onnx.NodeProto) -> str:
    """How the rewrite log names an input-model node: its name, else its first output's name."""
    return node.name or (node.output[0] if node.output else "")


def _redirect_culprit(node, value_name, ref_producer, rewrites) -> tuple[str | None, str]:
    """An original value diverges although no rule created it: find the rewrite behind it.

    Either a rewrite removed the value's input-model producer (its name now belongs to
    another node), or one of the producer's inputs was redirected.
    """
    rewrites = list(rewrites)

    def culprit(ref_node):
        k = _key(ref_node)
        for rec in reversed(rewrites):
            if k in rec.replaced:
                return rec.rule, ",".join(rec.replaced)
        return None

    q = ref_producer.get(value_name)
    if q is None:
        return None, ""
    got = culprit(q)
    if got:
        return got
    for i, v in enumerate(node.inputs):
        old = q.input[i] if i < len(q.input) else ""
        if v is None or not old or v.name == old or old not in ref_producer:
            continue
        got = culprit(ref_producer[old])
        if got:
            return got
    return None, ""


def _mentioned(name: str, text: str) -> bool:
    if not name:
        return False
    return re.search(r"(?<![\w./:-])" + re.escape(name) + r"(?![\w./:-])", text) is not None


def rules_in_message(model, message: str) -> list[tuple[str, str]]:
    """(rule, node name) for rule-created nodes of ``model`` whose name or output names ``message`` mentions."""
    out = []
    for node in model.all_nodes():
        rule = node.meta.get(PROVENANCE_RULE)
        if rule is None:
            continue
        if _mentioned(node.name, message) or any(_mentioned(o.name, message) for o in node.outputs):
            out.append((rule, node.name))
    return out


def rules_failing_checker(model, proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(rule, node) for rule-created nodes that ``onnx.checker.check_node`` rejects on their own."""
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = proto.ir_version
    ctx.opset_imports = {o.domain: o.version for o in proto.opset_import}
    lex = onnx.checker.C.LexicalScopeContext()
    by_name = {n.name: n for n in proto.graph.node}
    out = []
    for node in model.graph:
        rule = node.meta.get(PROVENANCE_RULE)
        if rule is None or node.name not in by_name:
            continue
        try:
            onnx.checker.check_node(by_name[node.name], ctx, lex)
        except Exception:  # noqa: BLE001 — any checker complaint counts
            out.append((rule, node.name))
    return out
