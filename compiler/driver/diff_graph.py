"""ONNX models flattened for diffing, their parameter sizes, and graft provenance read back.

A model's nodes (subgraphs included) become :class:`FlatNode` records keyed so
that the same node in two models gets the same key: ``(graph path, "name",
name)`` for a named node, ``(graph path, "op", domain, op type, outputs)`` for an
unnamed one. :func:`attribute_rewrites` reads ``graft.rule`` /
``graft.replaced`` (``NodeProto.metadata_props``, written by
:mod:`graft.compiler.engine.rewriter`) and ties each rewrite to the A nodes it replaced and
the producers it left without readers.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from graft.compiler.engine.rewriter import PROVENANCE_REPLACED, PROVENANCE_RULE, RECONNECTED_LOG
from graft.ir.dtypes import DataType

MAIN = "main"

# --------------------------------------------------------------------------- flattening
@dataclass
class FlatNode:
    """One NodeProto with where it sits; ``key`` identifies it across the two models."""

    graph: str
    proto: onnx.NodeProto
    key: tuple
    order: int

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def op(self) -> str:
        return op_label(self.proto)

    @property
    def label(self) -> str:
        """What graft's provenance calls this node: its name, else its first output's name."""
        p = self.proto
        return p.name or (p.output[0] if p.output else "")

    @property
    def meta(self) -> dict[str, str]:
        return {e.key: e.value for e in self.proto.metadata_props}


def op_label(p: onnx.NodeProto) -> str:
    return p.op_type if p.domain in ("", "ai.onnx") else f"{p.domain}::{p.op_type}"


@dataclass
class FlatModel:
    """All nodes of a model in graph order (a subgraph's nodes right after the node owning it),
    its initializers keyed ``(graph path, name)``, and who reads / produces each value name."""

    nodes: list[FlatNode] = field(default_factory=list)
    initializers: dict[tuple, onnx.TensorProto] = field(default_factory=dict)
    sparse: list = field(default_factory=list)
    readers: dict[str, list[FlatNode]] = field(default_factory=dict)
    producer: dict[str, FlatNode] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)
    # (rule, replaced labels) of rewrites that created nothing (model metadata "graft.reconnected")
    reconnected: list[tuple[str, str]] = field(default_factory=list)


def flatten(model: onnx.ModelProto) -> FlatModel:
    flat = FlatModel()
    seen: Counter = Counter()

    def walk(g: onnx.GraphProto, path: str) -> None:
        for t in g.initializer:
            flat.initializers[(path, t.name)] = t
        flat.sparse.extend(g.sparse_initializer)
        for p in g.node:
            base = (path, "name", p.name) if p.name else (path, "op", p.domain, p.op_type, tuple(p.output))
            seen[base] += 1
            # duplicate names only occur in invalid models; number repeats so nothing is lost
            key = base if seen[base] == 1 else (*base, seen[base])
            n = FlatNode(path, p, key, len(flat.nodes))
            flat.nodes.append(n)
            for name in p.input:
                if name:
                    flat.readers.setdefault(name, []).append(n)
            for name in p.output:
                if name:
                    flat.producer.setdefault(name, n)
            for a in p.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
                    list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
                for i, sg in enumerate(subs):
                    suffix = a.name if len(subs) == 1 and a.type == onnx.AttributeProto.GRAPH else f"{a.name}[{i}]"
                    walk(sg, f"{path}/{n.label}.{suffix}")
                    # a subgraph's reads of outer values count as reads by the node that owns it
                    for inner in graph_inputs_read(sg):
                        flat.readers.setdefault(inner, []).append(n)

    walk(model.graph, MAIN)
    flat.outputs = {o.name for o in model.graph.output}
    for e in model.metadata_props:
        if e.key == RECONNECTED_LOG:
            flat.reconnected = [(r, rep) for r, rep in json.loads(e.value)]
    return flat


def graph_inputs_read(g: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in g.input} | {t.name for t in g.initializer}
    read = set()
    for p in g.node:
        read.update(x for x in p.input if x and x not in defined)
        defined.update(p.output)
    read.update(o.name for o in g.output if o.name not in defined)
    return read


# --------------------------------------------------------------------------- sizes
def _tensor_size(t: onnx.TensorProto) -> tuple[int, int]:
    """(elements, bytes) of a TensorProto without decoding its data (external data included)."""
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    if t.data_type == onnx.TensorProto.STRING:
        return n, sum(len(s) for s in t.string_data)
    return n, (n * DataType(t.data_type).bitwidth + 7) // 8


def _constant_size(p: onnx.NodeProto) -> tuple[int, int]:
    for a in p.attribute:
        if a.name == "value":
            return _tensor_size(a.t)
        if a.name == "sparse_value":
            return _tensor_size(a.sparse_tensor.values)
        if a.name == "value_float" or a.name == "value_int":
            return 1, 4 if a.name == "value_float" else 8
        if a.name == "value_floats":
            return len(a.floats), 4 * len(a.floats)
        if a.name == "value_ints":
            return len(a.ints), 8 * len(a.ints)
        if a.name == "value_string":
            return 1, len(a.s)
        if a.name == "value_strings":
            return len(a.strings), sum(len(s) for s in a.strings)
    return 0, 0


def summary(flat: FlatModel, name: str) -> dict:
    params = nbytes = consts = 0
    for t in flat.initializers.values():
        e, b = _tensor_size(t)
        params, nbytes = params + e, nbytes + b
    for s in flat.sparse:
        e, b = _tensor_size(s.values)
        params, nbytes = params + e, nbytes + b
    for n in flat.nodes:
        if n.proto.op_type == "Constant" and n.proto.domain in ("", "ai.onnx"):
            consts += 1
            e, b = _constant_size(n.proto)
            params, nbytes = params + e, nbytes + b
    return {"name": name, "nodes": len(flat.nodes), "parameters": params, "bytes": nbytes,
            "initializers": len(flat.initializers) + len(flat.sparse), "constant_nodes": consts}


# --------------------------------------------------------------------------- provenance
@dataclass
class Rewrite:
    """One rewrite found in B: the nodes and initializers one rule application created, and what
    it took from A (nodes it replaced, producers and initializers left without readers)."""

    rule: str
    replaced_labels: list[str]
    seq: int
    created: list[FlatNode] = field(default_factory=list)
    created_initializers: list[str] = field(default_factory=list)
    replaced: list[FlatNode] = field(default_factory=list)
    dropped: list[FlatNode] = field(default_factory=list)
    dropped_initializers: list[str] = field(default_factory=list)
    intermediate: list[str] = field(default_factory=list)
    rewired: int = 0


def _provenance(entries) -> tuple[str, str] | None:
    meta = {e.key: e.value for e in entries}
    rule = meta.get(PROVENANCE_RULE)
    return (rule, meta.get(PROVENANCE_REPLACED, "")) if rule else None


def attribute_rewrites(fa: FlatModel, fb: FlatModel, removed: list[FlatNode], added: list[FlatNode],
                       removed_inits: list[tuple], added_inits: list[tuple]) -> list[Rewrite]:
    """Group B's rule-made nodes and initializers into rewrites; tie each to what it took from A.

    Args:
        removed, added: A nodes missing from B, B nodes missing from A.
        removed_inits, added_inits: initializer keys ``(graph path, name)`` likewise.
    """
    rewrites: dict[tuple, Rewrite] = {}

    def rewrite_of(prov):
        rw = rewrites.get(prov)
        if rw is None:
            rw = rewrites[prov] = Rewrite(prov[0], [x for x in prov[1].split(",") if x], len(rewrites))
        return rw

    for n in added:
        prov = _provenance(n.proto.metadata_props)
        if prov is not None:
            rewrite_of(prov).created.append(n)
    for prov in fb.reconnected:
        rewrite_of(tuple(prov))
    for key in added_inits:
        prov = _provenance(fb.initializers[key].metadata_props)
        if prov is not None:
            rewrite_of(prov).created_initializers.append(key[1])
    removed_set = set(id(n) for n in removed)
    by_label: dict[str, FlatNode] = {}
    for n in fa.nodes:  # names first: an output name never shadows a node name
        if n.name:
            by_label.setdefault(n.name, n)
    for n in fa.nodes:
        if not n.name and n.proto.output:
            by_label.setdefault(n.proto.output[0], n)
    owner: dict[int, Rewrite] = {}
    for rw in rewrites.values():
        for label in rw.replaced_labels:
            n = by_label.get(label)
            if n is None:
                rw.intermediate.append(label)
            elif id(n) in removed_set and id(n) not in owner:
                owner[id(n)] = rw
                rw.replaced.append(n)
    # A removed producer whose every reader was replaced or dropped by one rewrite was dropped
    # by that rewrite (it lost its last reader). Readers come after producers: walk backwards.
    changed = True
    while changed:
        changed = False
        for n in reversed(removed):
            if id(n) in owner or any(o in fa.outputs for o in n.proto.output):
                continue
            rw = _sole_owner([r for o in n.proto.output if o for r in fa.readers.get(o, ())], owner)
            if rw is not None:
                owner[id(n)] = rw
                rw.dropped.append(n)
                changed = True
    for key in removed_inits:
        rw = _sole_owner(fa.readers.get(key[1], []), owner)
        if rw is not None and key[1] not in fa.outputs:
            rw.dropped_initializers.append(key[1])
    for rw in rewrites.values():
        rw.dropped.sort(key=lambda n: n.order)
    return sorted(rewrites.values(), key=lambda r: (r.rule, r.seq))


def _sole_owner(readers: list[FlatNode], owner: dict[int, Rewrite]) -> Rewrite | None:
    """The rewrite owning every reader, or None (no readers, an unowned reader, or two owners)."""
    owners = {id(owner[id(r)]) if id(r) in owner else None for r in readers}
    if not readers or len(owners) != 1 or None in owners:
        return None
    return owner[id(readers[0])]


def rule_summary(rws: list[Rewrite]) -> dict:
    def ops(nodes):
        return dict(sorted(Counter(n.op for n in nodes).items()))

    created = [n for r in rws for n in r.created]
    replaced = sorted((n for r in rws for n in r.replaced), key=lambda n: n.order)
    dropped = sorted((n for r in rws for n in r.dropped), key=lambda n: n.order)
    return {"rule": rws[0].rule, "rewrites": len(rws), "created": ops(created), "replaced": ops(replaced),
            "dropped": ops(dropped), "rewired": sum(r.rewired for r in rws),
            "created_nodes": [n.label for n in created], "replaced_nodes": [n.label for n in replaced],
            "dropped_nodes": [n.label for n in dropped],
            "created_initializers": [x for r in rws for x in r.created_initializers],
            "dropped_initializers": [x for r in rws for x in r.dropped_initializers],
            "intermediate": [x for r in rws for x in r.intermediate]}
