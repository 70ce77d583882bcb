"""Importance of each removal class, summed over every weight of its group.

For class ``c`` of a group, over every weight member (the producers' output rows,
the consumers' input columns, embedding columns) and every position ``p`` of the
member that belongs to ``c``:

- ``l1``:  ``I(c) = sum_p sum |w_p|``  (Li et al. 2017, "Pruning Filters for Efficient ConvNets")
- ``l2``:  ``I(c) = sqrt(sum_p sum w_p^2)``  (the group norm of Fang et al. 2023, "DepGraph", §3.3)
- ``bn_scale``: ``I(c) = sum |gamma_c|`` over the group's BatchNormalization scales
  (Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming");
  a group without BatchNormalization falls back to ``l2`` and says so.
- ``taylor``: ``I(c) = |sum_p sum w_p * dL/dw_p|``, the first-order Taylor estimate of the
  loss change when the class is removed (Molchanov et al. 2019, "Importance Estimation
  for Neural Network Pruning", eq. 3-4), with gradients from calibration data
  (:mod:`graft.compiler.techniques.pruning.taylor`).

Scores are float64 arrays aligned with :attr:`Group.classes`.
"""
from __future__ import annotations

import numpy as np

from graft.compiler.techniques.pruning.dependency import Analysis, Group

CRITERIA = ("l1", "l2", "bn_scale", "taylor")
WEIGHT_ROLES = ("producer", "consumer", "embedding")


class CriterionError(ValueError):
    """An unknown criterion, or one whose inputs are missing (Taylor without gradients)."""


def _per_position(w: np.ndarray, axis: int, fn) -> np.ndarray:
    moved = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0)
    return fn(moved.reshape(moved.shape[0], -1)).astype(np.float64)


def scores(analysis: Analysis, group: Group, criterion: str,
           grads: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, str]:
    """(importance per class of ``group``, a note when the criterion fell back).

    Args:
        grads: initializer name → dL/dw, needed for ``taylor``.

    Raises:
        CriterionError: unknown criterion; ``taylor`` without ``grads``.
    """
    if criterion not in CRITERIA:
        raise CriterionError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    index = {c: i for i, c in enumerate(group.classes)}
    out = np.zeros(len(group.classes))
    note = ""
    roots_of = analysis.classes.roots
    if criterion == "bn_scale":
        scales = [m for m in group.members if m.role == "norm.scale" and m.node.op_type == "BatchNormalization"]
        if scales:
            for m in scales:
                gamma = np.abs(m.node.inputs[m.input].constant().astype(np.float64))
                _accumulate(out, index, roots_of(m.atoms), gamma)
            return out, note
        criterion, note = "l2", "no BatchNormalization in this group: ranked by l2"
    if criterion == "taylor" and grads is None:
        raise CriterionError("the taylor criterion needs gradients from calibration data (pass calibration inputs)")
    signed = np.zeros(len(group.classes))
    for m in group.members:
        if m.role not in WEIGHT_ROLES or len(m.axis_map) != 1:
            continue
        value = m.node.inputs[m.input]
        w = value.constant()
        axis = m.axis_map[0]
        if criterion == "l1":
            per = _per_position(w, axis, lambda a: np.abs(a).sum(axis=1))
        elif criterion == "l2":
            per = _per_position(w, axis, lambda a: (a * a).sum(axis=1))
        else:
            g = grads.get(value.name)
            if g is None or g.shape != w.shape:
                continue
            per = _per_position(np.asarray(w, dtype=np.float64) * g, axis, lambda a: a.sum(axis=1))
            _accumulate(signed, index, roots_of(m.atoms), per)
            continue
        _accumulate(out, index, roots_of(m.atoms), per)
    if criterion == "l2":
        out = np.sqrt(out)
    elif criterion == "taylor":
        out = np.abs(signed)
    return out, note


def _accumulate(out: np.ndarray, index: dict, roots: np.ndarray, per: np.ndarray) -> None:
    for r, v in zip(roots.ravel().tolist(), per.ravel().tolist()):
        i = index.get(r)
        if i is not None:
            out[i] += v
