"""QDQ propagation and clean-up: the rules that let a runtime fuse quantized ops.

These rules need no calibration; each is an identity of the ONNX operator semantics.

- ``propagate_dq_through_<op>`` for the ops that only move data (Reshape, Transpose,
  Flatten, Squeeze, Unsqueeze, Slice, MaxPool)::

      op(DQ(q, s, z)) = DQ(op(q), s, z)          (per-tensor s, z)

  DequantizeLinear is elementwise and monotonic (s > 0), so it commutes with any
  permutation/selection of elements and with max (MaxPool on int8/uint8 needs opset 12).
  The op then runs on the 8-bit data and the DQ lands next to the op that consumes it.
- ``propagate_dq_through_concat``: Concat(DQ(q1, s, z), ..., DQ(qn, s, z)) = DQ(Concat(q1..qn), s, z)
  when every input has the same scale and zero point (the driver equalizes Concat scales).
- ``fold_requantize``: Q(DQ(q, s, z), s, z) = q — the same grid twice is the identity.
- ``fold_relu_into_quantize``: Q(Relu(x), s, z) = Q(x, s, z) when z is the grid's minimum
  (uint8 z = 0): Q saturates every x < 0 to z = Q(0). Likewise Q(Clip(x, 0, c), s, z) = Q(x, s, z)
  when z is the minimum and the grid's top (qmax - z) * s does not exceed c.
Source: ONNX operators QuantizeLinear-13/19/21, DequantizeLinear-13/19/21 (round half to
even, saturation); onnxruntime's QDQ "drop DQ/Q around data-movement ops" and ReluQuantFusion
transformers implement the same identities at run time.
"""
from __future__ import annotations

import numpy as np

from graft.compiler.engine import Rule, Var, op
from graft.rules.quantize_context import QNAME_KEY, dq_params, is_dequantized, node_key
from graft.ir.dtypes import DataType

xq = Var("x", where=is_dequantized)
e1, e2, e3, e4 = Var("e1"), Var("e2"), Var("e3"), Var("e4")
x, s, z = Var("x"), Var("s"), Var("z")

_QMIN = {DataType.UINT8: 0, DataType.INT8: -128, DataType.UINT16: 0, DataType.INT16: -32768}
_QMAX = {DataType.UINT8: 255, DataType.INT8: 127, DataType.UINT16: 65535, DataType.INT16: 32767}


def _hoist(op_type: str, n_extra: int, min_opset: int = 1) -> Rule:
    extras = (e1, e2, e3, e4)[:n_extra]
    pattern = getattr(op, op_type)(xq, *[op.optional(e) for e in extras], name="node")

    def check(m):
        if m.opset < min_opset:
            return m.fail(f"{op_type} on 8-bit integers needs opset {min_opset}, the model has {m.opset}", m.node)
        if len(m.node.outputs) > 1 and any(o.num_uses or o.is_graph_output() for o in m.node.outputs[1:]):
            return m.fail(f"{op_type}'s extra outputs are used", m.node)

    def replacement(op, m):
        """op(DQ(q, s, z)) -> DQ(op(q), s, z)."""
        dq = m[xq].producer
        moved = getattr(op, op_type)(dq.inputs[0], *[m.value(e) for e in extras][:len(m.node.inputs) - 1],
                                     _name=m.node.name, **m.node.attrs)
        outs = moved if isinstance(moved, tuple) else (moved,)
        outs[0].producer.meta[QNAME_KEY] = node_key(m.node)
        result = op.DequantizeLinear(outs[0], *dq.inputs[1:], _name=f"{m.node.name}_DequantizeLinear",
                                     **dq.attrs)
        return result

    name = f"propagate_dq_through_{op_type.lower()}"
    return Rule(name, pattern, replacement, check=check,
                doc=f"{op_type}(DQ(q, s, z)) = DQ({op_type}(q), s, z): run {op_type} on the 8-bit data")


# Only single-output forms: MaxPool's Indices output must be unused (checked).
propagate_rules = [
    _hoist("Reshape", 1),
    _hoist("Transpose", 0),
    _hoist("Flatten", 0),
    _hoist("Squeeze", 1),
    _hoist("Unsqueeze", 1),
    _hoist("Slice", 4, min_opset=10),
    _hoist("MaxPool", 0, min_opset=12),
]

# Concat is variadic: a pattern with 16 optional inputs matches any arity up to 16.
concat_inputs = [Var("c0", where=is_dequantized)] + [Var(f"c{i}", where=is_dequantized) for i in range(1, 16)]
concat_pattern = op.Concat(concat_inputs[0], *[op.optional(v) for v in concat_inputs[1:]], name="concat")


def concat_check(m):
    params = [dq_params(v) for v in m.concat.inputs]
    first = params[0]
    if any(p is None or not p.same_as(first) for p in params[1:]):
        return m.fail("Concat inputs have different scales or zero points", m.concat)


def concat_replacement(op, m):
    """Concat(DQ(q_i, s, z)...) -> DQ(Concat(q_i...), s, z)."""
    dqs = [v.producer for v in m.concat.inputs]
    joined = op.Concat(*[d.inputs[0] for d in dqs], _name=m.concat.name, **m.concat.attrs)
    return op.DequantizeLinear(joined, *dqs[0].inputs[1:], _name=f"{m.concat.name}_DequantizeLinear",
                               **dqs[0].attrs)


propagate_dq_through_concat = Rule("propagate_dq_through_concat", concat_pattern, concat_replacement,
                                   check=concat_check)


# ---------------------------------------------------------------- Q(DQ(q)) with the same grid
def requant_check(m):
    p_in = dq_params(m[xq])
    sv, zv = m.value(s).constant(), (m.value(z).constant() if m.value(z) is not None else None)
    if sv is None or (m.value(z) is not None and zv is None):
        return m.fail("QuantizeLinear scale/zero point are not constants", m.q)
    if m.q.attrs.get("axis", 1) != (p_in.axis if p_in.axis is not None else m.q.attrs.get("axis", 1)):
        return m.fail("different axes", m.q)
    zq = zv if zv is not None else np.zeros((), np.uint8)
    src = m[xq].producer.inputs[0]
    if (src.dtype is not None and src.dtype.to_numpy() != np.asarray(zq).dtype) or \
            np.asarray(sv).shape != p_in.scale.shape or not np.array_equal(np.asarray(sv, np.float32), p_in.scale) \
            or not np.array_equal(np.asarray(zq).astype(np.int64), np.asarray(p_in.zero_point).astype(np.int64)):
        return m.fail("QuantizeLinear uses another scale, zero point or type than the DequantizeLinear before it",
                      m.q)


def requant_replacement(op, m):
    """Q(DQ(q, s, z), s, z) -> q."""
    return m[xq].producer.inputs[0]


fold_requantize = Rule("fold_requantize", op.QuantizeLinear(xq, s, op.optional(z), name="q"), requant_replacement,
                       check=requant_check)


# ---------------------------------------------------------------- Relu / Clip(0, c) before Q
def _zero_is_min(m) -> bool:
    zv = m.value(z)
    if zv is None:
        return True  # default zero point: uint8 0
    arr = zv.constant()
    return arr is not None and arr.size == 1 and int(arr.reshape(())) == _QMIN.get(zv.dtype, None)


def relu_q_check(m):
    if not _zero_is_min(m):
        return m.fail("the zero point is not the grid's minimum, so Q does not clamp at 0", m.q)
    if m.value(s).constant() is None:
        return m.fail("the scale is not a constant", m.q)


def relu_q_replacement(op, m):
    """Q(Relu(x), s, z) -> Q(x, s, z) when z = qmin."""
    return op.QuantizeLinear(m[x], m[s], m.value(z), _name=m.q.name, **m.q.attrs)


fold_relu_into_quantize = Rule("fold_relu_into_quantize",
                               op.QuantizeLinear(op.Relu(x, name="relu"), s, op.optional(z), name="q"),
                               relu_q_replacement, check=relu_q_check)

lo, hi = Var("lo"), Var("hi")


def clip_q_check(m):
    why = relu_q_check(m)
    if why is not None:
        return why
    lo_v = m.value(lo)
    lo_a = lo_v.constant() if lo_v is not None else m.clip.attrs.get("min")
    if lo_a is None or float(np.asarray(lo_a).reshape(())) != 0.0:
        return m.fail("Clip's lower bound is not the constant 0", m.clip)
    hi_v = m.value(hi)
    hi_a = hi_v.constant() if hi_v is not None else m.clip.attrs.get("max")
    if hi_a is None:
        return None if hi_v is None else m.fail("Clip's upper bound is not a constant", m.clip)
    sc = float(np.asarray(m.value(s).constant()).reshape(()))
    zv = m.value(z)
    qtype = zv.dtype if zv is not None else DataType.UINT8
    zero = int(np.asarray(zv.constant()).reshape(())) if zv is not None else 0
    top = (_QMAX[qtype] - zero) * sc
    if top > float(np.asarray(hi_a).reshape(())) * (1 + 1e-6):
        return m.fail(f"the quantization grid reaches {top:g}, above Clip's max {float(np.asarray(hi_a)):g}", m.clip)


def clip_q_replacement(op, m):
    """Q(Clip(x, 0, c), s, z) -> Q(x, s, z) when z = qmin and (qmax - z) * s <= c."""
    return op.QuantizeLinear(m[x], m[s], m.value(z), _name=m.q.name, **m.q.attrs)


fold_clip_into_quantize = Rule("fold_clip_into_quantize",
                               op.QuantizeLinear(op.Clip(x, op.optional(lo), op.optional(hi), name="clip"), s,
                                                 op.optional(z), name="q"),
                               clip_q_replacement, check=clip_q_check)

RULES = [*propagate_rules, propagate_dq_through_concat, fold_requantize, fold_relu_into_quantize,
         fold_clip_into_quantize]
