"""The rewriter: apply a :class:`RuleSet` with a worklist until nothing matches.

Per node popped from the worklist, only the rules indexed under its op type are
tried (plus wildcard rules). A successful rewrite

1. builds the replacement off-graph (so a refused or failing rewrite leaves the
   graph untouched),
2. refuses if a matched non-root node's output escapes the match,
3. inserts the new nodes before the root, records provenance on each
   (``graft.rule``, ``graft.replaced``), redirects the root outputs' readers,
4. deletes the matched nodes and any producer left without readers,
5. queues the new nodes and the readers of their outputs.

It stops when the worklist is empty (:attr:`StopReason.SATURATED`) or after
``max_rewrites`` (:attr:`StopReason.ITERATION_LIMIT`). Iteration order is the
graph's node order and rules' registration order, so the output is the same
for the same input whatever ``PYTHONHASHSEED`` is.
"""
from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from graft.compiler.engine.match import Failure, Match, Matcher, Miss
from graft.compiler.engine.pattern import check_op_name, caller_location
from graft.compiler.engine.rule import Rule, RuleSet
from graft.ir import Graph, Model, Node, Tensor, Value, gc_paused
from graft.ir.dtypes import DataType


class StopReason(enum.Enum):
    SATURATED = "saturated"           # no rule matches anywhere
    ITERATION_LIMIT = "iteration_limit"  # max_rewrites reached; the graph is valid but may not be final


class RuleError(RuntimeError):
    """A rule raised, or returned something that is not a replacement. Names the rule and node."""


@dataclass
class RewriteResult:
    """What a rewrite run did.

    Attributes:
        modified: any rewrite happened.
        stop_reason: why the worklist stopped.
        counts: rule name → number of rewrites.
        rewrites: total rewrites.
    """

    modified: bool
    stop_reason: StopReason
    counts: Counter = field(default_factory=Counter)
    rewrites: int = 0


PROVENANCE_RULE = "graft.rule"
PROVENANCE_REPLACED = "graft.replaced"
# Model-level log (metadata_props, JSON [[rule, replaced], ...]) of rewrites that created no
# node or initializer, so a diff can still say which rule removed what.
RECONNECTED_LOG = "graft.reconnected"
# Node metadata that says where in the user's model a node came from; new nodes inherit it from the root.
SOURCE_META = ("torch.module", "torch.module_type")


class Builder:
    """The ``op`` a replacement receives: builds nodes off-graph until the rewrite commits.

    ``op.Conv(a, b, c, group=2)`` → the new node's output :class:`Value`
    (a tuple with ``_outputs=N``). Inputs may be Values, None (absent optional),
    or numpy arrays / Python scalars, which become new initializers.
    ``op.const(array, dtype=None)`` makes an initializer explicitly.
    ``op.domain("com.microsoft").X(...)`` for other domains.
    """

    def __init__(self, graph: Graph, rule_name: str, domain: str = "", state: dict | None = None):
        self._graph = graph
        self._rule = rule_name
        self._domain = domain
        self._state = state if state is not None else {"nodes": [], "consts": []}

    @property
    def nodes(self) -> list[Node]:
        return self._state["nodes"]

    def _unique(self, hint: str) -> str:
        # Graph.unique_name, with the model's name scope looked up once per rewrite
        fresh = self._state.get("fresh")
        if fresh is None:
            fresh = self._state["fresh"] = self._graph._names().fresh
        return fresh(hint)

    @property
    def consts(self) -> list[Value]:
        return self._state["consts"]

    def domain(self, domain: str) -> "Builder":
        return Builder(self._graph, self._rule, domain, self._state)

    def const(self, array, dtype: DataType | None = None, name: str | None = None, *, copy: bool = True) -> Value:
        """A new initializer holding a copy of ``array`` (existing tensors are never aliased or edited).

        ``copy=False`` hands over a numpy array the rule has just computed and keeps no other
        reference to: it is stored as is (and made read-only) instead of copied.
        """
        arr = np.array(array, copy=True) if copy or not isinstance(array, np.ndarray) else array
        kind = arr.dtype.kind  # one attribute read instead of comparing dtypes (~0.3 µs per constant)
        if kind in "OUSV" and (kind == "O" or dtype != DataType.STRING) and not _onnx_typed(arr.dtype):
            raise RuleError(f"rule {self._rule!r}: op.const got an array of dtype {arr.dtype}, which has no "
                            f"ONNX tensor type (pass numbers, or dtype=DataType.STRING for text)")
        v = Value(self._unique(name or f"{self._rule}_const"),
                  const=Tensor(arr, dtype=dtype))
        self._state["consts"].append(v)
        return v

    def __getattr__(self, op_type: str):
        if op_type.startswith("_"):
            raise AttributeError(op_type)
        if (self._domain, op_type) not in _CHECKED_OPS:
            # onnx.defs lookups cost microseconds: check each op name once per process
            check_op_name(op_type, self._domain, caller_location())
            _CHECKED_OPS.add((self._domain, op_type))

        def make(*inputs, _outputs: int = 1, _name: str | None = None, **attrs):
            ins = [x if x is None or type(x) is Value else self._as_value(x) for x in inputs]
            hint = _name or op_type
            unique = self._unique
            if _outputs == 1:
                outs = [Value(unique(hint + "_out"))]
            else:
                outs = [Value(unique(f"{hint}_out{i}")) for i in range(_outputs)]
            for v in attrs.values():
                if v is None:  # an attribute passed as None is left unset
                    attrs = {k: v for k, v in attrs.items() if v is not None}
                    break
            node = Node(op_type, ins, outs, attrs, domain=self._domain, name=unique(hint))
            self._state["nodes"].append(node)
            return outs[0] if _outputs == 1 else tuple(outs)

        return make

    def _as_value(self, x):
        if x is None or isinstance(x, Value):
            return x
        if isinstance(x, (np.ndarray, np.generic, int, float, bool, list)):
            return self.const(np.asarray(x))
        raise RuleError(f"rule {self._rule!r}: cannot use {type(x).__name__} {x!r} as a node input")

    def discard(self) -> None:
        for n in self.nodes:
            n._drop_inputs()


# (domain, op type) pairs a Builder has already checked against onnx.defs.
_CHECKED_OPS: set[tuple[str, str]] = set()


def _onnx_typed(dtype) -> bool:
    """An ml_dtypes type (int4, float8, bfloat16: numpy kind 'V') that ONNX has a tensor type for."""
    if dtype.kind != "V":
        return False
    try:
        DataType.from_numpy(dtype)
    except Exception:  # onnx raises KeyError/ValueError by version for unknown dtypes
        return False
    return True


def _describe(node: Node) -> str:
    if not node.name and node.outputs:  # imported nodes may be unnamed: name them by their output
        return f"{node.op_type} node (output {node.outputs[0].name!r})"
    return f"{node.op_type} node {node.name!r}"


class Rewriter:
    """Runs a :class:`RuleSet` over a model (subgraphs included) to a fixed point.

    Args:
        rules: the rule set.
        max_rewrites: limit per graph; default 4 × nodes + 1000.
        on_rewrite: optional callback ``(rule, match, new_nodes)`` for tracing.
    """

    def __init__(self, rules: RuleSet, *, max_rewrites: int | None = None,
                 on_rewrite: Callable | None = None):
        self.rules = rules
        self.max_rewrites = max_rewrites
        self.on_rewrite = on_rewrite

    def run(self, model: Model) -> RewriteResult:
        result = RewriteResult(False, StopReason.SATURATED)
        with gc_paused():  # a rewrite allocates and frees in bulk: see ir/_gc.py
            for g in list(model.all_graphs()):
                self._run_graph(g, model.opset, result)
        result.modified = result.rewrites > 0
        return result

    def _run_graph(self, graph: Graph, opset: int, result: RewriteResult) -> None:
        limit = self.max_rewrites if self.max_rewrites is not None else 4 * len(graph) + 1000
        queue: deque[Node] = deque(graph)
        queued: set[Node] = set(queue)
        done = 0
        matchers: dict[str, Matcher] = {}
        # (rule, matcher) pairs per op type (for_node once per op type): the loop below runs
        # once per rule tried at each node, so it does no lookups of its own
        candidates: dict[tuple[str, str], list[tuple[Rule, Matcher]]] = {}
        sort_needed = False
        while queue:
            node = queue.popleft()
            queued.discard(node)
            if node.graph is not graph:
                continue
            key = (node.domain, node.op_type)
            pairs = candidates.get(key)
            if pairs is None:
                pairs = candidates[key] = []
                for rule in self.rules.for_node(*key):
                    matcher = matchers.get(rule.name)
                    if matcher is None:
                        matcher = matchers[rule.name] = Matcher(rule.roots, opset, track_misses=False)
                    pairs.append((rule, matcher))
            for rule, matcher in pairs:
                try:
                    bindings = matcher.match(node)
                except Exception as e:  # a Const/attribute/node predicate of the rule raised
                    raise RuleError(f"rule {rule.name!r} ({rule.where}): its pattern predicate at "
                                    f"{_user_frame(e, rule)} raised {type(e).__name__}: {e} while matching "
                                    f"{_describe(node)}") from e
                if bindings is None:
                    continue
                applied = self._try(rule, bindings, node, opset)
                if applied is None:
                    continue
                new_nodes, touched, multi_root = applied
                sort_needed |= multi_root
                result.counts[rule.name] += 1
                result.rewrites += 1
                done += 1
                for n in (*new_nodes, *touched):
                    if n.graph is graph and n not in queued:
                        queue.append(n)
                        queued.add(n)
                break
            if done >= limit and queue:  # an empty worklist at the limit is still a fixed point
                result.stop_reason = StopReason.ITERATION_LIMIT
                break
        if sort_needed:
            graph.sort()

    # -- one attempt ----------------------------------------------------------
    def _try(self, rule: Rule, bindings: dict, node: Node, opset: int):
        """Check and apply ``rule`` where its pattern matched ``node`` (``bindings``, from the matcher)."""
        m = Match(bindings, bindings["__roots__"], opset, rule.name, rule.node_names)
        if explain_escape(m) is not None:
            return None
        if rule.check is not None:
            verdict = _run_user(rule, "check", rule.check, (m,), node)
            if verdict is not None and verdict is not True:
                return None
        return apply(rule, m, self.on_rewrite)


def _user_frame(e: BaseException, rule: Rule) -> str:
    """``file:line`` of the innermost traceback frame in the rule's own file (else the rule's)."""
    rule_file = rule.where.rsplit(":", 1)[0]
    where = rule.where
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == rule_file:
            where = f"{rule_file}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def explain_escape(m: Match) -> Failure | None:
    """A Failure if a matched non-root node's output is read outside the match."""
    if len(m.nodes) == len(m.roots):  # every matched node is a root: nothing can escape
        return None
    inside = m.nodes if len(m.nodes) <= 4 else set(m.nodes)  # a short tuple is searched faster than a set is built
    roots = m.roots
    for n in m.nodes:
        if n in roots:
            continue
        for o in n.outputs:
            if o.is_graph_output():
                return Failure(f"output {o.name!r} of {_describe(n)} is a graph output, so the node "
                               f"cannot be replaced", n)
            for u, _ in o._uses:  # the readers, in order (o.users() without building a list)
                if u not in inside:
                    return Failure(f"output {o.name!r} of {_describe(n)} is also used by "
                                   f"{_describe(u)} outside the pattern", n)
    return None


def _run_user(rule: Rule, what: str, fn, args, node: Node):
    try:
        return fn(*args)
    except RuleError:
        raise
    except Exception as e:
        raise RuleError(f"rule {rule.name!r} ({rule.where}): its {what} raised {type(e).__name__}: {e} "
                        f"while rewriting {_describe(node)}") from e


def apply(rule: Rule, m: Match, on_rewrite: Callable | None = None):
    """Build and commit ``rule``'s replacement for match ``m``.

    Returns:
        (new nodes, nodes to revisit, multi_root) or None when the engine refuses
        the replacement (it would rename a model input or leave a cycle).

    Raises:
        RuleError: the replacement raised or returned the wrong number/kind of values.
    """
    graph = m.graph
    op = Builder(graph, rule.name)
    try:
        out = _run_user(rule, "replacement", rule.replacement, (op, m), m.root)
    except RuleError:
        op.discard()
        raise
    if isinstance(out, Failure):
        op.discard()
        return None
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    old_outs = [o for r in m.roots for o in r.outputs]
    if len(outs) != len(old_outs) or not all(isinstance(v, Value) for v in outs):
        op.discard()
        got = ", ".join(type(v).__name__ for v in outs)
        raise RuleError(f"rule {rule.name!r} ({rule.where}): replacement must return {len(old_outs)} "
                        f"Value(s) for the outputs of {', '.join(_describe(r) for r in m.roots)}, "
                        f"got ({got})")
    for old, new in zip(old_outs, outs):
        if old.is_graph_output() and new is not old and not (new in _fresh_outputs(op) or (
                new.producer is not None and new.graph is graph and not new.is_graph_output())):
            # The model's output would have to be renamed onto an input/initializer: refuse
            # rather than loop (e.g. Identity(input) as the graph output).
            op.discard()
            return None
    # Commit: constants, then nodes before the root, in creation order.
    replaced = ",".join(n.name or n.outputs[0].name for n in m.nodes)
    # (the Builder took every name below from the model's name scope: nothing to claim again)
    inits = graph.initializers
    for c in op.consts:
        c.graph = graph
        inits[c.name] = c
        # initializers carry provenance too (TensorProto.metadata_props): a rule that only makes
        # constants (constant_to_initializer, constant folding) still says what it replaced
        c.meta[PROVENANCE_RULE] = rule.name
        c.meta[PROVENANCE_REPLACED] = replaced
    anchor = m.roots[0]
    source = [k for k in SOURCE_META if k in anchor.meta]
    for n in op.nodes:
        graph._link(n, anchor, names_claimed=True)
        n.meta[PROVENANCE_RULE] = rule.name
        n.meta[PROVENANCE_REPLACED] = replaced
        for k in source:  # where in the user's model this came from (diffs, reports, torch output)
            if k not in n.meta:
                n.meta[k] = anchor.meta[k]
    for old, new in zip(old_outs, outs):
        if new is old:
            continue
        if new.dtype is None:
            new.dtype, new.shape = old.dtype, old.shape
        elif new.shape is None and old.shape is not None and new.dtype == old.dtype:
            # same tensor: keep the known shape (a graph output taking new's name must keep
            # its declared shape, which onnx.checker requires of graph outputs)
            new.shape = old.shape
        if new.producer is not None and new.producer in op.nodes:
            # transitive: a value replacing a rule-made value still names the input model's value
            new.meta["graft.replaces"] = old.meta.get("graft.replaces", old.name)
        old.replace_all_uses_with(new)
    touched: list[Node] = []
    # Delete matched nodes that nothing reads any more, root side first.
    for n in m.nodes:
        if n.graph is not graph:
            continue
        for o in n.outputs:
            if o._uses or o.is_graph_output():
                break
        else:
            ins = [v for v in n._inputs if v is not None]
            graph.remove(n, check_uses=False)
            touched.extend(_drop_dead_producers(graph, ins))
    _inherit_names(graph, old_outs, outs, op)
    for v in outs:
        touched.extend(n for n, _ in v._uses)  # duplicates are harmless: the worklist dedups
    if not op.nodes and not op.consts:
        # Nothing new carries this rewrite's provenance (e.g. Identity(x) -> x): log it on the model.
        model = graph.model
        if model is not None:
            model.meta.setdefault(RECONNECTED_LOG, []).append((rule.name, replaced))
    if on_rewrite is not None:
        on_rewrite(rule, m, op.nodes)
    return op.nodes, touched, len(m.roots) > 1


def _inherit_names(graph: Graph, old_outs: list[Value], outs: list[Value], op: Builder) -> None:
    """A fresh value that replaced a value now gone takes its name.

    Names are what users, diffs and value_info key on: BN folded into a Conv keeps
    the BN output's name, a Constant turned initializer keeps its name.
    """
    nodes, consts = op.nodes, op.consts
    for old, new in zip(old_outs, outs):
        if new is old or not old.name or new.is_graph_output():
            continue
        if not (new.producer in nodes if new.producer is not None else new in consts):  # not made by this rewrite
            continue
        if old.num_uses or (old.producer is not None and old.producer.graph is not None):
            continue
        if new.const is not None:
            graph.initializers.pop(new.name, None)
            new.name = old.name
            graph.initializers[new.name] = new
        else:
            new.name = old.name


def _fresh_outputs(op: Builder) -> set[Value]:
    return {o for n in op.nodes for o in n.outputs}


def _drop_dead_producers(graph: Graph, values: list[Value]) -> list[Node]:
    """Remove producers (transitively) whose outputs lost their last reader.

    Returns the nodes to revisit: each producer that survives with fewer readers, and its
    remaining readers.
    """
    touched = []
    stack = list(values)
    inits, graph_outs = graph.initializers, graph._output_set
    # Value.num_uses / is_graph_output inlined: this runs for every input of every removed node
    # (an initializer is never a graph input in the IR's sense: Value.is_graph_input needs const None)
    while stack:
        v = stack.pop()
        if not v._uses and v.const is not None and v.graph is graph and v.name in inits \
                and v not in graph_outs:
            del inits[v.name]
            continue
        p = v.producer
        if p is None or p.graph is not graph:
            continue
        for o in p.outputs:
            if o._uses or o.is_graph_output():
                # p survives with fewer readers: a rule rooted at p may look at its outputs' uses
                # (Dropout's mask), and one rooted at a remaining reader may now pass the escape
                # check that p's lost reader failed
                touched.append(p)
                for q in p.outputs:
                    touched.extend([u for u, _ in q._uses])
                break
        else:
            ins = [x for x in p._inputs if x is not None]
            graph.remove(p, check_uses=False)
            stack.extend(ins)
    return touched


def rewrite(model: Model, rules: RuleSet | list[Rule], **kw) -> RewriteResult:
    """Apply ``rules`` to ``model`` in place until saturation. See :class:`Rewriter`."""
    if not isinstance(model, Model):
        raise TypeError(f"rewrite() takes an ir.Model, got {type(model).__name__}; "
                        f"use ir.from_onnx(proto) or ir.load(path) first")
    if not isinstance(rules, RuleSet):
        rules = RuleSet(rules)
    return Rewriter(rules, **kw).run(model)


def explain(model: Model, rule: Rule) -> tuple[list[Match], list[tuple[Node, Miss | Failure]]]:
    """Where ``rule`` matches in ``model`` and, for candidate roots where it does not, why.

    Returns:
        (matches that would fire, [(candidate root, nearest miss or check failure)]),
        candidates sorted by how far the match got (nearest first).
    """
    hits, misses = [], []
    for g in model.all_graphs():
        for node in g:
            r0 = rule.roots[0]
            if not r0.is_wildcard and (node.op_type, node.domain) != (r0.op_type, r0.domain):
                continue
            matcher = Matcher(rule.roots, model.opset)
            b = matcher.match(node)
            if b is None:
                misses.append((node, matcher.best_miss or Miss("no match", node, 0)))
                continue
            m = Match(b, b["__roots__"], model.opset, rule.name, rule.node_names)
            f = explain_escape(m)
            if f is None and rule.check is not None:
                v = rule.check(m)
                if isinstance(v, str):
                    v = Failure(v, node)
                f = v if isinstance(v, Failure) else None
            if f is None:
                hits.append(m)
            else:
                misses.append((node, Miss(f.reason, f.node or node, len(m.nodes) + 1)))
    misses.sort(key=lambda t: -t[1].depth)
    return hits, misses
