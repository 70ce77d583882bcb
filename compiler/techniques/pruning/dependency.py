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

from graft.compiler.techniques.pruning.layout import Classes, Layout, Leak, Member, NodeEdit, Source
from graft.compiler.techniques.pruning.shapes import static_shapes
from graft.ir import Model, Node, Value


class AnalysisError(ValueError):
    """The model cannot be analyzed at all (names what and why)."""


@dataclass
class Origin:
    """A value that is a constant seen through broadcasting ops (Expand of a class token).

    Slicing it means slicing constant input ``input`` of ``node``; ``axis_map[i]`` is the
    constant's axis behind the value's axis ``i`` (None: a broadcast axis).
    """

    node: Node
    input: int
    axis_map: tuple
    array: np.ndarray


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


class Analyzer:
    """The walk's state. Op handlers (:mod:`graft.compiler.techniques.pruning.ops`) read and extend it."""

    def __init__(self, model: Model, shapes: dict[Value, tuple]):
        self.model = model
        self.shapes = shapes
        self.cls = Classes()
        self.layouts: dict[Value, Layout] = {}
        self.origins: dict[Value, Origin] = {}
        self.edits: dict[Node, NodeEdit] = {}
        self.sources: list[Source] = []
        self.leaks: list[Leak] = []
        self.deferred: list = []
        self.rectangular: list = []  # split blocks (heads) to make rectangular after the walk
        # (atoms, where): what each tensor carries; each must keep at least one position, or the tensor would
        # have a zero-sized channel axis (a Split output, a Slice result, a conv feeding part of a Concat)
        self.nonempty: list[tuple[np.ndarray, str]] = []
        self._nonempty_seen: set[int] = set()
        self.conv_groups: list[np.ndarray] = []  # input channels of grouped Convs (a class = a conv group)

    # -- queries ------------------------------------------------------------
    def shape(self, v: Value | None) -> tuple | None:
        return None if v is None else self.shapes.get(v)

    def layout(self, v: Value | None) -> Layout | None:
        return None if v is None else self.layouts.get(v)

    def origin_of(self, node: Node, i: int) -> Origin | None:
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None:
            return None
        arr = v.constant()
        if arr is not None:
            return Origin(node, i, tuple(range(arr.ndim)), arr)
        return self.origins.get(v)

    # -- recording ----------------------------------------------------------
    def set_layout(self, v: Value, lay: Layout) -> None:
        shape = self.shapes.get(v)
        if shape is None or any(shape[a] != d for a, d in zip(lay.axes, lay.atoms.shape)) \
                or len(lay.axes) != lay.atoms.ndim or (lay.axes and max(lay.axes) >= len(shape)):
            self.cls.block(lay.atoms, f"the shape of {v.name!r} is not known statically, so its channels "
                                      f"cannot be followed")
            return
        self.layouts[v] = lay
        # every tensor must keep a position along its carried axes: a conv whose outputs are only part of a
        # group (concatenated, then added to a residual), a Split output, a Slice result
        if id(lay.atoms) not in self._nonempty_seen:
            self._nonempty_seen.add(id(lay.atoms))
            self.nonempty.append((lay.atoms, f"output {v.name!r} of {node_label(v.producer)}" if v.producer is not None
                                  else repr(v.name)))

    def edit(self, node: Node, kind: str) -> NodeEdit:
        e = self.edits.get(node)
        if e is None:
            e = self.edits[node] = NodeEdit(node, kind)
        return e

    def member(self, node: Node, input: int, atoms: np.ndarray, axis_map: tuple, role: str,
               kind: str | None = None) -> None:
        if all(a is None for a in axis_map):
            return
        self.edit(node, kind or _edit_kind(node)).members.append(Member(node, input, atoms, tuple(axis_map), role))

    def source(self, node: Node, atoms: np.ndarray, kind: str) -> None:
        self.sources.append(Source(node, atoms, kind))

    def block(self, atoms, reason: str) -> None:
        self.cls.block(atoms, reason)

    def block_inputs(self, node: Node, reason: str) -> None:
        for v in node.inputs:
            lay = self.layout(v)
            if lay is not None:
                self.cls.block(lay.atoms, reason)

    # -- the walk -----------------------------------------------------------
    def run(self) -> None:
        from graft.compiler.techniques.pruning import ops

        graph = self.model.graph
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                if any(self.layout(v) is not None for v in node.inputs):
                    self.block_inputs(node, f"{node_label(node)} is a {node.domain}::{node.op_type} op, which the "
                                            f"channel analysis does not know")
                continue
            if any(True for _ in node.subgraphs()):
                self.block_inputs(node, f"{node_label(node)} has subgraphs")
                self._block_outer_reads(node)
                continue
            has_layout = any(self.layout(v) is not None for v in node.inputs)
            handler = ops.HANDLERS.get(node.op_type)
            if handler is None:
                if has_layout:
                    self.block_inputs(node, f"{node_label(node)} ({node.op_type}) is not understood by the channel "
                                            f"analysis, so the channels it reads must stay")
                continue
            if not has_layout:
                if node.op_type in ops.SOURCES or (node.op_type in ops.ORIGIN_OPS and
                                                   self.origin_of(node, 0) is not None):
                    handler(self, node)
                continue
            if any(o.name and self.shapes.get(o) is None for o in node.outputs[:1]):
                self.block_inputs(node, f"the output shape of {node_label(node)} is unknown (give the model static "
                                        f"shapes or --dim sizes)")
                continue
            handler(self, node)
        for v in graph.outputs:
            lay = self.layout(v)
            if lay is not None:
                self.cls.block(lay.atoms, f"its channels reach graph output {v.name!r}, whose shape must not change")
        from graft.compiler.techniques.pruning.ops_shape import rectangularize

        for atoms in self.rectangular:  # before the target checks, which compare class structure
            rectangularize(self, atoms)
        for check in self.deferred:
            check()

    def _block_outer_reads(self, node: Node) -> None:
        from graft.ir._core import outer_scope_values

        for sg in node.subgraphs():
            for v in outer_scope_values(sg):
                lay = self.layout(v)
                if lay is not None:
                    self.cls.block(lay.atoms, f"{v.name!r} is read inside a subgraph of {node_label(node)}")


def node_label(node: Node) -> str:
    if node.name:
        return f"{node.op_type} node {node.name!r}"
    return f"{node.op_type} node (output {node.outputs[0].name!r})"


def _edit_kind(node: Node) -> str:
    return {"Conv": "conv", "Gemm": "gemm", "MatMul": "matmul", "BatchNormalization": "norm",
            "LayerNormalization": "norm", "InstanceNormalization": "norm", "Gather": "gather",
            "Split": "split", "Slice": "slice", "Reshape": "reshape"}.get(node.op_type, "const")


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
    an.run()
    nonempty = {}
    for atoms, where in an.nonempty:
        if atoms.size:
            nonempty.setdefault(frozenset(an.cls.roots(atoms).ravel().tolist()), where)
    return Analysis(model, _groups(an), an.edits, an.leaks, an.cls, shapes, list(nonempty.items()))
