"""Rules as data: a pattern, an optional check, a replacement — validated when defined.

A rule's replacement is ``replacement(op, m)``: ``op`` builds new nodes
(``op.Conv(m[x], op.const(w2), **attrs)``) and ``m`` is the :class:`Match`.
It returns the value(s) that take the place of the pattern root's output(s).
The optional ``check(m)`` returns ``None`` to allow the rewrite, or
``m.fail("why not", node)`` (a plain string works too) to refuse it.

At definition time a rule is checked for: a pattern built from known ops, a
replacement and check of the right arity, Vars the replacement or check uses but
the pattern never binds, and ``m.<name>`` references to node names the pattern
never binds. The error names the rule and the file:line of the offending code.
"""
from __future__ import annotations

import dis
import inspect
import types
from typing import Callable, Iterable

from graft.compiler.engine.match import Match
from graft.compiler.engine.pattern import (PatternError, PatternNode, Var, bound_names, caller_location, pattern_roots)


class RuleDefinitionError(PatternError):
    """A malformed rule; the message names the rule and file:line."""


class Rule:
    """A declarative rewrite rule.

    Args:
        name: unique, snake_case; recorded on every node the rule creates.
        pattern: an ``op.X(...)`` tree, or a tuple of them for several roots.
        replacement: ``(op, m) -> Value | tuple[Value, ...]``.
        check: optional ``(m) -> None | Failure | str``.
        doc: one-line summary for ``graft rules`` (defaults to the docstring's first line
            of the replacement, else of the defining module).

    Raises:
        RuleDefinitionError: at definition, for any of the faults listed in the module doc.
    """

    def __init__(self, name: str, pattern, replacement: Callable, check: Callable | None = None, *,
                 doc: str | None = None):
        self.name = name
        self.where = caller_location()
        try:
            self.roots: tuple[PatternNode, ...] = pattern_roots(pattern)
        except PatternError as e:
            raise RuleDefinitionError(f"rule {name!r} ({self.where}): {e}") from None
        self.replacement = replacement
        self.check = check
        self.vars, self.node_names, self.attr_names = bound_names(self.roots)
        self._validate()
        if doc is None:
            doc = (inspect.getdoc(replacement) or "").strip()
            if not doc:
                mod = inspect.getmodule(replacement)
                doc = (inspect.getdoc(mod) if mod else "") or ""
        self.doc = doc.strip().splitlines()[0] if doc.strip() else ""

    @property
    def root_key(self) -> tuple[str, str]:
        r = self.roots[0]
        return (r.domain, r.op_type)

    def _err(self, msg: str, fn: Callable | None = None, line: int | None = None) -> RuleDefinitionError:
        where = self.where
        if fn is not None:
            code = fn.__code__
            where = f"{code.co_filename}:{line or code.co_firstlineno}"
        return RuleDefinitionError(f"rule {self.name!r} ({where}): {msg}")

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise self._err(f"rule name {self.name!r} must be an identifier like 'fold_batchnorm_into_conv'")
        for n in sorted(self.node_names):
            if n in Match._METHODS or n.startswith("_"):
                # m.<name> would reach the Match's own attribute, never the node
                raise self._err(f"pattern node name {n!r} is taken by the Match (m.{n}); choose another name=")
        if not callable(self.replacement):
            raise self._err("replacement must be a function (op, m) -> value(s)")
        self._check_arity(self.replacement, 2, "replacement", "(op, m)")
        if self.check is not None:
            if not callable(self.check):
                raise self._err("check must be a function (m) -> None | m.fail(...)")
            self._check_arity(self.check, 1, "check", "(m)")
        for fn, match_param in ((self.replacement, 1), (self.check, 0)):
            if fn is not None:
                self._check_references(fn, match_param)

    def _check_arity(self, fn, n: int, what: str, sig: str) -> None:
        try:
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        except (TypeError, ValueError):
            return
        if len(params) != n:
            raise self._err(f"{what} must take {sig}, it takes {len(params)} argument(s)", fn)

    def _check_references(self, fn: Callable, match_param: int) -> None:
        """Vars the function reads but the pattern never binds; m.<name> for unbound node names."""
        if not hasattr(fn, "__code__"):
            return
        code = fn.__code__
        # Vars reachable as globals or closure cells of the function (and its nested code)
        referenced: dict[str, Var] = {}
        names = set()
        for c in _code_objects(code):
            names.update(c.co_names)
        g = getattr(fn, "__globals__", {})
        for n in names:
            v = g.get(n)
            if isinstance(v, Var):
                referenced[n] = v
        if fn.__closure__:
            for n, cell in zip(code.co_freevars, fn.__closure__):
                try:
                    v = cell.cell_contents
                except ValueError:
                    continue
                if isinstance(v, Var):
                    referenced[n] = v
        # only Vars used as m[...] count: collect names subscripted on the match parameter
        params = code.co_varnames[:code.co_argcount]
        if len(params) <= match_param:
            return
        m_name = params[match_param]
        used_vars, used_attrs = _match_uses(code, m_name)
        for n in sorted(used_vars):
            v = referenced.get(n)
            if v is not None and v not in self.vars:
                line = used_vars[n]
                raise self._err(f"uses {m_name}[{n}] but the pattern never binds Var {v.name!r}", fn, line)
        for attr, line in sorted(used_attrs.items()):
            if attr in Match._METHODS or attr.startswith("_"):
                continue
            if attr not in self.node_names:
                known = ", ".join(sorted(self.node_names)) or "none"
                raise self._err(f"uses {m_name}.{attr} but the pattern names no node {attr!r} "
                                f"(named nodes: {known}; name one with name='{attr}')", fn, line)

    def __repr__(self):
        return f"Rule({self.name!r})"


def _code_objects(code: types.CodeType):
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _code_objects(c)


def _match_uses(code: types.CodeType, m_name: str) -> tuple[dict[str, int], dict[str, int]]:
    """Names subscripted as ``m[NAME]`` / passed to m.get/m.value, and attributes read as ``m.ATTR``.

    Read from bytecode (``dis``) so it works for any function, including lambdas.
    """
    subs: dict[str, int] = {}
    attrs: dict[str, int] = {}
    ins = list(dis.get_instructions(code))
    line = code.co_firstlineno
    for i, inst in enumerate(ins):
        if inst.positions is not None and inst.positions.lineno:
            line = inst.positions.lineno
        if inst.opname in ("LOAD_FAST", "LOAD_DEREF", "LOAD_FAST_BORROW") and inst.argval == m_name:
            nxt = ins[i + 1] if i + 1 < len(ins) else None
            if nxt is None:
                continue
            if nxt.opname in ("LOAD_ATTR", "LOAD_METHOD"):
                attrs.setdefault(nxt.argval, line)
                if nxt.argval in ("get", "value", "shape", "dtype", "const") and i + 2 < len(ins):
                    a = ins[i + 2]
                    if a.opname in ("LOAD_GLOBAL", "LOAD_DEREF", "LOAD_FAST", "LOAD_NAME"):
                        subs.setdefault(a.argval, line)
            elif nxt.opname in ("LOAD_GLOBAL", "LOAD_DEREF", "LOAD_FAST", "LOAD_NAME") and i + 2 < len(ins) \
                    and ins[i + 2].opname in ("BINARY_SUBSCR", "BINARY_OP"):
                subs.setdefault(nxt.argval, line)
        elif inst.opname == "LOAD_FAST_LOAD_FAST" and isinstance(inst.argval, tuple) and inst.argval[0] == m_name:
            if i + 1 < len(ins) and ins[i + 1].opname in ("BINARY_SUBSCR", "BINARY_OP"):
                subs.setdefault(inst.argval[1], line)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            s2, a2 = _match_uses(c, m_name)
            for k, v in s2.items():
                subs.setdefault(k, v)
            for k, v in a2.items():
                attrs.setdefault(k, v)
    return subs, attrs


class RuleSet:
    """Rules indexed by the (domain, op type) at their pattern root.

    A rule is only tried at nodes of its root op type; wildcard rules
    (``op.any_op``) are tried at every node after the indexed ones.

    Raises:
        RuleDefinitionError: two rules with the same name.
    """

    def __init__(self, rules: Iterable[Rule] = (), name: str = "rules"):
        self.name = name
        self.rules: list[Rule] = []
        self._index: dict[tuple[str, str], list[Rule]] = {}
        self._wild: list[Rule] = []
        for r in rules:
            self.add(r)

    def add(self, rule: Rule) -> None:
        if not isinstance(rule, Rule):
            raise RuleDefinitionError(f"{rule!r} is not a Rule")
        if any(r.name == rule.name for r in self.rules):
            raise RuleDefinitionError(f"rule {rule.name!r} ({rule.where}) is defined twice in rule set "
                                      f"{self.name!r}")
        self.rules.append(rule)
        if rule.roots[0].is_wildcard:
            self._wild.append(rule)
        else:
            self._index.setdefault(rule.root_key, []).append(rule)

    def for_node(self, domain: str, op_type: str) -> list[Rule]:
        got = self._index.get((domain, op_type))
        if got is None:
            return self._wild
        return got + self._wild if self._wild else got

    def __iter__(self):
        return iter(self.rules)

    def __len__(self):
        return len(self.rules)

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet([*self.rules, *other.rules], name=f"{self.name}+{other.name}")
