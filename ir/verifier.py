"""Structural checks of an IR :class:`~ir.Model` (the torch.fx ``Graph.lint`` idea).

:func:`problems` lists everything wrong; :func:`verify` raises :class:`VerifyError`
with all of it. Each message says what broke, where (graph, node name, op type,
input index) and what to do. Checked, in every graph and subgraph:

- order: a node reads a value produced by a later node of its graph (out of
  topological order), or nodes form a cycle;
- dangling values: a node or graph output reads a value that no enclosing scope
  defines (a removed producer, a value of a sibling subgraph, a value never added);
- duplicate value names, model-wide (ONNX's SSA rule covers subgraphs too);
- use-def consistency: every ``(node, i)`` in a value's uses really reads the
  value at input ``i``, every input is in its value's uses, and every output
  points back at its producer;
- initializers keyed by their own name;
- op arity against the ``onnx.defs`` schema of the model's opset for the node's
  domain: input and output counts within [min, max] (variadic handled) and no
  required input absent. Ops of unknown domains or unknown to ``onnx.defs`` are
  skipped: an unknown op is never an error.
"""
from __future__ import annotations

from graft.ir._core import Graph, IRError, Model, Node, Value

# Domains whose ops are checked against onnx.defs (others pass through untouched).
_SCHEMA_DOMAINS = {"": "", "ai.onnx": "", "ai.onnx.ml": "ai.onnx.ml",
                   "ai.onnx.preview.training": "ai.onnx.preview.training"}


class VerifyError(IRError):
    """The IR is inconsistent. ``problems`` holds one message per fault."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = f"IR verification found {len(problems)} problem(s):"
        super().__init__("\n".join([head, *("  - " + p for p in problems)]))


def verify(model: Model | Graph) -> None:
    """Raise :class:`VerifyError` listing every structural problem of ``model``.

    Args:
        model: a :class:`Model` (or a top-level :class:`Graph`, checked without
            op arity since a bare graph has no opset).

    Raises:
        VerifyError: one or more problems (see :func:`problems`).
    """
    found = problems(model)
    if found:
        raise VerifyError(found)


def problems(model: Model | Graph) -> list[str]:
    """Every structural problem of ``model``, as readable messages (empty when sound)."""
    if isinstance(model, Model):
        graph, opsets = model.graph, dict(model.opset_imports)
    elif isinstance(model, Graph):
        graph, opsets = model, {}
        if graph.model is not None:
            opsets = dict(graph.model.opset_imports)
    else:
        raise TypeError(f"verify() takes an ir.Model or ir.Graph, got {type(model).__name__}")
    v = _Verifier(opsets)
    v.check_graph(graph, outer=())
    v.check_names()
    return v.out


def _node_desc(node: Node) -> str:
    dom = f"{node.domain}::" if node.domain else ""
    return f"node {node.name!r} ({dom}{node.op_type})"


class _Verifier:
    def __init__(self, opsets: dict[str, int]):
        self.opsets = opsets
        self.out: list[str] = []
        # value name -> where defined: a text, or (output index, node, graph text) for node outputs,
        # formatted only when the name turns out to be defined twice
        self.names: dict[str, list] = {}
        self.seen_values: dict[Value, None] = {}
        self._schemas: dict[tuple, object] = {}
        self._arities: dict[tuple, tuple | None] = {}

    # -- graphs ---------------------------------------------------------------
    def check_graph(self, g: Graph, outer: tuple[dict, ...]) -> None:
        """``outer``: dicts of values visible from enclosing graphs (value -> None)."""
        gname = f"graph {g.name!r}"
        nodes = self._linked_nodes(g)
        defined: dict[Value, None] = {}
        for v in g.inputs:
            if g.parent is None and v.dtype is None and v.type_proto is None:
                self.out.append(f"{gname}: graph input {v.name!r} has no type; ONNX requires one — set "
                                f"value.dtype/shape")
            self._define(v, g, f"input of {gname}")
            defined[v] = None
        for name, v in g.initializers.items():
            if v.name != name:
                self.out.append(f"{gname}: initializer stored under {name!r} is named {v.name!r}; "
                                f"rename through the graph (re-key graph.initializers) so the two agree")
            if v.const is None:
                self.out.append(f"{gname}: initializer {v.name!r} holds no tensor; give it a Tensor "
                                f"or make it a graph input")
            if v not in defined:
                self._define(v, g, f"initializer of {gname}")
                defined[v] = None
        scope = (*outer, defined)
        position: dict[Node, int] = {}  # filled on the first out-of-scope read (rare)
        out, seen, names, arity = self.out, self.seen_values, self.names, self._arity
        # The loop below runs once per node of every model a compile checks: messages (and the
        # `where` text they start with) are built only when something is wrong.
        for n in nodes:
            ins = n._inputs
            spec = arity(n)
            if spec is not None and not (spec[0] <= len(ins) <= spec[1] and spec[2] <= len(n.outputs) <= spec[3]
                                         and (not spec[4] or None not in ins)):
                self.check_arity(n, _where(n, gname))
            i = 0
            for v in ins:
                if v is not None:
                    if v not in defined and not any(v in s for s in outer):
                        if not position:
                            position.update((m, k) for k, m in enumerate(nodes))
                        self._check_read(v, n, i, g, position, scope, _where(n, gname))
                    if (n, i) not in v._uses:
                        out.append(f"{_where(n, gname)}: input {i} reads {v.name!r}, but that value's use list "
                                   f"lacks ({n.name!r}, {i}); edit inputs only through "
                                   f"Node.set_input/replace_inputs")
                i += 1
            if n.attrs:
                for sg in n.subgraphs():
                    if sg.parent is not g:
                        out.append(f"{_where(n, gname)}: subgraph {sg.name!r} has parent "
                                   f"{getattr(sg.parent, 'name', None)!r}, expected {g.name!r}; "
                                   f"create subgraphs with Graph(parent=...)")
                    # names defined later in this graph are not visible yet: the subgraph sees `defined` now
                    self.check_graph(sg, (*outer, dict(defined)))
            k = 0
            for o in n.outputs:
                if o.producer is not n or o.index != k:
                    prod = o.producer.name if o.producer is not None else None
                    out.append(f"{_where(n, gname)}: output {k} {o.name!r} records producer {prod!r} index "
                               f"{o.index}; build nodes with Node(outputs=...) so both sides agree")
                if o.name and o not in seen:  # _define, inlined: one call per output is measurable
                    seen[o] = None
                    wheres = names.get(o.name)
                    if wheres is None:
                        names[o.name] = [(k, n, gname)]
                    else:
                        wheres.append((k, n, gname))
                defined[o] = None
                k += 1
        for k, v in enumerate(g.outputs):
            if g.parent is None and v.dtype is None and v.type_proto is None:
                self.out.append(f"{gname}: graph output {k} {v.name!r} has no type; ONNX requires one — set "
                                f"value.dtype/shape or run graft.ir.shapes.infer_shapes(model)")
            if not any(v in s for s in scope):
                self.out.append(f"{gname}: graph output {k} {v.name!r} is not defined in this graph or "
                                f"an enclosing one{self._dangling_hint(v)}; point the output at a live "
                                f"value (Graph.replace_output)")
        self._check_uses(g, nodes)

    def _linked_nodes(self, g: Graph) -> list[Node]:
        nodes, seen = [], set()
        for n in g:
            if n in seen:
                self.out.append(f"graph {g.name!r}: the node list loops back to {_node_desc(n)}; "
                                f"insert nodes only with Graph.append/insert_before")
                break
            seen.add(n)
            nodes.append(n)
            if n.graph is not g:
                self.out.append(f"{_node_desc(n)} is linked into graph {g.name!r} but records graph "
                                f"{getattr(n.graph, 'name', None)!r}")
        if len(nodes) != len(g):
            self.out.append(f"graph {g.name!r}: holds {len(nodes)} linked nodes but counts {len(g)}")
        return nodes

    def _check_read(self, v: Value, n: Node, i: int, g: Graph, position: dict, scope, where: str) -> None:
        if any(v in s for s in scope):
            return
        p = v.producer
        if p is not None and p.graph is g and p in position:
            later = position[p] > position[n]
            kind = "a cycle through" if self._reaches(n, p) else "a later node,"
            if later:
                self.out.append(f"{where}: input {i} reads {v.name!r} before it is defined (produced by "
                                f"{kind} {_node_desc(p)}); the graph is out of topological order — call "
                                f"Graph.sort(), or break the cycle")
                return
        # an outer-scope value not yet defined at the point the subgraph's owner runs
        owner = v.graph
        if p is not None and owner is not None and owner is not g and p.graph is owner and \
                self._is_ancestor(owner, g):
            self.out.append(f"{where}: input {i} reads outer-scope value {v.name!r} of graph "
                            f"{owner.name!r}, which is produced after the node holding this subgraph; "
                            f"move {_node_desc(p)} earlier (Graph.sort())")
            return
        self.out.append(f"{where}: input {i} reads {v.name!r}, which is not defined in this graph or an "
                        f"enclosing one{self._dangling_hint(v)}; rewire the input "
                        f"(Node.set_input) to a live value")

    @staticmethod
    def _is_ancestor(a: Graph, g: Graph) -> bool:
        h = g.parent
        while h is not None:
            if h is a:
                return True
            h = h.parent
        return False

    @staticmethod
    def _reaches(src: Node, dst: Node) -> bool:
        """True when ``dst`` depends (transitively, same graph) on ``src``: a cycle src -> ... -> dst -> src."""
        stack, seen = [dst], set()
        while stack:
            n = stack.pop()
            if n is src:
                return True
            if n in seen:
                continue
            seen.add(n)
            for v in n.inputs:
                if v is not None and v.producer is not None and v.producer.graph is src.graph:
                    stack.append(v.producer)
        return False

    @staticmethod
    def _dangling_hint(v: Value) -> str:
        p = v.producer
        if p is not None and p.graph is None:
            return f" (its producer {_node_desc(p)} was removed)"
        if p is None and v.graph is None:
            return " (the value was never added to a graph)"
        if v.graph is not None:
            return f" (it belongs to graph {v.graph.name!r}, not an enclosing scope)"
        return ""

    # -- use-def --------------------------------------------------------------
    def _check_uses(self, g: Graph, nodes: list[Node]) -> None:
        values: dict[Value, None] = dict.fromkeys(g.inputs)
        values.update(dict.fromkeys(g.initializers.values()))
        for n in nodes:
            for o in n.outputs:
                values[o] = None
        for v in values:
            for (user, i) in v._uses:
                ins = user._inputs
                if user.graph is not None and i < len(ins) and ins[i] is v:
                    continue
                state = "is in no graph (removed, or never added)" if user.graph is None else \
                    f"reads {_name(ins[i]) if i < len(ins) else 'nothing'} there"
                self.out.append(f"graph {g.name!r}: value {v.name!r} lists use ({user.name!r} "
                                f"{user.op_type}, input {i}), but that node {state}; edit inputs "
                                f"only through Node.set_input/replace_inputs and remove nodes "
                                f"with Graph.remove")

    # -- names ----------------------------------------------------------------
    def _define(self, v: Value, g: Graph, where: str) -> None:
        if v in self.seen_values:
            return
        self.seen_values[v] = None
        if v.name:
            self.names.setdefault(v.name, []).append(where)

    def check_names(self) -> None:
        for name, wheres in self.names.items():
            if len(wheres) > 1:
                wheres = [w if isinstance(w, str) else f"output {w[0]} of {_where(w[1], w[2])}" for w in wheres]
                self.out.append(f"value name {name!r} is defined {len(wheres)} times ({'; '.join(wheres)}); "
                                f"ONNX names are model-wide SSA — rename with Graph.unique_name")

    # -- arity ----------------------------------------------------------------
    def check_arity(self, n: Node, where: str) -> None:
        schema = self._schema(n)
        if schema is None:
            return
        n_in, n_out = len(n.inputs), len(n.outputs)
        src = f"onnx.defs {n.op_type}-{schema.since_version}"
        if not schema.min_input <= n_in <= schema.max_input:
            self.out.append(f"{where}: has {n_in} input(s), {src} takes {_range(schema.min_input, schema.max_input)}; "
                            f"fix the node's inputs")
        if not schema.min_output <= n_out <= schema.max_output:
            self.out.append(f"{where}: has {n_out} output(s), {src} gives "
                            f"{_range(schema.min_output, schema.max_output)}; fix the node's outputs")
        import onnx.defs

        single = onnx.defs.OpSchema.FormalParameterOption.Single
        for i, v in enumerate(n.inputs):
            if v is None and i < len(schema.inputs) and schema.inputs[i].option == single:
                self.out.append(f"{where}: required input {i} ({schema.inputs[i].name}) is absent; "
                                f"connect a value")

    def _arity(self, n: Node) -> tuple | None:
        """``(min_in, max_in, min_out, max_out, has_required_input)`` of ``n``'s schema, cached per op."""
        key = (n.domain, n.op_type)
        try:
            return self._arities[key]
        except KeyError:
            pass
        schema = self._schema(n)
        spec = None
        if schema is not None:
            import onnx.defs

            single = onnx.defs.OpSchema.FormalParameterOption.Single
            spec = (schema.min_input, schema.max_input, schema.min_output, schema.max_output,
                    any(p.option == single for p in schema.inputs))
        self._arities[key] = spec
        return spec

    def _schema(self, n: Node):
        dom = _SCHEMA_DOMAINS.get(n.domain)
        if dom is None:
            return None
        version = self.opsets.get(n.domain)
        if version is None and dom == "":
            version = self.opsets.get("ai.onnx" if n.domain == "" else "")
        if version is None:
            return None
        key = (n.op_type, dom, version)
        if key not in self._schemas:
            import onnx.defs

            try:
                self._schemas[key] = onnx.defs.get_schema(n.op_type, version, dom)
            except onnx.defs.SchemaError:
                self._schemas[key] = None
        return self._schemas[key]


def _where(n: Node, gname: str) -> str:
    return f"{_node_desc(n)} in {gname}"


def _name(v: Value | None) -> str:
    return "nothing" if v is None else repr(v.name)


def _range(lo: int, hi: int) -> str:
    if hi >= 2**31 - 1:
        return f"at least {lo}"
    return str(lo) if lo == hi else f"{lo}..{hi}"
