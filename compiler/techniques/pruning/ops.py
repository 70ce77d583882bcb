"""Per-op rules of the channel analysis: sources, contractions, normalizations, elementwise ops.

Each handler ``fn(an, node)`` reads its inputs' layouts from the :class:`Analyzer`,
records members/edits/leaks, and sets its outputs' layouts. Axis-moving ops
(Reshape, Transpose, Concat, Split, Slice, ...) are in :mod:`graft.compiler.techniques.pruning.ops_shape`, the
sources and contractions (Conv, Gemm, MatMul) in :mod:`graft.compiler.techniques.pruning.ops_linear`, what they
share (joining operand layouts) in :mod:`graft.compiler.techniques.pruning.ops_common`; :data:`HANDLERS` collects
them all.
ONNX operator semantics: https://onnx.ai/onnx/operators/ (Conv-11, Gemm-13, MatMul-13,
BatchNormalization-15, LayerNormalization-17, Gather-13).
"""
from __future__ import annotations

import numpy as np

from graft.compiler.techniques.pruning import elementwise as ew
from graft.compiler.techniques.pruning import ops_shape
from graft.compiler.techniques.pruning.analyzer import Analyzer, node_label
from graft.compiler.techniques.pruning.layout import Layout
from graft.compiler.techniques.pruning.ops_common import join, no_padding
from graft.compiler.techniques.pruning.ops_linear import h_conv, h_conv_transpose, h_gemm, h_matmul
from graft.ir import Node


# --------------------------------------------------------------------------- elementwise
def h_unary(an: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    lay = an.layout(x)
    if lay is None:
        _origin_passthrough(an, node)
        return
    if node.op_type == "Clip" and any(v is not None and an.shape(v) not in ((), (1,)) for v in node.inputs[1:]):
        an.block(lay.atoms, f"{node_label(node)} has non-scalar bounds")
        return
    cval = ew.unary(node, lay.cval) if node.op_type in ew.UNARY else np.full(lay.atoms.shape, np.nan)
    an.set_layout(node.outputs[0], Layout(lay.axes, lay.atoms, cval, lay.static))
    for o in node.outputs[1:]:
        if o.name and (o.num_uses or o.is_graph_output()):
            an.block(lay.atoms, f"output {o.name!r} of {node_label(node)} is used")


def _origin_passthrough(an: Analyzer, node: Node) -> None:
    """Identity/Cast of a constant-derived value is the same constant."""
    if node.op_type in ("Identity", "Cast") and node.inputs[0] in an.origins:
        an.origins[node.outputs[0]] = an.origins[node.inputs[0]]


def h_elementwise(an: Analyzer, node: Node) -> None:
    out = node.outputs[0]
    r = len(an.shape(out))
    operands = []
    for i, v in enumerate(node.inputs):
        if v is None:
            continue
        shape = an.shape(v)
        rank = len(shape) if shape is not None else r
        operands.append((i, list(range(r - rank, r))))
    joint, atoms, cvals, statics = join(an, node, operands, list(range(r)))
    if atoms is None:
        return
    an.set_layout(out, Layout(tuple(joint), atoms, ew.combine(node, cvals), ew.combine_static(node, cvals, statics)))


def h_batchnorm(an: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    lay = an.layout(x)
    params = [v.constant() if v is not None else None for v in node.inputs[1:5]]
    if lay.axes != (1,) or any(p is None for p in params) or node.attrs.get("training_mode", 0):
        an.block(lay.atoms, f"{node_label(node)} is in training mode, has non-constant statistics, or normalizes "
                            f"channels not on axis 1")
        return
    if any(o.name and (o.num_uses or o.is_graph_output()) for o in node.outputs[1:]):
        an.block(lay.atoms, f"{node_label(node)}'s running-statistics outputs are used")
        return
    for i in range(1, 5):
        an.member(node, i, lay.atoms, (0,), "norm.scale" if i == 1 else "norm")
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    an.set_layout(node.outputs[0], Layout(lay.axes, lay.atoms, lay.cval * s + (beta - mean * s), lay.static))


def h_instancenorm(an: Analyzer, node: Node) -> None:
    lay = an.layout(node.inputs[0])
    params = [v.constant() if v is not None else None for v in node.inputs[1:3]]
    if lay.axes != (1,) or any(p is None for p in params):
        an.block(lay.atoms, f"{node_label(node)} has non-constant parameters or channels off axis 1")
        return
    an.member(node, 1, lay.atoms, (0,), "norm.scale")
    an.member(node, 2, lay.atoms, (0,), "norm")
    # a constant channel normalizes to 0, so the output is the shift B
    cval = np.where(np.isnan(lay.cval), np.nan, params[1].astype(np.float64))
    an.set_layout(node.outputs[0], Layout(lay.axes, lay.atoms, cval, lay.static))


def h_layernorm(an: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    lay = an.layout(x)
    r = len(an.shape(x))
    axis = int(node.attrs.get("axis", -1))
    axis = axis + r if axis < 0 else axis
    normalized = [a for a in lay.axes if a >= axis]
    if normalized:
        an.cls.mark_inexact(lay.atoms, f"{node_label(node)} normalizes over these channels: removing any changes "
                                       f"its mean and variance")
        for i in (1, 2):
            v = node.inputs[i] if len(node.inputs) > i else None
            if v is None:
                continue
            shape = an.shape(v)
            if v.constant() is None or shape is None:
                an.block(lay.atoms, f"{node_label(node)} has a non-constant scale or bias")
                return
            off = r - len(shape)
            amap = tuple(a - off if a - off >= 0 and shape[a - off] > 1 else None for a in lay.axes)
            an.member(node, i, lay.atoms, amap, "norm.scale" if i == 1 else "norm")
    if any(o.name and (o.num_uses or o.is_graph_output()) for o in node.outputs[1:]):
        an.block(lay.atoms, f"{node_label(node)}'s mean / inverse-std outputs are used")
        return
    an.set_layout(node.outputs[0], Layout(lay.axes, lay.atoms, np.full(lay.atoms.shape, np.nan)))


def h_gather(an: Analyzer, node: Node) -> None:
    data, idx = node.inputs
    axis = int(node.attrs.get("axis", 0))
    lay = an.layout(data)
    table = data.constant()
    out = node.outputs[0]
    so, si = an.shape(out), an.shape(idx)
    if table is not None and table.ndim == 2 and axis == 0 and so is not None and table.dtype.kind == "f":
        atoms = an.cls.new(table.shape[1])
        an.member(node, 0, atoms, (1,), "embedding")
        col = table.astype(np.float64)
        cval = np.where(np.all(col == col[:1], axis=0), col[0], np.nan)
        an.source(node, atoms, "embedding")
        an.set_layout(out, Layout((len(so) - 1,), atoms, cval))
        return
    if lay is None:
        return
    rd = len(an.shape(data))
    axis = axis + rd if axis < 0 else axis
    if axis in lay.axes or si is None:
        an.block(lay.atoms, f"{node_label(node)} gathers along the channel axis")
        return
    shift = len(si) - 1
    an.set_layout(out, Layout(tuple(a if a < axis else a + shift for a in lay.axes), lay.atoms, lay.cval,
                              lay.static))


def h_pool(an: Analyzer, node: Node) -> None:
    """Pooling / resizing / padding: per-channel over spatial axes (channels on axis 1)."""
    lay = an.layout(node.inputs[0])
    if lay.axes != (1,):
        an.block(lay.atoms, f"{node_label(node)} works per channel on axis 1, but channels are on axes {lay.axes}")
        return
    op = node.op_type
    if op == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None:
        an.block(lay.atoms, f"{node_label(node)} gives output sizes (input 'sizes') that include the channel count")
        return
    if op == "Pad":
        pads = node.inputs[1].constant() if len(node.inputs) > 1 and node.inputs[1] is not None else \
            np.asarray(node.attrs.get("pads", []))
        r = len(an.shape(node.inputs[0]))
        axes_in = node.inputs[3].constant() if len(node.inputs) > 3 and node.inputs[3] is not None else None
        axes = [int(a) % r for a in axes_in.ravel()] if axes_in is not None else list(range(r))
        if pads is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes_in is None) or \
                any(pads.ravel()[k] or pads.ravel()[k + len(axes)] for k, a in enumerate(axes) if a == 1):
            an.block(lay.atoms, f"{node_label(node)} pads the channel axis (or at run-time positions)")
            return
    cval = lay.cval
    if op == "Pad" and _pad_value(node) is not _UNIFORM_PAD and np.any(pads > 0):
        # constant-mode padding writes the pad value around a constant channel: it stays constant only
        # where the two agree (it is still input-independent, a constant map, when the pad value is known)
        value = _pad_value(node)
        cval = np.where(cval == value, cval, np.nan) if value is not None else np.full(cval.shape, np.nan)
        an.set_layout(node.outputs[0], Layout(lay.axes, lay.atoms, cval,
                                              lay.static if value is not None else np.zeros(cval.shape, bool)))
        return
    if op in ("AveragePool",) and node.attrs.get("count_include_pad", 0) and not no_padding(node):
        cval = np.where(cval == 0, 0.0, np.nan)
    elif op in ("LpPool", "GlobalLpPool"):
        cval = np.where(cval == 0, 0.0, np.nan)
    an.set_layout(node.outputs[0], Layout(lay.axes, lay.atoms, cval, lay.static))


_UNIFORM_PAD = object()


def _pad_value(node: Node):
    """What Pad writes in the padding: a float (constant mode), None (a run-time value), or
    :data:`_UNIFORM_PAD` (reflect / edge / wrap modes copy the channel's own values)."""
    mode = node.attrs.get("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode != "constant":
        return _UNIFORM_PAD
    if "value" in node.attrs:  # Pad-2
        return float(node.attrs["value"])
    v = node.inputs[2] if len(node.inputs) > 2 else None
    if v is None:
        return 0.0
    c = v.constant()
    return None if c is None or c.size != 1 else float(np.asarray(c, dtype=np.float64).ravel()[0])


def h_reduce(an: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    lay = an.layout(x)
    r = len(an.shape(x))
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = node.inputs[1].constant()
        if arr is None:
            an.block(lay.atoms, f"{node_label(node)} reduces over axes known only at run time")
            return
        axes = arr.ravel().tolist()
    if not axes:
        axes = [] if int(node.attrs.get("noop_with_empty_axes", 0)) else list(range(r))
    axes = sorted(int(a) % r for a in axes)
    if any(a in lay.axes for a in axes):
        if not all(a in axes for a in lay.axes):
            an.block(lay.atoms, f"{node_label(node)} reduces over some of the channel axes {lay.axes}")
            return
        # a statistic over the channels (a decomposed LayerNorm's mean): the output carries no channel,
        # but its value depends on all of them
        an.cls.mark_inexact(lay.atoms, f"{node_label(node)} reduces over these channels: removing any changes "
                                       f"the result")
        return
    keep = int(node.attrs.get("keepdims", 1))
    new_axes = lay.axes if keep else tuple(a - sum(1 for b in axes if b < a) for a in lay.axes)
    cval = lay.cval if node.op_type in ("ReduceMean", "ReduceMax", "ReduceMin") else np.where(
        lay.cval == 0, 0.0, np.nan)
    an.set_layout(node.outputs[0], Layout(new_axes, lay.atoms, cval, lay.static))


def h_softmax(an: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    lay = an.layout(x)
    r = len(an.shape(x))
    default = -1 if an.model.opset >= 13 else 1
    axis = int(node.attrs.get("axis", default)) % r
    touched = [axis] if an.model.opset >= 13 else list(range(axis, r))
    if any(a in lay.axes for a in touched):
        an.cls.mark_inexact(lay.atoms, f"{node_label(node)} normalizes across these channels: removing any changes "
                                       f"the others' values")
    an.set_layout(node.outputs[0], Layout(lay.axes, lay.atoms, np.full(lay.atoms.shape, np.nan), lay.static))


def h_passive(an: Analyzer, node: Node) -> None:
    """Ops that read only a tensor's shape (Shape, Size): nothing to follow."""


def _handlers():
    table = {op: h_unary for op in (*ew.UNARY, *ew.UNARY_OPAQUE)}
    table.update({op: h_elementwise for op in ew.ELEMENTWISE})
    table.update({"Conv": h_conv, "ConvTranspose": h_conv_transpose, "Gemm": h_gemm, "MatMul": h_matmul, "BatchNormalization": h_batchnorm,
                  "InstanceNormalization": h_instancenorm, "LayerNormalization": h_layernorm,
                  "Gather": h_gather, "Shape": h_passive, "Size": h_passive,
                  "Softmax": h_softmax, "LogSoftmax": h_softmax, "Hardmax": h_softmax})
    table.update({op: h_pool for op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                                        "LpPool", "GlobalLpPool", "Resize", "Upsample", "Pad")})
    table.update({op: h_reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                                          "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                                          "ReduceSumSquare")})
    table.update(ops_shape.HANDLERS)
    return table


SOURCES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"})
# ops that carry a constant through broadcasting (class tokens expanded to the batch)
ORIGIN_OPS = frozenset({"Expand", "Identity", "Cast"})
HANDLERS = _handlers()
