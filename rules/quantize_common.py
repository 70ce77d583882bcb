"""Builders shared by the quantization rule modules (not rules themselves).

- :func:`qdq`: ``DQ(Q(x))`` with per-tensor parameters.
- :func:`quantized_weight`: ``DQ(int8 W)`` per channel / per tensor / blockwise, made once per weight.
- :func:`quantized_bias`: ``DQ(int32 b)`` with scale s_x * s_w.
- :func:`reemit`: a node rebuilt with new inputs; it keeps the original's name for selection
  (``node_key``), so exclusion lists given by node name still apply after earlier rewrites.
"""
from __future__ import annotations

import numpy as np

from graft.rules.quantize_context import QNAME_KEY, QuantContext, node_key
from graft.rules.quantize_params import (QParams, blocked_weight_params, quantize, quantize_bias,
                                          weight_params)
from graft.ir import Node, Value
from graft.ir.dtypes import DataType

FLOAT_TYPES = (DataType.FLOAT, DataType.FLOAT16, DataType.DOUBLE, DataType.BFLOAT16)
def is_float_weight(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" and a.size > 0


def float_activation(v: Value | None) -> bool:
    """A non-constant float value (an activation)."""
    return v is not None and v.constant() is None and (v.dtype is None or v.dtype in FLOAT_TYPES)


def reemit(op, node: Node, inputs, **attrs):
    """``node``'s op with ``inputs`` (attributes: the node's, updated by ``attrs``); returns its output(s)."""
    merged = {**node.attrs, **attrs}
    outs = getattr(op.domain(node.domain), node.op_type)(*inputs, _outputs=len(node.outputs), _name=node.name,
                                                          **merged)
    first = outs[0] if isinstance(outs, tuple) else outs
    first.producer.meta[QNAME_KEY] = node_key(node)
    return outs


def qdq(op, value: Value, p: QParams, hint: str) -> Value:
    """``DQ(Q(value))`` with per-tensor parameters ``p`` (scalar scale and zero point)."""
    scale = op.const(p.scale.reshape(()), name=f"{hint}_scale")
    zp = op.const(p.zero_point.reshape(()), name=f"{hint}_zero_point")
    q = op.QuantizeLinear(value, scale, zp, _name=f"{hint}_QuantizeLinear")
    return op.DequantizeLinear(q, scale, zp, _name=f"{hint}_DequantizeLinear")


def weight_consts(op, ctx: QuantContext, w_value: Value, axis: int | None, *, transpose: bool = False
                  ) -> tuple[Value, Value, Value, QParams]:
    """Initializers (q, scale, zero point) of weight ``w_value``, made once per (weight, axis, grid, layout).

    ``axis`` is the channel axis (None: per tensor); with ``ctx.block_size`` the parameters are
    blockwise along ``axis`` instead. ``transpose`` quantizes the 2-D transpose of the weight
    (Gemm transB=1 weights read as (K, N)).
    """
    key = (w_value.name, axis, ctx.weight.name, ctx.block_size, transpose)
    hit = ctx.weight_cache.get(key)
    if hit is not None and all(v.graph is not None for v in hit[:3]):
        return hit
    w = w_value.constant()
    if transpose:
        w = np.ascontiguousarray(w.T)
    if ctx.block_size:
        p = blocked_weight_params(w, axis, ctx.block_size, ctx.weight, name=w_value.name)
    else:
        p = weight_params(w, axis, ctx.weight, name=w_value.name)
    qarr = quantize(w, p)
    if ctx.weight.dtype in (DataType.INT4, DataType.UINT4):
        import ml_dtypes

        npdt = ml_dtypes.int4 if ctx.weight.dtype == DataType.INT4 else ml_dtypes.uint4
        qarr = qarr.astype(npdt)
        zarr = p.zero_point.astype(npdt)
    else:
        zarr = p.zero_point
    per_axis = axis is not None
    qv = op.const(qarr, dtype=ctx.weight.dtype, name=f"{w_value.name}_quantized")
    sv = op.const(p.scale if per_axis else p.scale.reshape(()), name=f"{w_value.name}_scale")
    zv = op.const(zarr if per_axis else zarr.reshape(()), dtype=ctx.weight.dtype, name=f"{w_value.name}_zero_point")
    ctx.weight_cache[key] = (qv, sv, zv, p)
    return qv, sv, zv, p


def quantized_weight(op, ctx: QuantContext, w_value: Value, axis: int | None) -> tuple[Value, QParams]:
    """``DQ(q_w)`` for weight ``w_value`` (per channel along ``axis``, or blockwise with ``ctx.block_size``)."""
    qv, sv, zv, p = weight_consts(op, ctx, w_value, axis)
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if ctx.block_size:
        attrs["block_size"] = ctx.block_size
    return op.DequantizeLinear(qv, sv, zv, _name=f"{w_value.name}_DequantizeLinear", **attrs), p


def quantized_bias(op, b: np.ndarray, x_params: QParams, w_params: QParams, hint: str) -> Value:
    """``DQ(int32 bias, s_x * s_w)`` (per channel along axis 0 when the weight is per channel)."""
    qb, bp = quantize_bias(b, x_params.scale, w_params.scale, name=hint)
    per_channel = bp.scale.ndim == 1 and bp.scale.size > 1
    scale = op.const(bp.scale if per_channel else bp.scale.reshape(()), name=f"{hint}_scale")
    zp = op.const(bp.zero_point if per_channel else bp.zero_point.reshape(()), name=f"{hint}_zero_point")
    attrs = {"axis": 0} if per_channel else {}
    return op.DequantizeLinear(op.const(qb, name=f"{hint}_quantized"), scale, zp,
                               _name=f"{hint}_DequantizeLinear", **attrs)
