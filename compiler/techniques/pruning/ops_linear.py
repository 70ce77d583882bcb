"""Channel-analysis rules for the ops that make and consume channels: Conv, Gemm, MatMul.

A Conv / Gemm / MatMul with a constant weight is a *source* (its output channels are
fresh atoms; the weight's output rows and the bias are producer members) and, when its
input carries atoms, a *consumer*: the weight's input columns are members and the
contraction is a :class:`~graft.compiler.techniques.pruning.layout.Leak` (exactness and compensation).
Depthwise and grouped Conv propagate channels instead (each output reads one input
channel / one group). A MatMul of two activations (attention) unites the positions it
contracts with what remains of them (a head's Q·K^T score with the whole head).
ONNX semantics: Conv-11, Gemm-13, MatMul-13 (https://onnx.ai/onnx/operators/).
"""
from __future__ import annotations

import numpy as np

from graft.compiler.techniques.pruning.analyzer import Analyzer, node_label
from graft.compiler.techniques.pruning.layout import Layout, Leak
from graft.compiler.techniques.pruning.ops_common import join, no_padding
from graft.ir import Node


def weight_view(v) -> tuple[np.ndarray | None, tuple | None]:
    """(the weight as the op reads it, where to slice it).

    A constant is sliced where it is read (None). ``Transpose(W)`` of a constant read only
    there (how linear layers captured from torch look) is sliced on the Transpose's input, so
    the parameter keeps its identity: the second item is ``(transpose node, perm)``.
    """
    if v is None:
        return None, None
    arr = v.constant()
    if arr is not None:
        return arr, None
    p = v.producer
    if p is not None and p.op_type == "Transpose" and p.domain in ("", "ai.onnx") and v.num_uses == 1 \
            and p.inputs[0] is not None and p.inputs[0].constant() is not None:
        base = p.inputs[0].constant()
        perm = list(p.attrs.get("perm", list(reversed(range(base.ndim)))))
        return np.transpose(base, perm), (p, perm)
    return None, None


def weight_member(an: Analyzer, node: Node, i: int, view, atoms: np.ndarray, axis: int, role: str) -> None:
    if view is None:
        an.member(node, i, atoms, (axis,), role)
    else:
        tnode, perm = view
        an.member(tnode, 0, atoms, (perm[axis],), role, kind="const")


def _zero_slices(w: np.ndarray, axis: int) -> np.ndarray:
    """True per index of ``axis`` where the weight slice is all zero."""
    return ~np.any(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) != 0, axis=1)


def _static_dims(v, first: int) -> bool:
    """The value's dims from ``first`` on are fixed numbers in the model (not symbolic)."""
    return v.shape is not None and all(isinstance(d, int) and d > 0 for d in v.shape[first:])


def h_conv(an: Analyzer, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    lay = an.layout(x)
    wt = w.constant() if w is not None else None
    bias = b.constant() if b is not None else None
    if wt is None or wt.ndim < 3 or (b is not None and bias is None):
        if lay is not None:
            an.block(lay.atoms, f"{node_label(node)} has a weight or bias that is not a constant")
        return
    if lay is not None and lay.axes != (1,):
        an.block(lay.atoms, f"{node_label(node)} reads channels on axes {lay.axes}, not the channel axis 1")
        lay = None
    group = int(node.attrs.get("group", 1))
    c_out, cin_g = wt.shape[0], wt.shape[1]
    out = node.outputs[0]
    b_or_0 = bias.astype(np.float64) if bias is not None else np.zeros(c_out)
    e = an.edit(node, "conv")
    if group == 1:
        leak = None
        if lay is not None:
            an.member(node, 1, lay.atoms, (1,), "consumer")
            leak = Leak(node, lay.atoms, lay.cval, _zero_slices(wt, 1), no_padding(node), 1, wt,
                        static=lay.static, map_ok=_static_dims(node.outputs[0], 1))
            an.leaks.append(leak)
        atoms = an.cls.new(c_out)
        if leak is not None:
            leak.out_atoms = atoms
        cval = np.where(_zero_slices(wt, 0), b_or_0, np.nan)
        an.member(node, 1, atoms, (0,), "producer")
        if b is not None:
            an.member(node, 2, atoms, (0,), "bias")
        an.source(node, atoms, "conv")
        an.set_layout(out, Layout((1,), atoms, cval))
        return
    if lay is None:
        return  # a grouped conv over channels nothing can prune: its output channels are fixed too
    c_in = cin_g * group
    if lay.atoms.shape != (c_in,) or c_out % group:
        an.block(lay.atoms, f"{node_label(node)}: group={group} does not divide its channels")
        return
    cout_g = c_out // group
    if cin_g == 1:  # depthwise (channel multiplier cout_g): output o reads input o // cout_g
        atoms = np.repeat(lay.atoms, cout_g)
        cin_cval = np.repeat(lay.cval, cout_g)
        wsum = wt.reshape(c_out, -1).astype(np.float64).sum(axis=1)
        cval = np.where(_zero_slices(wt, 0) | (cin_cval == 0), b_or_0,
                        np.where(np.isnan(cin_cval) | (not no_padding(node)), np.nan, cin_cval * wsum + b_or_0))
        static = np.repeat(lay.static, cout_g) | _zero_slices(wt, 0)
        e.info["group"] = ("depthwise", cout_g)
    else:  # grouped: channels of one group go together
        for k in range(group):
            an.cls.union_all(lay.atoms[k * cin_g:(k + 1) * cin_g])
        an.conv_groups.append(lay.atoms)
        atoms = np.repeat(lay.atoms[::cin_g], cout_g)
        an.cls.union_arrays(atoms, np.repeat(lay.atoms[::cin_g], cout_g))
        cval = np.full(c_out, np.nan)
        static = None
        e.info["group"] = ("grouped", cout_g)
    an.member(node, 1, atoms, (0,), "producer")
    if b is not None:
        an.member(node, 2, atoms, (0,), "bias")
    an.set_layout(out, Layout((1,), atoms, cval, static))


def h_conv_transpose(an: Analyzer, node: Node) -> None:
    """ConvTranspose-11, weight (C_in, C_out / group, k...): input channels are weight rows, output
    channels its columns. Only group=1; a constant input channel is not compensated (overlapping
    windows make its contribution a map even without padding)."""
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    lay = an.layout(x)
    wt = w.constant() if w is not None else None
    bias = b.constant() if b is not None else None
    if wt is None or wt.ndim < 3 or (b is not None and bias is None) or int(node.attrs.get("group", 1)) != 1 \
            or (lay is not None and lay.axes != (1,)):
        if lay is not None:
            an.block(lay.atoms, f"{node_label(node)} is grouped, reads channels off axis 1, or has non-constant "
                                f"weights")
        return
    leak = None
    if lay is not None:
        an.member(node, 1, lay.atoms, (0,), "consumer", kind="conv_transpose")
        leak = Leak(node, lay.atoms, lay.cval, _zero_slices(wt, 0), False, 0, wt, static=lay.static)
        an.leaks.append(leak)
    atoms = an.cls.new(wt.shape[1])
    if leak is not None:
        leak.out_atoms = atoms
    an.member(node, 1, atoms, (1,), "producer", kind="conv_transpose")
    if b is not None:
        an.member(node, 2, atoms, (0,), "bias", kind="conv_transpose")
    b_or_0 = bias.astype(np.float64) if bias is not None else np.zeros(wt.shape[1])
    an.source(node, atoms, "conv")
    an.set_layout(node.outputs[0], Layout((1,), atoms, np.where(_zero_slices(wt, 1), b_or_0, np.nan)))


def h_gemm(an: Analyzer, node: Node) -> None:
    a_in = node.inputs[0]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    lay = an.layout(a_in)
    wt, view = weight_view(node.inputs[1])
    trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    cc = c.constant() if c is not None else None
    if wt is None or wt.ndim != 2 or (c is not None and cc is None):
        if lay is not None:
            an.block(lay.atoms, f"{node_label(node)} has a B or C input that is not a constant")
        return
    leak = None
    if lay is not None:
        if trans_a or lay.axes != (1,):
            an.block(lay.atoms, f"{node_label(node)} reads the channels transposed (transA=1)")
        else:
            k_axis = 1 if trans_b else 0
            weight_member(an, node, 1, view, lay.atoms, k_axis, "consumer")
            leak = Leak(node, lay.atoms, lay.cval, _zero_slices(wt, k_axis), True, k_axis, wt, static=lay.static,
                        map_ok=True)
            an.leaks.append(leak)
    n_axis = 0 if trans_b else 1
    n = wt.shape[n_axis]
    atoms = an.cls.new(n)
    if leak is not None:
        leak.out_atoms = atoms
    weight_member(an, node, 1, view, atoms, n_axis, "producer")
    cval = np.where(_zero_slices(wt, n_axis), 0.0, np.nan)
    if cc is not None:
        beta = float(node.attrs.get("beta", 1.0))
        if cc.ndim >= 1 and cc.shape[-1] == n and n > 1:
            an.member(node, 2, atoms, (cc.ndim - 1,), "bias")
            col = cc.reshape(-1, n).astype(np.float64)
            uniform = np.all(col == col[:1], axis=0)
            cval = np.where(uniform, cval + beta * col[0], np.nan)
        else:
            cval = cval + beta * float(np.asarray(cc, dtype=np.float64).ravel()[0]) if cc.size == 1 else \
                np.full(n, np.nan)
    an.source(node, atoms, "linear")
    an.set_layout(node.outputs[0], Layout((1,), atoms, cval))


def h_matmul(an: Analyzer, node: Node) -> None:
    a_in, b_in = node.inputs
    la, lb = an.layout(a_in), an.layout(b_in)
    wt, view = weight_view(b_in)
    out = node.outputs[0]
    sa, sb, so = an.shape(a_in), an.shape(b_in), an.shape(out)
    if sa is None or sb is None or so is None:
        an.block_inputs(node, f"{node_label(node)} has operands of unknown shape")
        return
    if wt is not None and wt.ndim == 2 and len(sa) >= 2:
        leak = None
        if la is not None:
            if la.axes != (len(sa) - 1,):
                an.block(la.atoms, f"{node_label(node)} multiplies a constant weight with channels on axes {la.axes}")
            else:
                weight_member(an, node, 1, view, la.atoms, 0, "consumer")
                leak = Leak(node, la.atoms, la.cval, _zero_slices(wt, 0), True, 0, wt, static=la.static,
                            map_ok=len(sa) == 2)
                an.leaks.append(leak)
        atoms = an.cls.new(wt.shape[1])
        if leak is not None:
            leak.out_atoms = atoms
        weight_member(an, node, 1, view, atoms, 1, "producer")
        an.source(node, atoms, "linear")
        an.set_layout(out, Layout((len(so) - 1,), atoms, np.where(_zero_slices(wt, 1), 0.0, np.nan)))
        return
    if la is None and lb is None:
        return
    if len(sa) < 2 or len(sb) < 2 or a_in.constant() is not None or wt is not None:
        an.block_inputs(node, f"{node_label(node)} is a MatMul form the analysis does not follow "
                              f"(1-D operand or a constant left/batched operand)")
        return
    r = len(so)
    lab_a = [("b", i + r - len(sa)) for i in range(len(sa) - 2)] + ["m", "k"]
    lab_b = [("b", i + r - len(sb)) for i in range(len(sb) - 2)] + ["k", "n"]
    lab_o = [("b", i) for i in range(r - 2)] + ["m", "n"]
    joint, atoms, cvals, _ = join(an, node, [(0, lab_a), (1, lab_b)], lab_o + ["k"])
    if atoms is None:
        return
    kept = [lab for lab in joint if lab in lab_o]
    contracted = [d for d, lab in enumerate(joint) if lab not in lab_o]
    zero = (cvals[0] == 0) | (cvals[1] == 0)
    if contracted:
        moved = np.moveaxis(atoms, contracted, list(range(len(joint) - len(contracted), len(joint))))
        rest = moved.reshape(moved.shape[:len(kept)] + (-1,))
        zmoved = np.moveaxis(zero, contracted, list(range(len(joint) - len(contracted), len(joint))))
        zrest = np.all(zmoved.reshape(zmoved.shape[:len(kept)] + (-1,)), axis=-1)
        if not kept:  # fully contracted: the classes flow into values no class owns
            flat = rest.reshape(-1)
            an.leaks.append(Leak(node, flat, np.where(np.broadcast_to(zero, atoms.shape).ravel(), 0.0, np.nan),
                                 np.zeros(flat.size, dtype=bool), False, None))
            return
        for idx in np.ndindex(rest.shape[:-1]):
            an.cls.union_all(rest[idx])
        atoms_out = rest[..., 0]
        cval_out = np.where(zrest, 0.0, np.nan)
    else:
        atoms_out, cval_out = atoms, np.where(zero, 0.0, np.nan)
    axes = tuple(lab_o.index(lab) for lab in kept)
    an.set_layout(out, Layout(axes, np.ascontiguousarray(atoms_out), cval_out))


