"""The pruning plan: the per-node edits the removal rules (``rules/prune.py``) apply.

A pruning technique (:mod:`graft.compiler.techniques.pruning`) analyses the model, chooses
what to remove and builds a :class:`Plan`; it stores the plan in
``model.meta["graft.prune_plan"]`` (:func:`store`) before the rewrite pass, and the rules
read it with :func:`plan_of`. This module is the data they share, nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graft.ir import Model, Node

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
    choices: list  # the selection's Choice records (graft.compiler.techniques.pruning.select)
    sliced: dict = field(default_factory=dict)


def store(model: Model, plan: Plan) -> None:
    model.meta[PLAN_KEY] = plan


def plan_of(model: Model | None) -> Plan | None:
    return None if model is None else model.meta.get(PLAN_KEY)
