"""Dead-code elimination: drop nodes and initializers nothing reads.

A node is dead when none of its outputs is read by a node (in its graph or in
any subgraph) and none is an output of its graph. ONNX ops have no side
effects, so removing a dead node never changes what the model computes.
Nodes are visited in reverse topological order, so a chain of dead nodes goes
in one sweep: removing a reader releases its inputs before their producers are
visited. A live node's subgraphs are swept when the sweep reaches it, before
the nodes above it, so a value read only by a dead subgraph node is released
in time. Initializers nobody reads are dropped last, except graph inputs (which
callers may override) and graph outputs.
"""
from __future__ import annotations

from graft.ir import Graph, Model, Node


def eliminate_dead_code(model: Model) -> int:
    """Remove dead nodes and unused initializers from ``model`` in place (subgraphs included).

    Args:
        model: the IR model.

    Returns:
        The number of nodes (including those inside removed nodes' subgraphs) plus
        the number of initializers removed.
    """
    removed = _sweep(model.graph)
    for g in list(model.all_graphs()):
        inputs = set(g.inputs)
        outputs = set(g.outputs)
        for name, v in list(g.initializers.items()):
            if v.num_uses == 0 and v not in inputs and v not in outputs:
                del g.initializers[name]
                removed += 1
    return removed


def _sweep(graph: Graph) -> int:
    removed = 0
    outs = set(graph.outputs)
    for node in reversed(graph.nodes):
        if not any(o.num_uses or o in outs for o in node.outputs):
            removed += _remove_with_bodies(graph, node)
        else:
            for sg in node.subgraphs():
                removed += _sweep(sg)
    return removed


def _remove_with_bodies(graph: Graph, node: Node) -> int:
    """Remove ``node``; first release what its subgraphs read, so outer producers can die too."""
    count = 0
    for sg in node.subgraphs():
        for inner in reversed(sg.nodes):
            count += _remove_with_bodies(sg, inner)
    graph.remove(node, check_uses=False)
    return count + 1
