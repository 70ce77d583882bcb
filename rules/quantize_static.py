"""Static int8 quantization as QuantizeLinear → DequantizeLinear (QDQ) insertion rules.

A QDQ pair simulates integer arithmetic in float (ONNX QuantizeLinear/DequantizeLinear,
opset 10/13/19/21):
    DQ(Q(x)) = (saturate(round(x / s) + z) - z) * s
and a runtime fuses ``DQ → op → Q`` into the integer kernel (onnxruntime: QLinearConv,
QLinearMatMul, QGemm, QLinearAdd, ...). Following Jacob et al. 2018 ("Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", §2.2–2.4):

- activations: uint8 asymmetric or int8 symmetric, per tensor, from calibrated ranges;
- weights: int8 symmetric, per output channel (Conv axis 0; Gemm axis 0 if transB else 1;
  MatMul weight (K, N) axis 1) or per tensor;
- biases: int32 with scale s_x * s_w and zero point 0, so that
  Conv(x, W) + b = s_x * s_w * (Σ q_x q_w + q_b) needs no rescale of the accumulator.

Rules (bound to a :class:`~graft.rules.quantize_context.QuantContext` by :func:`static_rules`):

- ``quantize_tensor``: a node producing a tensor the analysis chose is re-emitted with
  ``Q → DQ`` on that output, so every reader sees the quantized value.
- ``quantize_graph_input``: the same for a graph input, at its reader.
- ``quantize_conv_weight``, ``quantize_gemm_weight``, ``quantize_matmul_weight``: once the
  activation input is quantized, the weight becomes ``DQ(int8)`` and the bias ``DQ(int32)``.

Which tensors and nodes to quantize is the driver's analysis (:mod:`graft.compiler.techniques.quantization`);
propagation through data-movement ops and clean-up of redundant pairs are in
:mod:`graft.rules.quantize_propagate`. A weight read by several nodes is quantized once.
"""
from __future__ import annotations

from graft.compiler.engine import Const, Rule, Var, op
from graft.rules.quantize_context import QuantContext, dq_params
from graft.rules.quantize_common import float_activation, is_float_weight, qdq, quantized_bias, quantized_weight, reemit

_NEVER_WRAP = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Constant")


def static_rules(ctx: QuantContext) -> list[Rule]:
    """The static QDQ insertion rules bound to ``ctx`` (see module docstring)."""
    x, b = Var("x"), Const("b")
    w = Const("w", where=is_float_weight)

    # -- activations ---------------------------------------------------------
    def _wanted_output(node):
        if node.op_type in _NEVER_WRAP or node.domain != "" or any(True for _ in node.subgraphs()):
            return None
        for i, o in enumerate(node.outputs):
            users = o.users()
            if o.name in ctx.tensors and not (users and all(u.op_type == "QuantizeLinear" for u in users)):
                return i
        return None

    def tensor_check(m):
        i = _wanted_output(m.node)
        if i is None:
            return m.fail("no output of this node is a tensor to quantize (or it is quantized already)", m.node)
        if not float_activation(m.node.outputs[i]):
            return m.fail("the output to quantize is not a float tensor", m.node)

    def tensor_replacement(op, m):
        """Re-emit the node with Q → DQ on its calibrated output."""
        node = m.node
        i = _wanted_output(node)
        outs = reemit(op, node, node.inputs)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        name = node.outputs[i].name
        outs[i] = qdq(op, outs[i], ctx.act_params(name), name)
        return tuple(outs) if len(outs) > 1 else outs[0]

    quantize_tensor = Rule("quantize_tensor", op.any_op(name="node"), tensor_replacement, check=tensor_check)

    def _graph_input_index(node):
        if node.op_type in _NEVER_WRAP:
            return None
        for i, v in enumerate(node.inputs):
            if v is not None and v.is_graph_input() and v.name in ctx.tensors:
                return i
        return None

    def input_check(m):
        if _graph_input_index(m.node) is None:
            return m.fail("the node reads no graph input that is a tensor to quantize", m.node)
        if not ctx.selected(m.node):
            return m.fail(ctx.why_not(m.node), m.node)

    def input_replacement(op, m):
        """Read a calibrated graph input through Q → DQ."""
        node = m.node
        i = _graph_input_index(node)
        ins = list(node.inputs)
        ins[i] = qdq(op, ins[i], ctx.act_params(ins[i].name), ins[i].name)
        return reemit(op, node, ins)

    quantize_graph_input = Rule("quantize_graph_input", op.any_op(name="node"), input_replacement, check=input_check)

    # -- weights -------------------------------------------------------------
    def _weight_check(m, node, rank_ok: bool):
        why = ctx.why_not(node)
        if why:
            return m.fail(why, node)
        if not rank_ok:
            return m.fail("weight rank is not supported for per-channel quantization", node)
        if not float_activation(m[x]):
            return m.fail("input is not a float activation", node)
        if dq_params(m[x]) is None:
            return m.fail("the activation input is not quantized yet (no DequantizeLinear before it)", node)
        return None

    def conv_check(m):
        return _weight_check(m, m.conv, m[w].ndim >= 3)

    def conv_replacement(op, m):
        """Conv(DQ(x), DQ(int8 W, axis 0), DQ(int32 b, s_x*s_w))."""
        wq, wp = quantized_weight(op, ctx, m.value(w), 0 if ctx.per_channel else None)
        bias = m.get(b)
        bq = None if bias is None else quantized_bias(op, bias, dq_params(m[x]), wp, m.value(b).name)
        return reemit(op, m.conv, [m[x], wq, bq] if bq is not None else [m[x], wq])

    quantize_conv_weight = Rule("quantize_conv_weight", op.Conv(x, w, op.optional(b), name="conv"),
                                conv_replacement, check=conv_check)

    def gemm_check(m):
        if m.gemm.attrs.get("transA", 0):
            return m.fail("Gemm with transA=1 reads its activation transposed", m.gemm)
        return _weight_check(m, m.gemm, m[w].ndim == 2)

    def gemm_replacement(op, m):
        """Gemm(DQ(x), DQ(int8 W, axis 0 if transB else 1), C) with C → int32 when alpha = beta = 1."""
        attrs = m.gemm.attrs
        out_axis = 0 if attrs.get("transB", 0) else 1
        wq, wp = quantized_weight(op, ctx, m.value(w), out_axis if ctx.per_channel else None)
        c = m.get(b)
        cq = m.value(b)
        if c is not None and c.ndim == 1 and c.shape[0] == m[w].shape[out_axis] and \
                attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0:
            cq = quantized_bias(op, c, dq_params(m[x]), wp, m.value(b).name)
        return reemit(op, m.gemm, [m[x], wq] + ([cq] if cq is not None else []))

    quantize_gemm_weight = Rule("quantize_gemm_weight", op.Gemm(x, w, op.optional(b), name="gemm"),
                                gemm_replacement, check=gemm_check)

    def matmul_check(m):
        return _weight_check(m, m.matmul, m[w].ndim == 2)

    def matmul_replacement(op, m):
        """MatMul(DQ(x), DQ(int8 W (K, N), axis 1))."""
        wq, _ = quantized_weight(op, ctx, m.value(w), 1 if ctx.per_channel else None)
        return reemit(op, m.matmul, [m[x], wq])

    quantize_matmul_weight = Rule("quantize_matmul_weight", op.MatMul(x, w, name="matmul"), matmul_replacement,
                                  check=matmul_check)

    return [quantize_conv_weight, quantize_gemm_weight, quantize_matmul_weight, quantize_graph_input,
            quantize_tensor]


RULES: list[Rule] = []  # every static rule needs a calibration context: see static_rules(ctx)
