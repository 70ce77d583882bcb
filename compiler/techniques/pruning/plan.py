"""From chosen classes to per-node edits (:class:`graft.rules.prune_plan.Plan`), the context the
removal rules (``rules/prune.py``) read.

For every node the analysis recorded, the plan says which indices of which axis of
which constant input to keep, and the op-specific consequences: a depthwise or
grouped Conv's new ``group``, a Split's new sizes, a Slice's new bounds on the
channel axis, the literals of a Reshape target that name a channel count, and the
compensation of a consumer whose removed inputs did not depend on the model's
input (:mod:`graft.compiler.techniques.pruning.compensate`). The plan lives in
``model.meta["graft.prune_plan"]`` between the analysis pass and the rewrite pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graft.compiler.techniques.pruning.dependency import Analysis
from graft.compiler.techniques.pruning.select import Choice
from graft.ir import Node
from graft.rules.prune_plan import Plan, PlanEdit, PlanError

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
    from graft.compiler.techniques.pruning.compensate import compensate

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
