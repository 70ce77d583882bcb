"""The channel analysis's walk state: what each tensor carries, and what the op handlers record.

:func:`graft.compiler.techniques.pruning.dependency.analyze` walks the graph with one :class:`Analyzer`; the op
handlers (:mod:`~graft.compiler.techniques.pruning.ops`, :mod:`~graft.compiler.techniques.pruning.ops_linear`,
:mod:`~graft.compiler.techniques.pruning.ops_shape`) read its layouts and record members, edits, sources and
leaks through its methods. This module sits below all of them, so none imports another to reach it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.compiler.techniques.pruning.layout import Classes, Layout, Leak, Member, NodeEdit, Source
from graft.ir import Model, Node, Value


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


def node_label(node: Node) -> str:
    if node.name:
        return f"{node.op_type} node {node.name!r}"
    return f"{node.op_type} node (output {node.outputs[0].name!r})"


def _edit_kind(node: Node) -> str:
    return {"Conv": "conv", "Gemm": "gemm", "MatMul": "matmul", "BatchNormalization": "norm",
            "LayerNormalization": "norm", "InstanceNormalization": "norm", "Gather": "gather",
            "Split": "split", "Slice": "slice", "Reshape": "reshape"}.get(node.op_type, "const")
