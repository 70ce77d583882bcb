"""graft's in-memory IR: Model, Graph, Node, Value, Tensor.

Op names and domains are ONNX's (domain ``""`` is ai.onnx). Use-def chains are
kept automatically: every :class:`Value` knows its producer and its uses, and
every edit made through :class:`Node` / :class:`Graph` methods updates both
sides, so rules never fix bookkeeping by hand (the torch.fx ``Graph`` model).

A graph's nodes live in a doubly linked list, so inserting before a node and
removing a node are O(1) whatever the graph size; that is what lets a rewrite
cost the same per node at 1k and 100k nodes.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterator, Sequence

import numpy as np

from graft.ir.dtypes import DataType, dtype_of
from graft.ir.tensor_proto import array_to_proto, tensor_proto_to_array


class IRError(ValueError):
    """An edit that would leave the IR inconsistent (what broke, where)."""


# --------------------------------------------------------------------------- Tensor
class Tensor:
    """Constant data: an initializer or a Constant node's value.

    The array is produced lazily from the ONNX ``TensorProto`` it was loaded from,
    and an unmodified tensor is written back from that same proto, so a load→save
    round trip is bit-identical (external data and all).

    Attributes:
        dtype: ONNX element type (:class:`graft.ir.dtypes.DataType`).
        shape: dims as a tuple of ints.
    """

    __slots__ = ("_array", "_proto", "dtype", "shape", "doc_string")

    def __init__(self, array: np.ndarray | None = None, *, proto=None, dtype: DataType | None = None):
        if array is None and proto is None:
            raise IRError("Tensor needs an array or a TensorProto")
        self._proto = proto
        self._array = None
        self.doc_string = ""
        if array is not None:
            array = np.asarray(array)
            array.setflags(write=False)  # shared constants are never changed in place
            self._array = array
            self.dtype = dtype if dtype is not None else DataType.from_numpy(array.dtype)
            self.shape = array.shape  # a tuple of Python ints already
        else:
            self.dtype = dtype_of(proto.data_type)
            self.shape = tuple(proto.dims)  # protobuf gives Python ints

    @property
    def array(self) -> np.ndarray:
        """The data as a read-only numpy array (ml_dtypes for bf16/fp8/int4)."""
        arr = self._array
        if arr is None:
            arr = self._array = tensor_proto_to_array(self._proto, self.shape)  # read-only
        return arr

    @property
    def proto(self):
        return self._proto

    def to_proto(self, name: str):
        """The ``onnx.TensorProto`` named ``name``: the one loaded from while unmodified (so a
        load→save round trip is bit-identical), else one built from the array and kept."""
        p = self._proto
        if p is None:
            p = self._proto = array_to_proto(self.array, self.dtype, name)
            if self.doc_string:
                p.doc_string = self.doc_string
        elif p.name != name:
            p.name = name
        return p

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact Python ints; np.prod costs microseconds per call

    @property
    def nbytes(self) -> int:
        return (self.size * self.dtype.bitwidth + 7) // 8

    def __repr__(self) -> str:
        return f"Tensor({self.dtype.name}, {list(self.shape)})"


# --------------------------------------------------------------------------- Value
class Value:
    """An SSA value: a graph input, an initializer, or a node output.

    Attributes:
        name: unique within the model.
        dtype: ONNX element type or None when unknown.
        shape: tuple of dims (int for static, str for symbolic, None for unknown),
            or None when the rank is unknown.
        producer: the :class:`Node` whose output this is, or None.
        const: the :class:`Tensor` for an initializer, else None.
    """

    __slots__ = ("name", "dtype", "shape", "producer", "index", "const", "_uses", "graph",
                 "type_proto", "doc_string", "meta", "__weakref__")

    def __init__(self, name: str, dtype: DataType | None = None, shape: Sequence | None = None, *,
                 const: Tensor | None = None):
        self.name = name
        self.dtype = dtype
        self.shape = tuple(shape) if shape is not None else None
        self.producer: Node | None = None
        self.index = 0
        self.const = const
        self._uses: dict[tuple[Node, int], None] = {}
        self.graph: Graph | None = None
        self.type_proto = None  # non-tensor types (sequence, optional, map) kept verbatim
        self.doc_string = ""
        self.meta: dict[str, Any] = {}
        if const is not None:
            self.dtype = const.dtype if dtype is None else dtype
            self.shape = const.shape

    # uses ---------------------------------------------------------------
    def uses(self) -> list[tuple["Node", int]]:
        """(node, input index) pairs reading this value, in insertion order."""
        return list(self._uses)

    def users(self) -> list["Node"]:
        """Distinct nodes reading this value, in insertion order."""
        return list(dict.fromkeys(n for n, _ in self._uses))

    @property
    def num_uses(self) -> int:
        return len(self._uses)

    def is_graph_input(self) -> bool:
        return self.graph is not None and self.producer is None and self.const is None and \
            self in self.graph._input_set

    def is_graph_output(self) -> bool:
        g = self.graph
        return g is not None and self in g._output_set

    def constant(self) -> np.ndarray | None:
        """The value's data when it is known at compile time, else None.

        Initializers and outputs of ``Constant`` nodes (with a ``value`` attribute)
        are constants; graph inputs that also have an initializer are *not*, since
        ONNX lets the caller override them.
        """
        if self.const is not None:
            if self.graph is not None and self in self.graph._input_set:
                return None
            return self.const.array
        p = self.producer
        if p is not None and p.op_type == "Constant" and p.domain == "":
            t = p.attrs.get("value")
            if isinstance(t, Tensor):
                return t.array
            return constant_node_array(p)
        return None

    def replace_all_uses_with(self, other: "Value") -> None:
        """Point every reader of this value at ``other``, graph outputs included."""
        if other is self:
            return
        for node, i in list(self._uses):
            node.set_input(i, other)
        g = self.graph
        if g is not None and self in g._output_set:
            g.replace_output(self, other)

    def __repr__(self) -> str:
        return f"Value({self.name!r})"


def constant_node_array(node: "Node") -> np.ndarray | None:
    """The value of a ``Constant`` node given by any of its ``value_*`` attributes (ONNX Constant-13)."""
    a = node.attrs
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    if "value_string" in a:
        return np.array(a["value_string"], dtype=object)
    if "value_strings" in a:
        return np.array(a["value_strings"], dtype=object)
    return None


# --------------------------------------------------------------------------- Node
class Node:
    """An operator application.

    Attributes:
        op_type: ONNX op name (``"Conv"``) or an ATen overload in domain ``aten``.
        domain: ``""`` for ai.onnx, else the domain string.
        attrs: attribute name → Python value (int, float, str, bytes, Tensor,
            Graph, or lists of those).
        meta: free-form metadata; ``metadata_props`` in ONNX (strings only are
            exported). graft writes ``graft.rule`` / ``graft.replaced`` here.
    """

    __slots__ = ("op_type", "domain", "name", "attrs", "attr_types", "_inputs", "outputs", "graph",
                 "meta", "doc_string", "overload", "_prev", "_next", "_order", "__weakref__")

    def __init__(self, op_type: str, inputs: Sequence[Value | None] = (), outputs: Sequence[Value] = (),
                 attrs: dict | None = None, *, domain: str = "", name: str = "", overload: str = ""):
        self.op_type = op_type
        self.domain = domain
        self.name = name
        self.overload = overload
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.attr_types: dict[str, int] = {}
        self.graph: Graph | None = None
        self.meta: dict[str, Any] = {}
        self.doc_string = ""
        self._prev = self._next = None
        self._order = 0
        outs = list(outputs)
        for v in outs:  # before anything points at this node
            if v.producer is not None:
                raise IRError(f"value {v.name!r} already has producer {v.producer.name!r}; "
                              f"cannot also be an output of new {op_type} node {name!r}")
        ins = self._inputs = list(inputs)  # rules build thousands of nodes: _append_input inlined
        for i, v in enumerate(ins):
            if v is not None:
                v._uses[(self, i)] = None
        for i, v in enumerate(outs):
            v.producer, v.index = self, i
        self.outputs = outs

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    def _append_input(self, v: Value | None) -> None:
        i = len(self._inputs)
        self._inputs.append(v)
        if v is not None:
            v._uses[(self, i)] = None

    def set_input(self, i: int, v: Value | None) -> None:
        old = self._inputs[i]
        if old is v:
            return
        if old is not None:
            old._uses.pop((self, i), None)
        self._inputs[i] = v
        if v is not None:
            v._uses[(self, i)] = None

    def replace_inputs(self, values: Sequence[Value | None]) -> None:
        self._drop_inputs()
        for v in values:
            self._append_input(v)

    def _drop_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.pop((self, i), None)
        self._inputs = []

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise IRError(f"{self.op_type} node {self.name!r} has {len(self.outputs)} outputs; use .outputs[i]")
        return self.outputs[0]

    def predecessors(self) -> list["Node"]:
        return list(dict.fromkeys(v.producer for v in self._inputs if v is not None and v.producer is not None))

    def successors(self) -> list["Node"]:
        return list(dict.fromkeys(u for o in self.outputs for u, _ in o._uses))

    def subgraphs(self) -> Iterator["Graph"]:
        for a in self.attrs.values():
            if isinstance(a, Graph):
                yield a
            elif isinstance(a, list):
                yield from (g for g in a if isinstance(g, Graph))

    def __repr__(self) -> str:
        dom = f"{self.domain}::" if self.domain else ""
        return f"Node({dom}{self.op_type} {self.name!r})"


# --------------------------------------------------------------------------- Graph
class Graph:
    """A list of nodes in topological order plus inputs, outputs and initializers.

    Subgraphs (If/Loop/Scan bodies) are Graphs too; their nodes may read values
    of enclosing graphs by reference.
    """

    def __init__(self, name: str = "graph", *, parent: "Graph | None" = None, model: "Model | None" = None):
        self.name = name
        self.parent = parent
        self._model = model
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self._input_set: dict[Value, None] = {}
        self._output_set: dict[Value, int] = {}
        self.initializers: dict[str, Value] = {}
        self._head: Node | None = None
        self._tail: Node | None = None
        self._count = 0
        self._order_counter = itertools.count()
        self.doc_string = ""
        self.value_info: dict[str, Any] = {}   # name -> ValueInfoProto kept for round trip
        self.sparse_initializers: list = []
        self.meta: dict[str, Any] = {}

    # model / naming -------------------------------------------------------
    @property
    def model(self) -> "Model | None":
        g = self
        while g.parent is not None:
            g = g.parent
        return g._model

    def _names(self) -> "NameScope":
        m = self.model
        if m is None:
            g = self
            while g.parent is not None:
                g = g.parent
            if not hasattr(g, "_fallback_names"):
                g._fallback_names = NameScope()
            return g._fallback_names
        return m.names

    def unique_name(self, hint: str) -> str:
        return self._names().fresh(hint)

    # inputs / outputs / initializers -----------------------------------------
    def add_input(self, v: Value) -> Value:
        v.graph = self
        self.inputs.append(v)
        self._input_set[v] = None
        self._names().claim(v.name)
        return v

    def set_outputs(self, values: Sequence[Value]) -> None:
        self.outputs = list(values)
        self._rebuild_output_set()

    def _rebuild_output_set(self) -> None:
        self._output_set = {}
        for v in self.outputs:
            self._output_set[v] = self._output_set.get(v, 0) + 1

    def replace_output(self, old: Value, new: Value) -> None:
        """Replace ``old`` by ``new`` among graph outputs, keeping the output's name.

        Graph-output names are the model's interface. When ``new`` is a node
        output of this graph used as no other output, it takes over the old name
        (``old`` is renamed); otherwise (a graph input, an initializer, a value
        already output) an ``Identity`` node carries the old name.
        """
        if old in self._input_set:
            raise IRError(f"cannot replace graph output {old.name!r} of graph {self.name!r}: it is also a "
                          f"graph input, and renaming it would change the model's inputs; route the "
                          f"output through an Identity node first")
        keep = old.name
        old.name = self.unique_name(keep + "_old")
        if self.initializers.get(keep) is old:  # keep initializers keyed by their own name
            del self.initializers[keep]
            self.initializers[old.name] = old
        if new.dtype is None and new.type_proto is None:
            # ONNX graph outputs must be typed; the replacement computes the same thing as `old`
            new.dtype, new.shape = old.dtype, old.shape
        if new.producer is not None and new.graph is self and new not in self._output_set:
            new.name = keep
            out = new
        else:
            out = Value(keep, new.dtype, new.shape)
            ident = Node("Identity", [new], [out], name=self.unique_name(keep + "_identity"))
            self._link(ident, None)
        self.outputs = [out if v is old else v for v in self.outputs]
        self._rebuild_output_set()

    def add_initializer(self, v: Value) -> Value:
        if v.const is None:
            raise IRError(f"initializer {v.name!r} has no tensor")
        v.graph = self
        self.initializers[v.name] = v
        self._names().claim(v.name)
        return v

    def make_constant(self, array: np.ndarray, hint: str = "const", dtype: DataType | None = None) -> Value:
        """A new initializer holding ``array`` (never aliases an existing one)."""
        name = self.unique_name(hint)
        v = Value(name, const=Tensor(np.array(array, copy=True), dtype=dtype))
        return self.add_initializer(v)

    # nodes -------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        n = self._head
        while n is not None:
            nxt = n._next
            yield n
            n = nxt

    def __len__(self) -> int:
        return self._count

    @property
    def nodes(self) -> list[Node]:
        return list(self)

    def _link(self, node: Node, before: Node | None, names_claimed: bool = False) -> None:
        if node.graph is not None:
            raise IRError(f"{node!r} already belongs to graph {node.graph.name!r}")
        node.graph = self
        if before is None:
            self._link_at_tail(node)
        else:
            if before.graph is not self:
                raise IRError(f"cannot insert before {before!r}: it is not in graph {self.name!r}")
            node._prev, node._next = before._prev, before
            if before._prev is not None:
                before._prev._next = node
            else:
                self._head = node
            before._prev = node
        node._order = next(self._order_counter)
        self._count += 1
        for o in node.outputs:
            o.graph = self
        if names_claimed:  # the rewriter's Builder took node and output names from the name scope
            return
        names = self._names()
        if not node.name and not getattr(self, "_importing", False):
            node.name = names.fresh(node.op_type)
        else:
            names.claim(node.name)
        for o in node.outputs:
            names.claim(o.name)

    def append(self, node: Node) -> Node:
        self._link(node, None)
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        self._link(node, anchor)
        return node

    def remove(self, node: Node, *, check_uses: bool = True) -> None:
        """Unlink ``node`` and drop it from its inputs' use lists.

        Raises:
            IRError: if an output is still read (by a node or as a graph output)
                and ``check_uses`` is true.
        """
        if node.graph is not self:
            raise IRError(f"{node!r} is not in graph {self.name!r}")
        if check_uses:
            for o in node.outputs:
                if o._uses or o in self._output_set:
                    users = [f"{u.op_type} node {u.name!r}" for u in o.users()]
                    if o in self._output_set:
                        users.append("graph output")
                    users = ", ".join(users)
                    raise IRError(f"cannot remove {node.op_type} node {node.name!r}: its output "
                                  f"{o.name!r} is still used by {users}")
        node._drop_inputs()
        if node._prev is not None:
            node._prev._next = node._next
        else:
            self._head = node._next
        if node._next is not None:
            node._next._prev = node._prev
        else:
            self._tail = node._prev
        node._prev = node._next = None
        node.graph = None
        self._count -= 1

    def sort(self) -> None:
        """Re-order nodes topologically, stable with respect to the current order.

        Needed only after rewrites whose replacement cannot be placed at a single
        anchor (several-output patterns). Uses networkx's lexicographic
        topological sort with the current position as key.

        Raises:
            IRError: if the graph has a cycle (names a node on it).
        """
        import networkx as nx

        nodes = self.nodes
        pos = {n: i for i, n in enumerate(nodes)}
        g = nx.DiGraph()
        g.add_nodes_from(range(len(nodes)))
        for n in nodes:
            for v in _all_inputs(n):
                p = v.producer
                if p is not None and p in pos:
                    g.add_edge(pos[p], pos[n])
        try:
            order = list(nx.lexicographical_topological_sort(g))
        except nx.NetworkXUnfeasible:
            cyc = nx.find_cycle(g)
            names = " -> ".join(nodes[a].name for a, _ in cyc)
            raise IRError(f"graph {self.name!r} has a cycle: {names}") from None
        self._head = self._tail = None
        for n in nodes:
            n._prev = n._next = None
        for i in order:
            n = nodes[i]
            self._link_at_tail(n)
            n._order = next(self._order_counter)

    def _link_at_tail(self, node: Node) -> None:
        """Put ``node`` last in the linked list (no bookkeeping beyond the links)."""
        node._prev, node._next = self._tail, None
        if self._tail is not None:
            self._tail._next = node
        else:
            self._head = node
        self._tail = node

    def all_graphs(self) -> Iterator["Graph"]:
        """This graph and every nested subgraph, depth first."""
        yield self
        # walks the node list directly: passes call this on every run, and most nodes
        # have no attributes, hence no subgraphs
        n = self._head
        while n is not None:
            nxt = n._next
            if n.attrs:
                for sg in n.subgraphs():
                    yield from sg.all_graphs()
            n = nxt

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self)} nodes)"


def _all_inputs(node: Node) -> Iterator[Value]:
    """Inputs of ``node`` including outer-scope values its subgraphs read."""
    for v in node._inputs:
        if v is not None:
            yield v
    for sg in node.subgraphs():
        for v in outer_scope_values(sg):
            yield v


def outer_scope_values(graph: Graph) -> list[Value]:
    """Values read inside ``graph`` (or deeper) that are defined outside it."""
    out: dict[Value, None] = {}
    for g in graph.all_graphs():
        for n in g:
            for v in n._inputs:
                if v is None:
                    continue
                owner = v.graph
                if owner is None:
                    continue
                h = owner
                inside = False
                while h is not None:
                    if h is graph:
                        inside = True
                        break
                    h = h.parent
                if not inside:
                    out[v] = None
    return list(out)


# --------------------------------------------------------------------------- names
class NameScope:
    """Model-wide name registry: ONNX wants value and node names unique, subgraphs included."""

    def __init__(self):
        self._used: set[str] = set()
        self._counters: dict[str, int] = {}

    def claim(self, name: str) -> None:
        self._used.add(name)

    def fresh(self, hint: str) -> str:
        hint = hint or "v"
        if hint not in self._used:
            self._used.add(hint)
            return hint
        k = self._counters.get(hint, 0)
        while True:
            k += 1
            cand = f"{hint}_{k}"
            if cand not in self._used:
                self._counters[hint] = k
                self._used.add(cand)
                return cand


# --------------------------------------------------------------------------- Model
class Model:
    """A graph plus the model-level facts ONNX keeps around it.

    Attributes:
        graph: the main :class:`Graph`.
        opset_imports: domain → version (``""`` is ai.onnx).
        ir_version, producer_name, producer_version, domain, model_version, doc_string.
        metadata_props: model-level string metadata.
        functions: model-local FunctionProtos, kept verbatim.
    """

    def __init__(self, graph: Graph | None = None, *, opset_imports: dict[str, int] | None = None,
                 ir_version: int = 10):
        self.names = NameScope()
        self.graph = graph if graph is not None else Graph(model=self)
        self.graph._model = self
        self.opset_imports: dict[str, int] = dict(opset_imports or {"": 17})
        self.ir_version = ir_version
        self.producer_name = "graft"
        self.producer_version = ""
        self.domain = ""
        self.model_version = 0
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        self.functions: list = []
        self.training_info: list = []
        self.meta: dict[str, Any] = {}

    @property
    def opset(self) -> int:
        return self.opset_imports.get("", self.opset_imports.get("ai.onnx", 1))

    def all_graphs(self) -> Iterator[Graph]:
        return self.graph.all_graphs()

    def all_nodes(self) -> Iterator[Node]:
        for g in self.all_graphs():
            yield from g

    def __repr__(self) -> str:
        return f"Model(opset={self.opset}, {len(self.graph)} nodes)"
