"""Channel-dependency analysis on the IR: which tensors must shrink together.

One forward walk over the main graph in topological order. Sources make fresh
atoms (``layout.py``): a Conv's output channels, a Gemm/MatMul weight's output
columns, an embedding table's columns. Every other op maps its inputs' atoms to
its outputs (a Relu passes them, a Transpose permutes axes, a Reshape merges
channel × spatial into blocks or splits a hidden dim into heads, a Concat lays
ranges end to end, a Slice/Split takes sub-ranges) and *unites* atoms that must
go together: the two inputs of a residual Add, a depthwise Conv's input and
output channels, all positions of one attention head. Constants met on the way
(biases, BatchNormalization/LayerNorm parameters, consumer weights) become
members to slice.

The union-find classes are the units of removal; a group (:class:`Group`) is the
set of classes one or more sources make, e.g. the 64 channels of a ResNet stage
(every Conv writing into the residual stream, every BatchNormalization on it,
every Conv reading it) or the 12 heads of an attention block.

Conservative by construction: an op the analysis does not understand, a graph
output, a subgraph, or a combination with a tensor of unknown origin *blocks*
the classes it touches (with the reason), so nothing reaching them is removed.
Uniting more than necessary only reduces choice; it never makes a removal unsafe.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from graft.compiler.techniques.pruning import ops
from graft.compiler.techniques.pruning.analyzer import Analyzer, node_label
from graft.compiler.techniques.pruning.layout import Classes, Leak, Member, NodeEdit, Source
from graft.compiler.techniques.pruning.ops_shape import rectangularize
from graft.compiler.techniques.pruning.shapes import static_shapes
from graft.ir import Model, Node, Value, outer_scope_values


class AnalysisError(ValueError):
    """The model cannot be analyzed at all (names what and why)."""


@dataclass
class Group:
    """Classes that live in the same source dims, pruned together by one ratio.

    Attributes:
        id: index in :attr:`Analysis.groups`.
        name: the first source node's name.
        module: the torch module path of that node (models captured from torch), else ''.
        kind: ``channels`` (Conv outputs), ``neurons`` (MLP hidden units), ``heads``
            (attention heads), ``hidden`` (a residual stream with LayerNorm).
        classes: class ids, in the first source's order.
        block: positions one class covers in the first source (head size for heads, channels per
            conv group for the input of a grouped Conv, else 1).
        sources: nodes whose output dims make the group.
        members: every constant slice the group's removal rewrites.
        blocked: class → why it cannot be removed.
        exact: class → removing it leaves the outputs unchanged (zero or constant channel).
        inexact: class → why removal is never exact (e.g. LayerNorm statistics).
    """

    id: int
    name: str
    kind: str
    classes: list[int]
    block: int
    sources: list[Node]
    members: list[Member]
    blocked: dict[int, str] = field(default_factory=dict)
    exact: dict[int, bool] = field(default_factory=dict)
    inexact: dict[int, str] = field(default_factory=dict)
    module: str = ""

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> list[int]:
        return [c for c in self.classes if c not in self.blocked]

    @property
    def reason(self) -> str:
        """Why no class of the group can be removed ('' when some can)."""
        if self.prunable:
            return ""
        return next(iter(self.blocked.values()), "")


@dataclass
class Analysis:
    """Result of :func:`analyze`: groups, the per-node edits removal needs, and the class algebra."""

    model: Model
    groups: list[Group]
    edits: dict[Node, NodeEdit]
    leaks: list[Leak]
    classes: Classes
    shapes: dict[Value, tuple]
    nonempty: list[tuple[frozenset, str]] = field(default_factory=list)

    def group(self, name: str) -> Group:
        """The group whose first source node (or torch module path) is ``name``.

        Raises:
            KeyError: no such group (the message lists them).
        """
        for g in self.groups:
            if name in (g.name, g.module):
                return g
        raise KeyError(f"no channel group named {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]


# --------------------------------------------------------------------------- the walk
def _walk(an: Analyzer) -> None:
    """One forward pass over the main graph in topological order: each op's handler maps its inputs'
    layouts to its outputs'; an op no handler understands blocks the channels it reads."""
    graph = an.model.graph
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            if any(an.layout(v) is not None for v in node.inputs):
                an.block_inputs(node, f"{node_label(node)} is a {node.domain}::{node.op_type} op, which the "
                                      f"channel analysis does not know")
            continue
        if any(True for _ in node.subgraphs()):
            an.block_inputs(node, f"{node_label(node)} has subgraphs")
            _block_outer_reads(an, node)
            continue
        has_layout = any(an.layout(v) is not None for v in node.inputs)
        handler = ops.HANDLERS.get(node.op_type)
        if handler is None:
            if has_layout:
                an.block_inputs(node, f"{node_label(node)} ({node.op_type}) is not understood by the channel "
                                      f"analysis, so the channels it reads must stay")
            continue
        if not has_layout:
            if node.op_type in ops.SOURCES or (node.op_type in ops.ORIGIN_OPS and
                                               an.origin_of(node, 0) is not None):
                handler(an, node)
            continue
        if any(o.name and an.shapes.get(o) is None for o in node.outputs[:1]):
            an.block_inputs(node, f"the output shape of {node_label(node)} is unknown (give the model static "
                                  f"shapes or --dim sizes)")
            continue
        handler(an, node)
    for v in graph.outputs:
        lay = an.layout(v)
        if lay is not None:
            an.cls.block(lay.atoms, f"its channels reach graph output {v.name!r}, whose shape must not change")
    for atoms in an.rectangular:  # before the target checks, which compare class structure
        rectangularize(an, atoms)
    for check in an.deferred:
        check()


def _block_outer_reads(an: Analyzer, node: Node) -> None:
    for sg in node.subgraphs():
        for v in outer_scope_values(sg):
            lay = an.layout(v)
            if lay is not None:
                an.cls.block(lay.atoms, f"{v.name!r} is read inside a subgraph of {node_label(node)}")


# --------------------------------------------------------------------------- groups
def _groups(an: Analyzer) -> list[Group]:
    cls = an.cls
    blocked, inexact = cls.class_flags()
    # classes sharing a source dim form one group: connected components (networkx)
    g = nx.Graph()
    order: list[int] = []
    for src in an.sources:
        roots = cls.roots(src.atoms).ravel().tolist()
        uniq = list(dict.fromkeys(roots))
        order.extend(uniq)
        g.add_nodes_from(uniq)
        nx.add_path(g, uniq)
    first_seen = {c: i for i, c in reversed(list(enumerate(order)))}
    comps = sorted(nx.connected_components(g), key=lambda comp: min(first_seen[c] for c in comp))
    class_group = {}
    for gi, comp in enumerate(comps):
        for c in comp:
            class_group[c] = gi
    members_by_group: dict[int, list[Member]] = {i: [] for i in range(len(comps))}
    for e in an.edits.values():
        for m in e.members:
            roots = set(cls.roots(m.atoms).ravel().tolist())
            for gi in sorted({class_group[r] for r in roots if r in class_group}):
                members_by_group[gi].append(m)
    exact = _exactness(an, blocked, inexact)
    conv_grouped = set(cls.roots(np.concatenate([a.ravel() for a in an.conv_groups])).tolist()) \
        if an.conv_groups else set()
    groups = []
    for gi, comp in enumerate(comps):
        srcs = [s for s in an.sources if cls.roots(s.atoms).ravel()[0] in comp]
        first = srcs[0]
        classes = list(dict.fromkeys(r for s in srcs for r in cls.roots(s.atoms).ravel().tolist()))
        block = int(first.atoms.size // max(1, len(set(cls.roots(first.atoms).ravel().tolist()))))
        members = members_by_group[gi]
        kind = _kind(srcs, members, block, any(c in conv_grouped for c in classes))
        groups.append(Group(gi, first.node.name or first.node.outputs[0].name, kind, classes, block,
                            list(dict.fromkeys(s.node for s in srcs)), members,
                            {c: blocked[c] for c in classes if c in blocked},
                            {c: exact.get(c, False) for c in classes},
                            {c: inexact[c] for c in classes if c in inexact},
                            str(first.node.meta.get("torch.module", ""))))
    return groups


def _kind(sources: list[Source], members: list[Member], block: int, conv_grouped: bool = False) -> str:
    if block > 1 and not conv_grouped:
        return "heads"
    if any(m.node.op_type == "LayerNormalization" for m in members):
        return "hidden"
    if any(s.kind == "conv" for s in sources):
        return "channels"
    return "neurons"


def _exactness(an: Analyzer, blocked: dict, inexact: dict) -> dict[int, bool]:
    """class → removing it is exact: at every contraction reading it, each position is a known
    constant that can be compensated (in the bias, or as a constant map added to the output),
    or reads all-zero weights."""
    ok: dict[int, bool] = {}
    for leak in an.leaks:
        roots = an.cls.roots(leak.atoms).ravel()
        cval = leak.cval.ravel()
        static = leak.static.ravel() if leak.static is not None else ~np.isnan(cval)
        fine = leak.wzero.ravel() | (cval == 0) | (~np.isnan(cval) & leak.compensable) | (static & leak.map_ok)
        for r, f in zip(roots.tolist(), fine.tolist()):
            ok[r] = ok.get(r, True) and bool(f)
    roots = set(an.cls.roots(np.concatenate([s.atoms.ravel() for s in an.sources])).tolist()) if an.sources else set()
    return {c: ok.get(c, True) and c not in blocked and c not in inexact for c in roots}


def analyze(model: Model, dim_sizes: dict[str, int] | None = None, shapes: dict | None = None) -> Analysis:
    """Find the coupled channel groups of ``model`` (main graph; subgraph reads block).

    Args:
        model: an IR model with ONNX ops. Constants should be folded first (a bias that is
            ``Reshape(const)`` at run time is not seen as a constant); :func:`graft.compiler.techniques.pruning.prune`
            does that.
        dim_sizes: concrete sizes for symbolic input dims (see :mod:`graft.compiler.techniques.pruning.shapes`).
        shapes: precomputed static shapes (Value → tuple), else computed.

    Returns:
        an :class:`Analysis`. Groups that cannot be pruned keep their reason in ``Group.blocked``.

    Raises:
        AnalysisError: the model is all aten-domain ops (lower it first). Aten ops left after lowering
            (ops with no ONNX equivalent) are opaque: the channels they read are blocked.
    """
    aten = [n for n in model.graph if n.domain == "aten"]
    if aten and len(aten) == sum(1 for _ in model.graph):
        raise AnalysisError(f"the model has only aten ops (first: {node_label(aten[0])}); lower them to ONNX ops "
                            f"(rules/lower_aten*) before pruning")
    # aten ops left after lowering (no ONNX equivalent) are opaque: the walk blocks what they read
    if shapes is None:
        shapes = static_shapes(model, dim_sizes)
    an = Analyzer(model, shapes)
    _walk(an)
    nonempty = {}
    for atoms, where in an.nonempty:
        if atoms.size:
            nonempty.setdefault(frozenset(an.cls.roots(atoms).ravel().tolist()), where)
    return Analysis(model, _groups(an), an.edits, an.leaks, an.cls, shapes, list(nonempty.items()))
