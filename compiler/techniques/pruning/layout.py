"""The bookkeeping of the channel analysis: atoms, removal classes and what each tensor carries.

Every position of a prunable dim (an output channel of a Conv, a column of a
MatMul weight, a row of an embedding table) is an *atom*, an integer id. Ops
that tie positions together (a residual Add, a depthwise Conv, attention heads)
*unite* atoms; the union-find classes are the units of removal: a class is kept
or removed as a whole, in every tensor it appears in. A value's :class:`Layout`
says which of its axes carry atoms and which atom sits at each position.

A class can be *blocked* (some position of it reaches something that cannot
shrink: a graph output, an op the analysis does not understand) or *inexact*
(removing it changes the model's function even when its channels are zero, e.g.
LayerNormalization averages over it). Both keep the first reason given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graft.ir import Node


class Classes:
    """Union-find over atom ids (smallest id is the root, so results are deterministic)."""

    def __init__(self):
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}
        self.inexact: dict[int, str] = {}
        self._root_of: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.parent)

    def new(self, shape) -> np.ndarray:
        """Fresh atoms, one per position of ``shape``."""
        n = int(np.prod(shape, dtype=np.int64))
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self._root_of = None
        return np.arange(start, start + n, dtype=np.int64).reshape(shape)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb
            self._root_of = None

    def union_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        """Unite ``x`` and ``y`` position by position (same shape)."""
        for a, b in zip(x.ravel().tolist(), y.ravel().tolist()):
            if a != b:
                self.union(a, b)

    def union_all(self, arr: np.ndarray) -> None:
        flat = arr.ravel().tolist()
        for a in flat[1:]:
            self.union(flat[0], a)

    def block(self, arr, reason: str) -> None:
        for a in np.asarray(arr).ravel().tolist():
            self.blocked.setdefault(a, reason)

    def mark_inexact(self, arr, reason: str) -> None:
        for a in np.asarray(arr).ravel().tolist():
            self.inexact.setdefault(a, reason)

    def roots(self, arr) -> np.ndarray:
        """The class (root id) of every atom in ``arr``, same shape."""
        if self._root_of is None or len(self._root_of) != len(self.parent):
            self._root_of = np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)
        return self._root_of[np.asarray(arr, dtype=np.int64)]

    def class_flags(self) -> tuple[dict[int, str], dict[int, str]]:
        """(blocked, inexact): class root → first reason recorded on any of its atoms."""
        blocked: dict[int, str] = {}
        inexact: dict[int, str] = {}
        for a, why in sorted(self.blocked.items()):
            blocked.setdefault(self.find(a), why)
        for a, why in sorted(self.inexact.items()):
            inexact.setdefault(self.find(a), why)
        return blocked, inexact


@dataclass
class Layout:
    """What a value carries: ``atoms[i, j, ...]`` is the atom at index (i, j, ...) of ``axes``.

    Attributes:
        axes: the value's axes that carry atoms, ascending.
        atoms: int64 array, shape = the value's dims along ``axes``.
        cval: float64 array of the same shape: the value at that position when it is a
            known constant for every input (a channel whose weights are all zero), else NaN.
        static: bool array of the same shape: the position does not depend on the model's input
            (a known constant, or a constant map such as a constant channel after a padded
            convolution); default: where ``cval`` is known.
    """

    axes: tuple[int, ...]
    atoms: np.ndarray
    cval: np.ndarray
    static: np.ndarray | None = None

    def __post_init__(self):
        if self.cval is None:
            self.cval = np.full(self.atoms.shape, np.nan)
        known = ~np.isnan(self.cval)
        self.static = known if self.static is None else (np.asarray(self.static, dtype=bool) | known)


@dataclass
class Member:
    """A constant input of a node that must be sliced when classes are removed.

    ``atoms`` is indexed like the joint layout the constant meets; ``axis_map[d]``
    is the constant's axis that array dim ``d`` runs along (None: the constant
    is broadcast there and is not sliced).

    Roles: ``producer`` (weight rows making the channels), ``consumer`` (weight
    columns reading them), ``bias``, ``norm`` (BatchNormalization/LayerNorm
    parameters; ``norm.scale`` for the scale), ``embedding`` (an embedding table),
    ``const`` (any other constant operand).
    """

    node: Node
    input: int
    atoms: np.ndarray
    axis_map: tuple
    role: str


@dataclass
class Source:
    """An op whose output dim makes fresh atoms: Conv/Gemm/MatMul output channels, embedding columns."""

    node: Node
    atoms: np.ndarray
    kind: str  # "conv" | "linear" | "embedding"


@dataclass
class Leak:
    """A contraction that sums positions into values outside their classes (Conv, MatMul, Gemm inputs).

    Removing a class changes the consumer's output by the class's contribution, unless
    every position is a known constant (compensated in the consumer's bias, when
    ``compensable``) or reads weights that are all zero.

    Attributes:
        atoms: the positions contracted (1-D, aligned with the weight's input axis).
        cval: their constant value, NaN when not constant.
        wzero: True where the weight slice reading that position is all zero.
        compensable: a known nonzero constant can be folded into the bias (no padding).
        weight_axis: the weight's input axis (for compensation), None for activation×activation.
        weight: the weight as the op reads it (a transposed parameter already transposed).
        out_atoms: the atoms of the op's output channels (to restrict a compensation to kept ones).
        static: True where the position does not depend on the input (its value is read off one run).
        map_ok: a removed static position can be compensated by a constant added to the output
            (the output's non-batch dims are static in the model).
    """

    node: Node
    atoms: np.ndarray
    cval: np.ndarray
    wzero: np.ndarray
    compensable: bool
    weight_axis: int | None
    weight: np.ndarray | None = None
    out_atoms: np.ndarray | None = None
    static: np.ndarray | None = None
    map_ok: bool = False


@dataclass
class NodeEdit:
    """Everything a removal rule needs to rewrite one node: its members and op-specific facts."""

    node: Node
    kind: str
    members: list[Member] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
