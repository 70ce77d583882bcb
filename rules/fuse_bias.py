"""Fold a per-channel constant Add after Conv / ConvTranspose into the op's bias.

Conv-11 and ConvTranspose-11 add their optional bias B (shape (C_out,)) along
the channel axis 1 of the output Y (N, C_out, d1, ...). A constant c that,
right-aligned against Y's rank, is 1 on every axis but axis 1, broadcasts to
exactly that per-channel addition, so (ONNX Broadcasting.md)::

    Add(Conv(x, W, B), c) = Conv(x, W, B + c.reshape(-1))      (c broadcast to C_out)

Exporters emit this shape of graph when a framework keeps the bias apart (the
PP-OCRv4 detector's ConvTranspose + Add before a BatchNormalization); folding it
lets ``fold_batchnorm_into_conv_transpose`` fire afterwards.

C_out is W.shape[0] for Conv and W.shape[1] * group for ConvTranspose
(weight layout (C_in, C_out/group, k...)). Source: ONNX operators Conv-11,
ConvTranspose-11, Add-14.
"""
import numpy as np

from graft.compiler.engine import Const, Rule, Var, op

x, w, b, c = Var("x"), Const("w"), Const("b"), Const("c")


def _c_out(m, conv) -> int:
    wt = m[w]
    return wt.shape[0] if conv.op_type == "Conv" else wt.shape[1] * conv.attrs.get("group", 1)


def check(m):
    conv = m.conv
    wt, ct = m[w], m[c]
    if wt.dtype.kind != "f" or ct.dtype != wt.dtype:
        return m.fail(f"{conv.op_type} weight is {wt.dtype} and the added constant {ct.dtype}; "
                      f"only same-dtype floating point folds", m.add)
    rank = wt.ndim  # Y has the weight's rank: (N, C_out, spatial...)
    if ct.ndim > rank:
        return m.fail(f"added constant has rank {ct.ndim} > output rank {rank}: it would broadcast Y", m.add)
    dims = (1,) * (rank - ct.ndim) + ct.shape
    c_out = _c_out(m, conv)
    if any(d != 1 for i, d in enumerate(dims) if i != 1) or dims[1] not in (1, c_out):
        return m.fail(f"added constant of shape {ct.shape} is not per-channel for {c_out} output channels "
                      f"(want 1s on every axis but axis 1)", m.add)
    return None


def replacement(op, m):
    """Add(Conv(x, W, B), c) -> Conv(x, W, B + c)."""
    conv = m.conv
    wt = m[w]
    c_out = _c_out(m, conv)
    bias = np.broadcast_to(m[c].reshape(-1), (c_out,)) + m.get(b, np.zeros(c_out, wt.dtype))
    make = getattr(op, conv.op_type)
    return make(m[x], m.value(w), op.const(bias.astype(wt.dtype), name=f"{conv.name or 'conv'}_bias"),
                **conv.attrs)


def _rule(op_type: str) -> Rule:
    pattern = op.Add(getattr(op, op_type)(x, w, op.optional(b), name="conv"), c, name="add")
    return Rule(f"fuse_add_into_{op_type.lower()}_bias", pattern, replacement, check=check,
                doc=f"Add({op_type}(x, W, B), c) -> {op_type}(x, W, B + c) for a per-channel constant c.")


fuse_add_into_conv_bias = _rule("Conv")
fuse_add_into_convtranspose_bias = _rule("ConvTranspose")
RULES = [fuse_add_into_conv_bias, fuse_add_into_convtranspose_bias]
