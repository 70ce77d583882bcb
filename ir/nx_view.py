"""A ``networkx.MultiDiGraph`` view of an IR graph, for graph algorithms outside the rewriter
(topological order, cycles, connected components, isomorphism in tests, DOT output).

The view is a snapshot: editing it does not change the IR, and IR edits made
after the call do not show in it.
"""
from __future__ import annotations

import networkx as nx

from graft.ir._core import Graph, outer_scope_values


def to_networkx(graph: Graph, *, include_inputs: bool = False,
                include_initializers: bool = False) -> nx.MultiDiGraph:
    """One networkx node per IR node; one edge per (producer output → consumer input).

    Node keys are ints: the node's position in ``graph``'s order (stable for a
    given graph). Node attributes: ``kind="node"``, ``op_type``, ``domain``,
    ``name`` and ``node`` (the :class:`ir.Node`).

    Edge attributes: ``value`` (the value name), ``index`` (the consumer's input
    index, or None for a value a subgraph of the consumer reads from this outer
    scope), ``output_index`` (the producer's output index; None for graph
    inputs/initializers) and ``implicit`` (True for those subgraph reads, which
    still order the producer before the consumer).

    Args:
        graph: the IR graph (its subgraphs are not expanded; their outer-scope
            reads become implicit edges of the node holding them).
        include_inputs: add a node ``("input", name)`` (``kind="input"``) per
            graph input and edges from it to its readers.
        include_initializers: likewise ``("initializer", name)`` (``kind="initializer"``).

    Returns:
        a new ``networkx.MultiDiGraph``.
    """
    g = nx.MultiDiGraph(name=graph.name)
    index = {}
    for i, n in enumerate(graph):
        index[n] = i
        g.add_node(i, kind="node", op_type=n.op_type, domain=n.domain, name=n.name, node=n)
    inputs = {v: None for v in graph.inputs}
    if include_inputs:
        for v in graph.inputs:
            g.add_node(("input", v.name), kind="input", name=v.name)
    if include_initializers:
        for name, v in graph.initializers.items():
            if v not in inputs:
                g.add_node(("initializer", name), kind="initializer", name=name)

    def source(v):
        p = v.producer
        if p is not None and p in index:
            return index[p]
        if v in inputs:
            return ("input", v.name) if include_inputs else None
        if include_initializers and v.const is not None and v.graph is graph:
            return ("initializer", v.name)
        return None

    for n, i in index.items():
        for k, v in enumerate(n.inputs):
            if v is None:
                continue
            src = source(v)
            if src is not None:
                out_idx = v.index if v.producer is not None else None
                g.add_edge(src, i, value=v.name, index=k, output_index=out_idx, implicit=False)
        implicit = dict.fromkeys(v for sg in n.subgraphs() for v in outer_scope_values(sg))
        for v in implicit:  # one edge per value, however many branches read it
            src = source(v)
            if src is not None:
                out_idx = v.index if v.producer is not None else None
                g.add_edge(src, i, value=v.name, index=None, output_index=out_idx, implicit=True)
    return g
