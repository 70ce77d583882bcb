"""What the channel analysis's op handlers share: joining the layouts of several operands, padding checks.

Below :mod:`~graft.compiler.techniques.pruning.ops` (elementwise, normalization, pooling),
:mod:`~graft.compiler.techniques.pruning.ops_linear` (Conv, Gemm, MatMul) and
:mod:`~graft.compiler.techniques.pruning.ops_shape` (Reshape, Concat, ...), which all use it.
"""
from __future__ import annotations

import numpy as np

from graft.compiler.techniques.pruning.analyzer import Analyzer, Origin, node_label
from graft.ir import Node


def to_joint(arr: np.ndarray, labels: list, joint: list, joint_shape: tuple) -> np.ndarray:
    """``arr`` (dims labelled ``labels``, all in ``joint``) broadcast onto the joint label space."""
    present = [lab for lab in joint if lab in labels]
    order = [labels.index(lab) for lab in present]
    a = np.transpose(arr, order) if order != list(range(arr.ndim)) else arr
    shape = [a.shape[present.index(lab)] if lab in labels else 1 for lab in joint]
    return np.broadcast_to(a.reshape(shape), joint_shape)


def _const_in_value_axes(origin: Origin) -> np.ndarray | None:
    """The constant laid out along the value's axes (size 1 on broadcast axes)."""
    arr = np.asarray(origin.array)
    mapped = [a for a in origin.axis_map if a is not None]
    if any(arr.shape[a] != 1 for a in range(arr.ndim) if a not in mapped):
        return None
    srt = sorted(mapped)
    arr = np.transpose(arr.reshape([arr.shape[a] for a in srt]), [srt.index(m) for m in mapped])
    return arr.reshape([arr.shape[mapped.index(a)] if a is not None else 1 for a in origin.axis_map])


def _const_over_joint(origin: Origin, labels: list, joint: list, joint_shape: tuple) -> np.ndarray:
    """The constant's values over the joint labels when it is uniform along its other axes, else NaN."""
    full = _const_in_value_axes(origin) if origin.array.dtype.kind in "fiub" else None
    if full is None or full.ndim != len(labels):
        return np.full(joint_shape, np.nan)
    full = full.astype(np.float64)
    keep_axes = [ax for ax, lab in enumerate(labels) if lab in joint]
    for ax in range(full.ndim):
        if ax in keep_axes or full.shape[ax] == 1:
            continue
        first = np.take(full, [0], axis=ax)
        if not np.array_equal(np.broadcast_to(first, full.shape), full):
            return np.full(joint_shape, np.nan)
        full = first
    sub = full.reshape([full.shape[ax] for ax in keep_axes])
    return np.array(to_joint(sub, [labels[ax] for ax in keep_axes], joint, joint_shape), dtype=np.float64)


def join(an: Analyzer, node: Node, operands: list, joint_order: list):
    """Unite the carried atoms of ``operands`` position by position.

    Args:
        operands: ``(input index, labels per axis of that input)``; equal labels are the same index space.
        joint_order: label order for the joint array.

    Returns:
        (joint labels, joint atoms, cval per operand, static per operand, both over the joint space) —
        atoms None when no operand
        carries anything. Constants spanning a joint label become members; other tensors that span
        one with more than one element block the joint atoms.
    """
    carried = []
    sizes: dict = {}
    for i, labels in operands:
        v = node.inputs[i]
        shape = an.shape(v)
        if shape is not None:
            for lab, d in zip(labels, shape):
                sizes[lab] = max(sizes.get(lab, 1), d)
        lay = an.layout(v)
        if lay is not None:
            carried.append((i, labels, lay))
    if not carried:
        return None, None, None, None
    carried_labels = {labels[a] for _, labels, lay in carried for a in lay.axes}
    joint = [lab for lab in joint_order if lab in carried_labels]
    jshape = tuple(sizes[lab] for lab in joint)
    atoms = None
    for i, labels, lay in carried:
        arr = to_joint(lay.atoms, [labels[a] for a in lay.axes], joint, jshape)
        if atoms is None:
            atoms = np.array(arr)
        else:
            an.cls.union_arrays(atoms, arr)
    cvals, statics = [], []
    for i, labels in operands:
        v = node.inputs[i]
        lay = an.layout(v)
        if lay is not None:
            cvals.append(np.array(to_joint(lay.cval, [labels[a] for a in lay.axes], joint, jshape)))
            statics.append(np.array(to_joint(lay.static, [labels[a] for a in lay.axes], joint, jshape)))
            continue
        statics.append(np.full(jshape, v is not None and an.origin_of(node, i) is not None))
        shape = an.shape(v)
        spans = [lab for lab in joint if lab in labels and shape is not None and shape[labels.index(lab)] > 1]
        origin = an.origin_of(node, i)
        if shape is None and v is not None and origin is None:
            an.block(atoms, f"{node_label(node)} combines these channels with {v.name!r}, whose shape is unknown")
            cvals.append(np.full(jshape, np.nan))
            continue
        if origin is not None:
            if spans:
                amap = []
                for lab in joint:
                    if lab in labels and shape[labels.index(lab)] > 1:
                        cax = origin.axis_map[labels.index(lab)]
                        amap.append(cax if cax is not None and origin.array.shape[cax] > 1 else None)
                    else:
                        amap.append(None)
                an.member(origin.node, origin.input, atoms, tuple(amap), "const")
            cvals.append(_const_over_joint(origin, labels, joint, jshape))
            continue
        if spans and v is not None:
            an.block(atoms, f"{node_label(node)} combines these channels with {v.name!r}, which no prunable layer "
                            f"produces (its dims {spans} cannot shrink with them)")
        cvals.append(np.full(jshape, np.nan))
    return joint, atoms, cvals, statics


def no_padding(node: Node) -> bool:
    """No padding: a constant input channel stays uniform through the op."""
    pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(pad, bytes):
        pad = pad.decode()
    return pad in ("NOTSET", "VALID") and not any(node.attrs.get("pads", []))
