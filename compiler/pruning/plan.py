"""From chosen classes to per-node edits: the context the removal rules (``rules/prune.py``) read.

For every node the analysis recorded, the plan says which indices of which axis of
which constant input to keep, and the op-specific consequences: a depthwise or
grouped Conv's new ``group``, a Split's new sizes, a Slice's new bounds on the
channel axis, the literals of a Reshape target that name a channel count, and the
compensation of a consumer whose removed inputs did not depend on the model's
input (:mod:`compiler.pruning.compensate`). The plan lives in
``model.meta["graft.prune_plan"]`` between the analysis pass and the rewrite pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.pruning.dependency import Analysis
from compiler.pruning.select import Choice
from ir import Model, Node

PLAN_KEY = "graft.prune_plan"


class PlanError(RuntimeError):
    """An internal inconsistency (a keep mask that is not rectangular); names the node."""


@dataclass
class PlanEdit:
    """The rewrite of one node.

    Attributes:
        slices: input index → [(axis, kept indices)] for constant inputs.
        attrs: attribute overrides (``group``).
        split: new split sizes; slice_bounds: input position in starts/ends → (start, end, axis).
        shape: a new constant target for a Reshape; literals: (input, element) → value for the
            constant pieces of a Concat that builds a target shape.
        bias_delta: added to the output per output channel (compensation).
        bias_map: added to a Conv's output, shape (1, C_out', H_out, W_out): the compensation of removed
            input-independent channels that are not uniform (a constant channel after zero padding).
    """

    node: Node
    kind: str
    slices: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    split: list[int] | None = None
    slice_bounds: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    shape: np.ndarray | None = None
    literals: dict[tuple[int, int], int] = field(default_factory=dict)
    bias_delta: np.ndarray | None = None
    bias_map: np.ndarray | None = None

    def add_slice(self, input: int, axis: int, keep: np.ndarray) -> None:
        have = self.slices.setdefault(input, [])
        for ax, k in have:
            if ax == axis:
                if not np.array_equal(k, keep):
                    raise PlanError(f"{self.node.op_type} node {self.node.name!r}: input {input} axis {axis} "
                                    f"would be sliced two different ways")
                return
        have.append((axis, keep))


@dataclass
class Plan:
    """The per-node edits, the removed classes, and what the selection chose (with the reasons).

    ``sliced`` remembers the constants the rules made, keyed by (original value, slices), so a
    constant shared by several nodes is sliced once."""

    edits: dict[Node, PlanEdit]
    removed: set[int]
    choices: list[Choice]
    sliced: dict = field(default_factory=dict)


def _axis_keeps(mask: np.ndarray, where: str) -> list[np.ndarray]:
    """Per-dim kept indices of a rectangular mask (the outer product of its per-axis 'any')."""
    if mask.ndim == 1:
        return [np.flatnonzero(mask)]
    per = [np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != d)) for d in range(mask.ndim)]
    outer = per[0]
    for p in per[1:]:
        outer = np.multiply.outer(outer, p)
    if not np.array_equal(outer.astype(bool), mask):
        raise PlanError(f"{where}: the kept positions do not form a rectangle, so the tensor cannot be sliced")
    return [np.flatnonzero(p) for p in per]


def build(analysis: Analysis, choices: list[Choice]) -> Plan:
    """The per-node edits for removing every class in ``choices``.

    Raises:
        PlanError: an internal inconsistency (a bug: report it with the model).
    """
    removed = {c for ch in choices for c in ch.remove}
    removed_arr = np.array(sorted(removed), dtype=np.int64)
    roots = analysis.classes.roots

    def keep_mask(atoms):
        return ~np.isin(roots(atoms), removed_arr)

    edits: dict[Node, PlanEdit] = {}

    def edit_of(node: Node, kind: str) -> PlanEdit:
        pe = edits.get(node)
        if pe is None:
            pe = edits[node] = PlanEdit(node, kind)
        return pe

    for node, e in analysis.edits.items():
        where = f"{node.op_type} node {node.name!r}"
        for m in e.members:
            mask = keep_mask(m.atoms)
            if mask.all():
                continue
            for d, keep in enumerate(_axis_keeps(mask, where)):
                ax = m.axis_map[d]
                if ax is not None and len(keep) < mask.shape[d]:
                    edit_of(node, e.kind).add_slice(m.input, ax, keep)
        info = e.info
        if "group" in info and node in edits:
            how, per_group = info["group"]
            kept_out = _kept_along(edits[node], 1, 0, node.inputs[1].constant().shape[0])
            edits[node].attrs["group"] = kept_out // per_group
        if e.kind == "split":
            p = info["position"]
            sizes = [int(_any_along(keep_mask(a), p).sum()) for a in info["parts"]]
            if sizes != [a.shape[p] for a in info["parts"]]:
                edit_of(node, "split").split = sizes
        if e.kind == "slice":
            for k, axis, p, s, end, full in info["cuts"]:
                keep = _any_along(keep_mask(full), p)
                if keep.all():
                    continue
                s2 = int(keep[:s].sum())
                edit_of(node, "slice").slice_bounds[k] = (s2, s2 + int(keep[s:end].sum()), axis)
        if e.kind == "reshape" and info.get("literals"):
            out_keep = keep_mask(info["out_atoms"])
            for a, piece in info["literals"].items():
                p = info["out_axes"].index(a)
                new = int(_any_along(out_keep, p).sum())
                if new == out_keep.shape[p]:
                    continue
                if piece.node is None:
                    pe = edit_of(node, "reshape")
                    if pe.shape is None:
                        pe.shape = np.array(node.inputs[1].constant(), dtype=np.int64).copy()
                    pe.shape[piece.index] = new
                else:
                    edit_of(piece.node, "shape_literal").literals[(piece.input, piece.index)] = new
    from compiler.pruning.compensate import compensate

    compensate(analysis, keep_mask, edit_of)
    return Plan(edits, removed, choices)


def _any_along(mask: np.ndarray, p: int) -> np.ndarray:
    if mask.ndim == 1:
        return mask
    return np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != p))


def _kept_along(pe: PlanEdit, input: int, axis: int, full: int) -> int:
    for ax, keep in pe.slices.get(input, []):
        if ax == axis:
            return len(keep)
    return full


def store(model: Model, plan: Plan) -> None:
    model.meta[PLAN_KEY] = plan


def plan_of(model: Model | None) -> Plan | None:
    return None if model is None else model.meta.get(PLAN_KEY)
