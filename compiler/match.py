"""Matching patterns against the IR, and the :class:`Match` a rule's check and replacement see.

Matching is a recursive walk from a root node towards the inputs, with
backtracking only where a commutative op offers two input orders. Every failed
attempt records *why* and how far it got, so ``graft explain`` can show the
nearest miss.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from compiler.pattern import Attr, Optional, PatternNode, PatternOutput, Var, attr_default
from ir import Node, Value


class Miss:
    """Why a match failed: the reason, the IR node it concerns, and how many pattern nodes had matched."""

    __slots__ = ("reason", "node", "depth")

    def __init__(self, reason: str, node: Node | None, depth: int):
        self.reason, self.node, self.depth = reason, node, depth

    def __repr__(self):
        return f"Miss({self.reason!r})"


def _describe(node: Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} (output {node.outputs[0].name!r})"


class Matcher:
    """Matches one pattern (one or more roots) at a node. Keeps the best miss."""

    def __init__(self, roots: tuple[PatternNode, ...], opset: int):
        self.roots = roots
        self.opset = opset
        self.best_miss: Miss | None = None

    # -- public -------------------------------------------------------------
    def match(self, node: Node) -> dict | None:
        """Bindings (Var → Value, name → Node, "attr:" + name → value) or None."""
        for b in self._node(self.roots[0], node, {"__nodes__": (), "__roots__": (node,)}):
            got = self._more_roots(1, b)
            if got is not None:
                return got
        return None

    # -- internals (generators yield every consistent binding) ---------------
    def _miss(self, reason: str, node: Node | None, b: dict) -> None:
        depth = len(b["__nodes__"])
        if self.best_miss is None or depth >= self.best_miss.depth:
            self.best_miss = Miss(reason, node, depth)

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
                for b2 in self._node(root, user, {**b, "__roots__": b["__roots__"] + (user,)}):
                    got = self._more_roots(k + 1, b2)
                    if got is not None:
                        return got
        self._miss(f"no {root.op_type} node found reading the values matched so far", None, b)
        return None

    def _node(self, pn: PatternNode, node: Node, b: dict):
        if not pn.is_wildcard:
            if node.op_type != pn.op_type or node.domain != pn.domain:
                self._miss(f"pattern wants {pn.op_type} here, found {_describe(node)}", node, b)
                return
        elif getattr(pn, "node_where", None) is not None and not pn.node_where(node):
            self._miss(f"{_describe(node)} fails the pattern's node predicate", node, b)
            return
        if pn.name is not None:
            prev = b.get(pn.name)
            if prev is not None:
                if prev is node:
                    yield b
                else:
                    self._miss(f"pattern node {pn.name!r} would bind two different nodes", node, b)
                return
        if node in b["__nodes__"]:
            self._miss(f"{_describe(node)} is already part of this match", node, b)
            return
        b = dict(b)
        b["__nodes__"] = b["__nodes__"] + (node,)
        if pn.name is not None:
            b[pn.name] = node
        if not self._attrs(pn, node, b):
            return
        if pn.is_wildcard and not pn.inputs:
            yield b
            return
        ins = node.inputs
        n_req = sum(1 for a in pn.inputs if not isinstance(a, Optional))
        if len(ins) > len(pn.inputs) or len(ins) < n_req:
            self._miss(f"{_describe(node)} has {len(ins)} inputs, pattern wants "
                       f"{n_req}..{len(pn.inputs)}", node, b)
            return
        orders = [list(range(len(pn.inputs)))]
        if pn.commutative and len(pn.inputs) == 2 and len(ins) == 2:
            orders.append([1, 0])
        for order in orders:
            yield from self._inputs(pn, node, [(pn.inputs[i], ins[j] if j < len(ins) else None)
                                              for i, j in enumerate(order)], 0, b)

    def _inputs(self, pn, node, pairs, k, b):
        if k == len(pairs):
            yield b
            return
        parg, value = pairs[k]
        for b2 in self._arg(parg, value, node, k, b):
            yield from self._inputs(pn, node, pairs, k + 1, b2)

    def _arg(self, parg, value: Value | None, node: Node, k: int, b: dict):
        if isinstance(parg, Optional):
            if value is None:
                inner = parg.inner
                if isinstance(inner, Var) and inner not in b:
                    b = dict(b)
                    b[inner] = None
                yield b
                return
            parg = parg.inner
        if value is None:
            self._miss(f"input {k} of {_describe(node)} is absent", node, b)
            return
        if isinstance(parg, Var):
            prev = b.get(parg, _UNSET)
            if prev is not _UNSET:
                if prev is value:
                    yield b
                else:
                    self._miss(f"{parg.name} must be the same value in both places "
                               f"({prev.name!r} vs {value.name!r})", node, b)
                return
            if parg.const:
                arr = value.constant()
                if arr is None:
                    self._miss(f"input {k} ({value.name!r}) of {_describe(node)} is not a constant "
                               f"(pattern wants Const {parg.name})", node, b)
                    return
                if parg.where is not None and not parg.where(arr):
                    self._miss(f"constant {value.name!r} fails the predicate of {parg.name}", node, b)
                    return
            elif parg.where is not None and not parg.where(value):
                self._miss(f"value {value.name!r} fails the predicate of {parg.name}", node, b)
                return
            b = dict(b)
            b[parg] = value
            yield b
            return
        index = 0
        if isinstance(parg, PatternOutput):
            parg, index = parg.node, parg.index
        prod = value.producer
        if prod is None:
            kind = "a graph input" if value.is_graph_input() else "an initializer"
            self._miss(f"input {k} ({value.name!r}) of {_describe(node)} is {kind}, pattern wants "
                       f"the output of {parg.op_type}", node, b)
            return
        if value.index != index:
            self._miss(f"input {k} of {_describe(node)} is output {value.index} of its producer, "
                       f"pattern wants output {index}", node, b)
            return
        yield from self._node(parg, prod, b)

    def _attrs(self, pn: PatternNode, node: Node, b: dict) -> bool:
        for name, want in pn.attrs.items():
            have = node.attrs.get(name, _UNSET)
            if have is _UNSET:
                have = attr_default(node.op_type, node.domain, self.opset, name)
            if isinstance(want, Attr):
                if want.where is not None and not want.where(have):
                    self._miss(f"attribute {name}={have!r} of {_describe(node)} fails the predicate "
                               f"of Attr({want.name!r})", node, b)
                    return False
                b["attr:" + want.name] = have
            elif callable(want):
                if not want(have):
                    self._miss(f"attribute {name}={have!r} of {_describe(node)} fails the pattern's "
                               f"predicate", node, b)
                    return False
            elif not _attr_equal(have, want):
                self._miss(f"attribute {name} of {_describe(node)} is {have!r}, pattern wants {want!r}",
                           node, b)
                return False
        return True


_UNSET = object()


def _attr_equal(have, want) -> bool:
    if isinstance(want, (list, tuple)):
        return isinstance(have, (list, tuple)) and list(have) == list(want)
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
    - ``m.value(x)``: always the Value (e.g. to reuse an initializer as is).
    - ``m.get(x, default)``: like ``m[x]`` but ``default`` when absent.
    - ``m.<name>``: the node bound by ``name=`` in the pattern.
    - ``m.attr(name)``: an attribute bound with :class:`Attr`.
    - ``m.nodes``: all matched nodes, root first; ``m.root``; ``m.graph``; ``m.opset``.
    """

    _METHODS = frozenset({"value", "get", "attr", "fail", "nodes", "root", "graph", "model", "opset",
                          "all_constant", "escapes", "shape", "dtype", "bindings", "roots", "rule"})

    def __init__(self, bindings: dict, roots: tuple[Node, ...], opset: int, rule_name: str = ""):
        self._b = bindings
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
        if var not in self._b:
            raise KeyError(f"{var!r} is not bound by this rule's pattern")
        v = self._b[var]
        if v is None:
            return None
        if var.const:
            return v.constant()
        return v

    def value(self, var: Var) -> Value | None:
        return self._b.get(var)

    def get(self, var: Var, default=None):
        v = self._b.get(var)
        return default if v is None else self[var]

    def attr(self, name: str):
        return self._b["attr:" + name]

    def shape(self, var: Var):
        v = self._b.get(var)
        return None if v is None else v.shape

    def dtype(self, var: Var):
        v = self._b.get(var)
        return None if v is None else v.dtype

    def all_constant(self, *vars_) -> bool:
        return all(self._b.get(v) is None or self._b[v].constant() is not None for v in vars_)

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
            return b[name]
        raise AttributeError(f"the pattern binds no node named {name!r}")


def constant_of(value: Value | None) -> np.ndarray | None:
    return None if value is None else value.constant()
