"""The pattern language: what a rule matches.

A pattern is a tree of :class:`PatternNode` built with ONNX op names::

    x, w, b = Var("x"), Const("w"), Const("b")
    pattern = op.Conv(x, w, op.optional(b), name="conv")

- :class:`Var` matches any value; :class:`Const` only a compile-time constant
  (initializer or ``Constant`` node), optionally passing a predicate.
- ``op.optional(v)`` matches an absent optional input as well.
- Keyword arguments are attribute patterns: a literal (compared with the
  schema default when the attribute is absent), a callable predicate, or
  :class:`Attr` to bind the value.
- ``name=`` binds the matched node, reachable in checks as ``m.<name>``.
- A pattern node with several outputs is indexed: ``op.Split(x, _outputs=2)[1]``.
- ``op.domain("com.microsoft").FusedMatMul(...)`` matches ops of other domains;
  ``op.any_op(name="n")`` matches any node (rules indexed under ``*``).

Op names of known domains are checked against ``onnx.defs`` when the pattern is
written, so a typo fails at definition time with the file and line.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

import onnx.defs

# ONNX ops whose first two inputs commute (ai.onnx): matched in both orders.
COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal",
                         "BitwiseAnd", "BitwiseOr", "BitwiseXor"})

# Domains whose op names are checked against onnx.defs.
_SCHEMA_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training")


class PatternError(ValueError):
    """A malformed pattern or rule, raised where it is written (file:line in the message)."""


def caller_location(depth: int = 2) -> str:
    """``file:line`` of the user code ``depth`` frames up, skipping graft's own modules."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back
        while frame is not None and frame.f_globals.get("__name__", "").startswith("graft.compiler."):
            frame = frame.f_back
        if frame is None:
            return "<unknown>"
        return f"{frame.f_code.co_filename}:{frame.f_lineno}"
    finally:
        del frame


class Var:
    """A pattern variable bound to any value (or ``None`` under ``op.optional``).

    Args:
        name: shown in explanations.
        where: optional predicate ``Value -> bool``.
    """

    const = False

    def __init__(self, name: str, where: Callable | None = None):
        self.name = name
        self.where = where

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


class Const(Var):
    """A pattern variable that matches only a compile-time constant.

    In a match, ``m[c]`` is then the read-only numpy array.

    Args:
        name: shown in explanations.
        where: optional predicate ``np.ndarray -> bool`` (e.g. ``lambda a: a.size == 1``).
    """

    const = True


def variables(names: str, *, const: bool = False) -> tuple[Var, ...]:
    """``x, w = variables("x w")`` — several :class:`Var` (or :class:`Const`) at once."""
    cls = Const if const else Var
    return tuple(cls(n) for n in names.split())


class Attr:
    """Binds an attribute's value (schema default when absent) under ``name``; read it as ``m.attr(name)``."""

    def __init__(self, name: str, where: Callable | None = None):
        self.name = name
        self.where = where

    def __repr__(self):
        return f"Attr({self.name!r})"


class Optional:
    """An input that may be absent; wraps a Var or PatternNode."""

    def __init__(self, inner):
        self.inner = inner

    def __repr__(self):
        return f"optional({self.inner!r})"


class PatternNode:
    """One op in a pattern. Built through ``op``, never directly."""

    def __init__(self, op_type: str, domain: str, inputs: tuple, attrs: dict, name: str | None,
                 num_outputs: int, where: str, variadic: bool = False):
        self.op_type = op_type
        # variadic: the node may have more inputs than the pattern lists (the rule reads the rest)
        self.variadic = variadic
        self.domain = domain
        self.inputs = inputs
        self.attrs = attrs
        self.name = name
        self.num_outputs = num_outputs
        self.where = where  # file:line it was written at
        self.commutative = domain in ("", "ai.onnx") and op_type in COMMUTATIVE
        for i, a in enumerate(inputs):
            if not isinstance(a, (Var, PatternNode, PatternOutput, Optional)):
                raise PatternError(f"{where}: input {i} of pattern op {op_type} is {a!r}; "
                                   f"expected a Var, Const, op.optional(...) or another op(...)")

    def __getitem__(self, i: int) -> "PatternOutput":
        if not 0 <= i < self.num_outputs:
            raise PatternError(f"{self.where}: {self.op_type} pattern has {self.num_outputs} outputs "
                               f"(pass _outputs=N to use output {i})")
        return PatternOutput(self, i)

    @property
    def is_wildcard(self) -> bool:
        return self.op_type == "*"

    def walk(self):
        """Pattern nodes of this tree, root first."""
        yield self
        for a in self.inputs:
            inner = a.inner if isinstance(a, Optional) else a
            if isinstance(inner, PatternOutput):
                inner = inner.node
            if isinstance(inner, PatternNode):
                yield from inner.walk()

    def __repr__(self):
        return f"op.{self.op_type}(...)"


class PatternOutput:
    """Output ``index`` of a multi-output pattern node."""

    def __init__(self, node: PatternNode, index: int):
        self.node = node
        self.index = index


def _known_ops(domain: str) -> set[str]:
    return {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == domain}


_KNOWN_CACHE: dict[str, set[str]] = {}


def check_op_name(op_type: str, domain: str, where: str) -> None:
    """Raise :class:`PatternError` if ``op_type`` is not an op of a schema-checked domain."""
    if domain not in _SCHEMA_DOMAINS:
        return
    d = "" if domain == "ai.onnx" else domain
    if onnx.defs.has(op_type, d):
        return
    known = _KNOWN_CACHE.setdefault(d, _known_ops(d))
    close = difflib.get_close_matches(op_type, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PatternError(f"{where}: unknown ONNX op {op_type!r} in domain {d or 'ai.onnx'!r}{hint} "
                       f"(use op.domain('my.domain').{op_type} for custom ops)")


_SIGNATURES: dict[tuple[str, str], tuple[int, set[str]]] = {}
_SCHEMAS_BY_OP: dict[tuple[str, str], list] = {}


def _signature(op_type: str, domain: str) -> tuple[int, set[str]]:
    """(most inputs, attribute names) over every version of an op's schema."""
    key = (op_type, domain)
    if key not in _SIGNATURES:
        if not _SCHEMAS_BY_OP:
            # one pass over onnx.defs (a few ms) instead of one per op a rule file uses
            for s in onnx.defs.get_all_schemas_with_history():
                _SCHEMAS_BY_OP.setdefault((s.name, s.domain), []).append(s)
        most, attrs = 0, set()
        for s in _SCHEMAS_BY_OP.get(key, ()):
            most = max(most, s.max_input)
            attrs.update(s.attributes)
        _SIGNATURES[key] = (most, attrs)
    return _SIGNATURES[key]


def check_signature(op_type: str, domain: str, n_inputs: int, attrs: dict, where: str) -> None:
    """Raise :class:`PatternError` for more inputs than any version of the op takes, or an
    attribute no version defines — such a pattern could never match."""
    if domain not in _SCHEMA_DOMAINS:
        return
    most, known = _signature(op_type, "" if domain == "ai.onnx" else domain)
    if n_inputs > most:
        raise PatternError(f"{where}: pattern op {op_type} has {n_inputs} inputs, but {op_type} takes at most "
                           f"{most} in any opset; the pattern could never match")
    for a in attrs:
        if a not in known:
            close = difflib.get_close_matches(a, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (it has: {', '.join(sorted(known)) or 'none'})"
            raise PatternError(f"{where}: {op_type} has no attribute {a!r} in any opset{hint}")


class _OpFactory:
    """``op.Conv(...)`` builds a :class:`PatternNode` for ONNX op ``Conv``."""

    def __init__(self, domain: str = ""):
        self._domain = domain

    def __getattr__(self, op_type: str):
        if op_type.startswith("_"):
            raise AttributeError(op_type)
        return self(op_type)

    def __call__(self, op_type: str):
        """``op.domain("aten")("convolution.default")``: an op whose name is not an identifier.

        The returned builder takes inputs, ``name=``, ``_outputs=N``, attribute patterns, and
        ``_variadic=True`` to match nodes with more inputs than the pattern lists.
        """
        where = caller_location()
        check_op_name(op_type, self._domain, where)
        domain = self._domain

        def make(*inputs, name: str | None = None, _outputs: int = 1, _variadic: bool = False,
                 **attrs) -> PatternNode:
            where = caller_location()
            check_signature(op_type, domain, len(inputs), attrs, where)
            return PatternNode(op_type, domain, inputs, attrs, name, _outputs, where, _variadic)

        return make

    def domain(self, domain: str) -> "_OpFactory":
        """Ops of another domain (``com.microsoft``, ``aten``, a user domain)."""
        return _OpFactory(domain)

    @staticmethod
    def optional(inner) -> Optional:
        """An input that may be absent (``""`` in ONNX or a missing trailing input)."""
        return Optional(inner)

    @staticmethod
    def any_op(*inputs, name: str | None = None, where: Callable | None = None) -> PatternNode:
        """Any node (inputs unconstrained unless given); ``where(node) -> bool`` filters."""
        pn = PatternNode("*", "*", inputs, {}, name, 1, caller_location())
        pn.node_where = where
        return pn


op = _OpFactory()


def pattern_roots(pattern) -> tuple[PatternNode, ...]:
    """Normalize a rule's pattern (a node, an output, or a tuple of them) to its root nodes."""
    items = pattern if isinstance(pattern, (tuple, list)) else (pattern,)
    roots = []
    for p in items:
        if isinstance(p, PatternOutput):
            p = p.node
        if not isinstance(p, PatternNode):
            raise PatternError(f"a pattern must be built from op.<OpType>(...), got {p!r}")
        roots.append(p)
    return tuple(roots)


def bound_names(roots) -> tuple[set, set, set]:
    """(vars, node names, attr binding names) a pattern binds."""
    vs, names, attrs = set(), set(), set()

    def visit_arg(a):
        if isinstance(a, Optional):
            a = a.inner
        if isinstance(a, PatternOutput):
            a = a.node
        if isinstance(a, Var):
            vs.add(a)

    for r in roots:
        for pn in r.walk():
            if pn.name:
                names.add(pn.name)
            for a in pn.inputs:
                visit_arg(a)
            for v in pn.attrs.values():
                if isinstance(v, Attr):
                    attrs.add(v.name)
    return vs, names, attrs


def attr_default(op_type: str, domain: str, opset: int, name: str) -> Any:
    """The schema default of an attribute, or None (``onnx.defs``)."""
    return _attr_default_cached(op_type, domain, opset, name)


_DEFAULTS: dict[tuple, Any] = {}


def _attr_default_cached(op_type, domain, opset, name):
    key = (op_type, domain, opset, name)
    if key in _DEFAULTS:
        return _DEFAULTS[key]
    val = None
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
        a = schema.attributes.get(name)
        if a is not None and a.default_value is not None and a.default_value.type:
            val = onnx.helper.get_attribute_value(a.default_value)
            if isinstance(val, bytes):
                val = val.decode()
    except Exception:  # unknown op/domain/opset: no default
        val = None
    _DEFAULTS[key] = val
    return val
