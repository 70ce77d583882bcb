"""Matching patterns against the IR, and the :class:`Match` a rule's check and replacement see.

Matching is a recursive walk from a root node towards the inputs, with
backtracking only where a commutative op offers two input orders. Every failed
attempt records *why* and how far it got, so ``graft explain`` can show the
nearest miss.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from graft.compiler.engine.pattern import Attr, Optional, PatternNode, PatternOutput, Var, attr_default
from graft.ir import Node, Value
from graft.ir.dtypes import DataType


class Miss:
    """Why a match failed: the reason, the IR node it concerns, and how many pattern nodes had matched."""

    __slots__ = ("reason", "node", "depth")

    def __init__(self, reason: str, node: Node | None, depth: int):
        self.reason, self.node, self.depth = reason, node, depth

    def __repr__(self):
        return f"Miss({self.reason!r})"


def _predicate(fn) -> str:
    """`` (name: first docstring line)`` of a node predicate, so a miss says what the rule wanted."""
    name = getattr(fn, "__name__", "")
    doc = (getattr(fn, "__doc__", None) or "").strip().splitlines()
    if name == "<lambda>":
        name = ""
    text = ": ".join(s for s in (name, doc[0].rstrip(".") if doc else "") if s)
    return f" ({text})" if text else ""


def _describe(node: Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} (output {node.outputs[0].name!r})"


class Matcher:
    """Matches one pattern (one or more roots) at a node. Keeps the best miss.

    The walk over a pattern tree is deterministic except at commutative ops,
    which offer two input orders. Rather than a generator per pattern node, the
    walk records the order it takes at each commutative op on a decision stack;
    after a failure (or when the caller wants another binding) the last decision
    with an untried order is flipped and the walk replayed. That visits bindings
    in the same depth-first order as a backtracking search, and a match without
    commutative ops costs one walk, one dict and no generator frames.
    """

    def __init__(self, roots: tuple[PatternNode, ...], opset: int, *, track_misses: bool = True):
        self.roots = roots
        self.opset = opset
        self.best_miss: Miss | None = None
        # The rewriter never reads best_miss: it turns tracking off so that a
        # failed attempt does not format a reason string nobody will read.
        self._track = track_misses
        self._decisions: list[int] = []
        self._cursor = 0
        # required (non-optional) input count per pattern node, computed once
        self._n_req: dict[PatternNode, int] = {}
        for r in roots:
            for pn in r.walk():
                self._n_req[pn] = sum(1 for a in pn.inputs if not isinstance(a, Optional))
        # (op type, domain) of each required op input of the first root: a node none of whose
        # inputs comes from such an op cannot match, which the rewriter checks before walking
        needs = []
        for a in roots[0].inputs:
            child = a.node if isinstance(a, PatternOutput) else a
            if isinstance(child, PatternNode) and child.op_type != "*":
                needs.append((child.op_type, child.domain))
        self._root_needs = tuple(dict.fromkeys(needs))
        # op.any_op(name=..., where=...) alone (constant folding's pattern) is tried at every node:
        # match it without the general walk
        r0 = roots[0]
        self._lone_wildcard = len(roots) == 1 and r0.op_type == "*" and not r0.inputs and not r0.attrs
        self._lone_where = getattr(r0, "node_where", None) if self._lone_wildcard else None

    # -- public -------------------------------------------------------------
    def match(self, node: Node) -> dict | None:
        """Bindings (Var → Value, name → Node, "attr:" + name → value) or None."""
        if self._root_needs and not self._track:
            ins = node._inputs
            for op_type, domain in self._root_needs:
                for v in ins:
                    p = v.producer if v is not None else None
                    if p is not None and p.op_type == op_type and p.domain == domain:
                        break
                else:
                    return None  # no input comes from a required op: the walk would fail
        if self._lone_wildcard:
            where = self._lone_where
            if where is not None and not where(node):
                if self._track:
                    self._miss(f"{_describe(node)} fails the pattern's node predicate{_predicate(where)}", node,
                               {"__nodes__": ()})
                return None
            b = {"__nodes__": (node,), "__roots__": (node,)}
            name = self.roots[0].name
            if name is not None:
                b[name] = node
            return b
        if len(self.roots) == 1:
            return self._first(self.roots[0], node)
        for b in self._tree(self.roots[0], node, {"__nodes__": (), "__roots__": (node,)}):
            got = self._more_roots(1, b)
            if got is not None:
                return got
        return None

    # -- internals ------------------------------------------------------------
    def _miss(self, reason: str, node: Node | None, b: dict) -> None:
        depth = len(b["__nodes__"])
        # strictly deeper wins: at equal depth the first attempt (the pattern's own input
        # order, before any commutative swap) gives the more useful reason
        if self.best_miss is None or depth > self.best_miss.depth:
            self.best_miss = Miss(reason, node, depth)

    def _first(self, pn: PatternNode, node: Node) -> dict | None:
        """The first binding :meth:`_tree` would yield for a single-root pattern (no generator)."""
        decisions: list[int] = []
        roots = (node,)
        while True:
            b = {"__nodes__": [], "__roots__": roots}
            self._decisions, self._cursor = decisions, 0
            if self._node(pn, node, b):
                b["__nodes__"] = tuple(b["__nodes__"])
                return b
            del decisions[self._cursor:]
            while decisions and decisions[-1]:
                decisions.pop()
            if not decisions:
                return None
            decisions[-1] = 1

    def _tree(self, pn: PatternNode, node: Node, b0: dict):
        """Every consistent binding of the tree under ``pn`` at ``node``, depth-first order."""
        decisions: list[int] = []
        while True:
            b = dict(b0)
            b["__nodes__"] = list(b0["__nodes__"])
            self._decisions, self._cursor = decisions, 0
            ok = self._node(pn, node, b)
            del decisions[self._cursor:]
            if ok:
                b["__nodes__"] = tuple(b["__nodes__"])
                yield b
            while decisions and decisions[-1]:
                decisions.pop()
            if not decisions:
                return
            decisions[-1] = 1

    def _more_roots(self, k: int, b: dict) -> dict | None:
        if k == len(self.roots):
            return b
        root = self.roots[k]
        # candidates: readers of any value bound so far, of the right op type
        seen = set()
        for key, v in list(b.items()):
            if not isinstance(v, Value):
                continue
            for user in v.users():
                if user in seen or user in b["__nodes__"]:
                    continue
                seen.add(user)
                for b2 in self._tree(root, user, {**b, "__roots__": b["__roots__"] + (user,)}):
                    got = self._more_roots(k + 1, b2)
                    if got is not None:
                        return got
        if self._track:
            self._miss(f"no {root.op_type} node found reading the values matched so far", None, b)
        return None

    def _node(self, pn: PatternNode, node: Node, b: dict) -> bool:
        """Extend ``b`` in place with ``pn`` matched at ``node``; False (and a miss) if it does not match."""
        if pn.op_type != "*":  # not a wildcard (op.any_op)
            if node.op_type != pn.op_type or node.domain != pn.domain:
                if self._track:
                    self._miss(f"pattern wants {pn.op_type} here, found {_describe(node)}", node, b)
                return False
        elif getattr(pn, "node_where", None) is not None and not pn.node_where(node):
            if self._track:
                self._miss(f"{_describe(node)} fails the pattern's node predicate{_predicate(pn.node_where)}", node, b)
            return False
        if pn.name is not None:
            prev = b.get(pn.name)
            if prev is not None:
                if prev is node:
                    return True
                if self._track:
                    self._miss(f"pattern node {pn.name!r} would bind two different nodes", node, b)
                return False
        nodes = b["__nodes__"]
        if node in nodes:
            if self._track:
                self._miss(f"{_describe(node)} is already part of this match", node, b)
            return False
        nodes.append(node)
        if pn.name is not None:
            b[pn.name] = node
        if pn.attrs and not self._attrs(pn, node, b):
            return False
        pins = pn.inputs
        if not pins and pn.op_type == "*":
            return True
        ins = node._inputs  # the node's own list: read only, never kept
        n_in, n_pat = len(ins), len(pins)
        n_req = self._n_req.get(pn)
        if n_req is None:
            n_req = self._n_req[pn] = sum(1 for a in pins if not isinstance(a, Optional))
        if (n_in > n_pat and not pn.variadic) or n_in < n_req:
            if self._track:
                self._miss(f"{_describe(node)} has {n_in} inputs, pattern wants {n_req}..{n_pat}", node, b)
            return False
        if pn.commutative and n_pat == 2 and n_in == 2:
            i = self._cursor
            if i < len(self._decisions):
                swapped = self._decisions[i]
            else:
                self._decisions.append(0)
                swapped = 0
            self._cursor = i + 1
            if swapped:
                return self._arg(pins[0], ins[1], node, 0, b) and self._arg(pins[1], ins[0], node, 1, b)
        for k in range(n_pat):
            if not self._arg(pins[k], ins[k] if k < n_in else None, node, k, b):
                return False
        return True

    def _arg(self, parg, value: Value | None, node: Node, k: int, b: dict) -> bool:
        if type(parg) is Optional:
            if value is None:
                inner = parg.inner
                if isinstance(inner, Var) and inner not in b:
                    b[inner] = None
                return True
            parg = parg.inner
        if value is None:
            if self._track:
                self._miss(f"input {k} of {_describe(node)} is absent", node, b)
            return False
        if isinstance(parg, Var):
            prev = b.get(parg, _UNSET)
            if prev is not _UNSET:
                if prev is value:
                    return True
                prev_name = prev.name if prev is not None else "an absent input"
                if self._track:
                    self._miss(f"{parg.name} must be the same value in both places "
                               f"({prev_name!r} vs {value.name!r})", node, b)
                return False
            if parg.const:
                arr = value.constant()
                if arr is None:
                    if self._track:
                        self._miss(f"input {k} ({value.name!r}) of {_describe(node)} is not a constant "
                                   f"(pattern wants Const {parg.name})", node, b)
                    return False
                if parg.where is not None and not parg.where(arr):
                    if self._track:
                        self._miss(f"constant {value.name!r} fails the predicate of {parg.name}", node, b)
                    return False
            elif parg.where is not None and not parg.where(value):
                if self._track:
                    self._miss(f"value {value.name!r} fails the predicate of {parg.name}", node, b)
                return False
            b[parg] = value
            return True
        index = 0
        if type(parg) is PatternOutput:
            parg, index = parg.node, parg.index
        prod = value.producer
        if prod is None:
            if self._track:
                kind = "a graph input" if value.is_graph_input() else "an initializer"
                self._miss(f"input {k} ({value.name!r}) of {_describe(node)} is {kind}, pattern wants "
                           f"the output of {parg.op_type}", node, b)
            return False
        if value.index != index:
            if self._track:
                self._miss(f"input {k} of {_describe(node)} is output {value.index} of its producer, "
                           f"pattern wants output {index}", node, b)
            return False
        return self._node(parg, prod, b)

    def _attrs(self, pn: PatternNode, node: Node, b: dict) -> bool:
        for name, want in pn.attrs.items():
            have = node.attrs.get(name, _UNSET)
            if have is _UNSET:
                have = attr_default(node.op_type, node.domain, self.opset, name)
            if isinstance(want, Attr):
                if want.where is not None and not want.where(have):
                    if self._track:
                        self._miss(f"attribute {name}={have!r} of {_describe(node)} fails the predicate "
                                   f"of Attr({want.name!r})", node, b)
                    return False
                b["attr:" + want.name] = have
            elif callable(want):
                if not want(have):
                    if self._track:
                        self._miss(f"attribute {name}={have!r} of {_describe(node)} fails the pattern's "
                                   f"predicate", node, b)
                    return False
            elif not _attr_equal(have, want):
                if self._track:
                    self._miss(f"attribute {name} of {_describe(node)} is {have!r}, pattern wants {want!r}",
                               node, b)
                return False
        return True


_UNSET = object()


def _attr_equal(have, want) -> bool:
    if isinstance(want, (list, tuple)):
        return isinstance(have, (list, tuple)) and len(have) == len(want) and \
            all(_attr_equal(h, w) for h, w in zip(have, want))
    if isinstance(want, float) or isinstance(have, float):
        # ONNX float attributes are float32 (AttributeProto.f): 0.01 is stored as 0.0099999998
        if have is None or want is None or isinstance(have, (str, bytes)) or isinstance(want, (str, bytes)):
            return False
        return bool(np.float32(have) == np.float32(want))
    return have == want


class Failure:
    """Returned by a check to refuse a match: ``return m.fail("why", node)``."""

    def __init__(self, reason: str, node: Node | None = None):
        self.reason, self.node = reason, node

    def __repr__(self):
        return f"Failure({self.reason!r})"


class Match:
    """A successful match, as a rule's check and replacement see it.

    - ``m[x]``: the :class:`ir.Value` bound to Var ``x``; for a :class:`Const`,
      its read-only numpy array; None for an absent ``op.optional``.
    - ``m.const(x)``: the read-only numpy array of the compile-time constant bound
      to ``x`` (a Var or a Const), None when absent or not a constant.
    - ``m.value(x)``: always the Value (e.g. to reuse an initializer as is).
    - ``m.get(x, default)``: like ``m[x]`` but ``default`` when absent.
    - ``m.<name>``: the node bound by ``name=`` in the pattern.
    - ``m.attr(name)``: an attribute bound with :class:`Attr`.
    - ``m.nodes``: all matched nodes, root first; ``m.root``; ``m.graph``; ``m.opset``.

    Constants are read once per match: ``m[c]``, ``m.const``, ``m.get``,
    ``m.all_constant`` and ``m.need_constant`` share one lookup per Var, so a check
    and a replacement may read a tensor as often as their math does. (Decoding a
    tensor from its ``TensorProto`` happens once per tensor, in
    :attr:`ir.Tensor.array`.) A rewrite replaces initializers with new values and
    never edits one in place, and a Match lives for one check and one replacement,
    so what it serves is never stale. ``m.memo(fn)`` does the same for a value the
    rule derives: a check and a replacement that both need ``fn(m)`` compute it once.
    """

    _METHODS = frozenset({"value", "get", "attr", "fail", "nodes", "root", "graph", "model", "opset",
                          "all_constant", "escapes", "shape", "dtype", "bindings", "roots", "rule",
                          "const", "need_constant", "memo"})

    def __init__(self, bindings: dict, roots: tuple[Node, ...], opset: int, rule_name: str = "",
                 names: Iterable[str] = ()):
        self._b = bindings
        self._known: dict = {}  # Var -> constant array or None, memo function -> its result
        d = self.__dict__
        for name in names:  # the pattern's node names (Rule.node_names): m.conv is then a plain attribute
            node = bindings.get(name)
            if node is not None:
                d[name] = node
        self.roots = roots
        self.root = roots[0]
        self.nodes: tuple[Node, ...] = bindings["__nodes__"]
        self.graph = self.root.graph
        self.opset = opset
        self.rule = rule_name

    @property
    def model(self):
        return self.graph.model

    def __getitem__(self, var: Var) -> Any:
        v = self._b.get(var, _UNSET)
        if v is _UNSET:
            raise KeyError(f"{var!r} is not bound by this rule's pattern")
        if v is None or not var.const:
            return v
        return self.const(var)

    def const(self, var: Var) -> np.ndarray | None:
        """The read-only array of the compile-time constant bound to ``var`` (initializer or
        ``Constant`` output, see :meth:`ir.Value.constant`); None when ``var`` is absent (or not
        in this pattern, like :meth:`value`) or its value is computed at run time. Looked up once
        per match.
        """
        known = self._known
        if var in known:
            return known[var]
        v = self._b.get(var)
        arr = known[var] = None if v is None else v.constant()
        return arr

    def value(self, var: Var) -> Value | None:
        return self._b.get(var)

    def get(self, var: Var, default=None):
        v = self._b.get(var)
        return default if v is None else self[var]

    def attr(self, name: str):
        return self._b["attr:" + name]

    @property
    def bindings(self) -> dict:
        """What the pattern bound, for display (``graft explain``): :class:`Var` → Value
        (None for an absent optional), node name → Node, ``"attr:" + name`` → attribute value."""
        return {k: v for k, v in self._b.items() if not (isinstance(k, str) and k.startswith("__"))}

    def shape(self, var: Var):
        v = self._b.get(var)
        return None if v is None else v.shape

    def dtype(self, var: Var) -> DataType | None:
        """The element type of the value bound to ``var``; for a constant whose Value records
        none (a ``Constant`` output before shape inference), its array's. None when absent or unknown."""
        v = self._b.get(var)
        if v is None:
            return None
        if v.dtype is not None:
            return v.dtype
        arr = self.const(var)
        return None if arr is None else DataType.from_numpy(arr.dtype)

    def all_constant(self, *vars_) -> bool:
        """True when each of ``vars_`` is absent or bound to a compile-time constant."""
        b = self._b
        return all(b.get(v) is None or self.const(v) is not None for v in vars_)

    def need_constant(self, *vars_, why: str = "") -> Failure | None:
        """None when each of ``vars_`` is absent or a compile-time constant; else a Failure for the
        first that is not, naming it, the matched node that reads it and whether it is a graph input
        (which callers may override) or computed at run time, then ``why``::

            weight 'W' of Conv 'conv' is not a constant (computed at run time); <why>
        """
        b = self._b
        for var in vars_:
            v = b.get(var)
            if v is None or self.const(var) is not None:
                continue
            reader = next((n for n in self.nodes if v in n.inputs), self.root)
            how = "a graph input callers may override" if v.is_graph_input() else "computed at run time"
            return Failure(f"{var.name} {v.name!r} of {_describe(reader)} is not a constant ({how})"
                           + (f"; {why}" if why else ""), reader)
        return None

    def memo(self, fn: Callable[["Match"], Any]) -> Any:
        """``fn(m)``, computed on the first call for this match and returned again after: a check
        and a replacement that both need a derived value (a folded result, a scale) share it."""
        known = self._known
        if fn in known:
            return known[fn]
        got = known[fn] = fn(self)
        return got

    def escapes(self, node: Node) -> bool:
        """True when an output of ``node`` is read outside the match (or is a graph output)."""
        inside = set(self.nodes)
        return any(o.is_graph_output() or any(u not in inside for u in o.users()) for o in node.outputs)

    @staticmethod
    def fail(reason: str, node: Node | None = None) -> Failure:
        return Failure(reason, node)

    def __getattr__(self, name: str) -> Node:
        b = self.__dict__.get("_b")
        if b is not None and name in b and isinstance(b[name], Node):
            node = self.__dict__[name] = b[name]  # checks and replacements read m.conv etc. repeatedly
            return node
        raise AttributeError(f"the pattern binds no node named {name!r}")
