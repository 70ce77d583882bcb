"""Weight-only quantization: blockwise int8/int4 weights, float activations.

For y = x W with W (K, N) constant, W is stored as integers in blocks of ``B`` rows along K
(ONNX DequantizeLinear-21, attribute ``block_size``):
    s[j, n] = max_{k in block j} |W[k, n]| / qmax,   q[k, n] = round(W[k, n] / s[k // B, n])
    W ≈ DequantizeLinear(q, s, 0, axis=0, block_size=B)
with qmax = 127 (int8) or 7 (int4). Blocks along K bound the error of each dot-product term
by its own block's range rather than the whole column's (Dettmers & Zettlemoyer 2023,
"The case for 4-bit precision: k-bit Inference Scaling Laws", §3: small blocks are what make
4-bit weights work). Activations stay float, so the model shrinks ~4× (int8) or ~8× (int4)
while compute is unchanged; onnxruntime fuses ``DQ(int4, blocked, axis 0) → MatMul`` into
MatMulNBits. Needs opset ≥ 21 (``block_size`` and int4 are new in DequantizeLinear-21).

Gemm weights are handled the same way along their K axis (axis 1 when transB = 1).
"""
from __future__ import annotations

from graft.compiler.engine import Const, Rule, Var, op
from graft.rules.quantize_context import QuantContext
from graft.rules.quantize_common import float_activation, is_float_weight, quantized_weight, reemit

MIN_OPSET = 21


def weight_only_rules(ctx: QuantContext) -> list[Rule]:
    """MatMul/Gemm constant weights → DQ(blocked int8/int4 weights)."""
    x, b = Var("x"), Var("b")
    w = Const("w", where=is_float_weight)

    def _check(m, node):
        why = ctx.why_not(node)
        if why:
            return m.fail(why, node)
        if m.opset < MIN_OPSET:
            return m.fail(f"blockwise DequantizeLinear needs opset {MIN_OPSET}, the model has {m.opset}", node)
        if m[w].ndim != 2:
            return m.fail("only 2-D weights are quantized", node)
        if m[w].size < ctx.min_weight_elements:
            return m.fail(f"weight has {m[w].size} elements, fewer than min_weight_elements="
                          f"{ctx.min_weight_elements}", node)
        if not float_activation(m[x]):
            return m.fail("input is not a float activation", node)

    def matmul_check(m):
        return _check(m, m.matmul)

    def matmul_replacement(op, m):
        """MatMul(x, W) -> MatMul(x, DQ(q_W, s, axis=0, block_size=B))."""
        wq, _ = quantized_weight(op, ctx, m.value(w), 0)
        return reemit(op, m.matmul, [m[x], wq])

    weight_only_matmul = Rule("weight_only_matmul", op.MatMul(x, w, name="matmul"), matmul_replacement,
                              check=matmul_check)

    def gemm_check(m):
        return _check(m, m.gemm)

    def gemm_replacement(op, m):
        """Gemm(x, W, C) -> Gemm(x, DQ(q_W, s, axis=K, block_size=B), C)."""
        k_axis = 1 if m.gemm.attrs.get("transB", 0) else 0
        wq, _ = quantized_weight(op, ctx, m.value(w), k_axis)
        return reemit(op, m.gemm, [m[x], wq] + ([m[b]] if m[b] is not None else []))

    weight_only_gemm = Rule("weight_only_gemm", op.Gemm(x, w, op.optional(b), name="gemm"), gemm_replacement,
                            check=gemm_check)
    return [weight_only_matmul, weight_only_gemm]


RULES: list[Rule] = []  # needs a context (block size, grid): see weight_only_rules(ctx)
