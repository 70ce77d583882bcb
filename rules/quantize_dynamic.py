"""Dynamic int8 quantization: int8 weights ahead of time, activations quantized at run time.

For y = x W with W (K, N) constant (ONNX MatMul-13; Gemm-13 likewise):
    (q_x, s_x, z_x) = DynamicQuantizeLinear(x)                 uint8, per tensor, from x's own min/max
    q_W = round(W / s_W),  s_W[n] = max_k |W[k, n]| / 127      int8 symmetric, per output column n
    y ≈ s_x * s_W[n] * Σ_k (q_x[k] - z_x) q_W[k, n] = Cast(MatMulInteger(q_x, q_W, z_x, 0)) * (s_x * s_W)
(DynamicQuantizeLinear-11, MatMulInteger-10.) onnxruntime fuses the chain into
DynamicQuantizeMatMul / MatMulIntegerToFloat; this is the graph its own
``quantize_dynamic`` writes, with per-channel weight scales.

Embedding tables (Gather(W, ids) with W (V, D) constant, axis 0) are stored as int8 with one
scale per row (a row's range is its own: position 0 or a padding row can be 10× the others):
    Gather(W, ids) = Cast(Gather(q_W, ids)) * Gather(s_W, ids),   s_W (V, 1) = max_d |W[v, d]| / 127
(dequantization commutes with Gather because each gathered row keeps its own scale).

SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", §4): for an activation x with outlier channels,
    x W = (x / s) (diag(s) W),   s_k = max|x_k|^α / max|W_k|^(1-α)
moves the outliers' range from the activation (quantized per tensor at run time) into the
weight rows (quantized per column, ahead of time). ``smooth_matmul_input`` applies the
divisor ``ctx.smoothing[x]`` chosen by the driver; readers of the same x share one Mul.

Rules: :func:`dynamic_rules` (bound to a :class:`~graft.rules.quantize_context.QuantContext`),
:func:`smoothing_rules`.
"""
from __future__ import annotations

import numpy as np

from graft.compiler.engine import PROVENANCE_RULE, Const, Rule, Var, op
from graft.rules.quantize_context import QNAME_KEY, QuantContext, node_key
from graft.rules.quantize_params import INT8_SYM, quantize, weight_params
from graft.ir.dtypes import DataType
from graft.rules.quantize_common import float_activation, is_float_weight, reemit, weight_consts


def _int_matmul(op, x, qv, zv, sv, hint: str):
    xq, xs, xz = op.DynamicQuantizeLinear(x, _outputs=3, _name=f"{hint}_DynamicQuantizeLinear")
    acc = op.MatMulInteger(xq, qv, xz, zv, _name=f"{hint}_MatMulInteger")
    scale = op.Mul(xs, sv, _name=f"{hint}_scales")
    return op.Mul(op.Cast(acc, to=int(DataType.FLOAT), _name=f"{hint}_Cast"), scale, _name=f"{hint}_rescale")


def dynamic_rules(ctx: QuantContext) -> list[Rule]:
    """MatMul / Gemm with constant weights → dynamic int8; Gather embeddings → int8 table."""
    x, b = Var("x"), Const("b")
    w = Const("w", where=is_float_weight)

    def _check(m, node, w_arr):
        why = ctx.why_not(node)
        if why:
            return m.fail(why, node)
        if w_arr.ndim != 2:
            return m.fail(f"weight has rank {w_arr.ndim}; only 2-D weights are quantized", node)
        if w_arr.size < ctx.min_weight_elements:
            return m.fail(f"weight has {w_arr.size} elements, fewer than min_weight_elements="
                          f"{ctx.min_weight_elements}", node)
        if not float_activation(m[x]) or (m[x].dtype is not None and m[x].dtype != DataType.FLOAT):
            return m.fail("the activation is not float32 (DynamicQuantizeLinear reads float32)", node)

    def matmul_check(m):
        return _check(m, m.matmul, m[w])

    def matmul_replacement(op, m):
        """MatMul(x, W) -> Cast(MatMulInteger(DynamicQuantizeLinear(x), int8 W)) * (s_x * s_W)."""
        qv, sv, zv, _ = weight_consts(op, ctx, m.value(w), 1 if ctx.per_channel else None)
        y = _int_matmul(op, m[x], qv, zv, sv, m.matmul.name)
        y.producer.meta[QNAME_KEY] = node_key(m.matmul)
        return y

    dynamic_quantize_matmul = Rule("dynamic_quantize_matmul", op.MatMul(x, w, name="matmul"), matmul_replacement,
                                   check=matmul_check)

    def gemm_check(m):
        if m.gemm.attrs.get("transA", 0):
            return m.fail("Gemm with transA=1", m.gemm)
        return _check(m, m.gemm, m[w])

    def gemm_replacement(op, m):
        """Gemm(x, W, C) -> alpha * dynamic-int8 x op(W) + beta * C."""
        attrs = m.gemm.attrs
        trans = bool(attrs.get("transB", 0))
        qv, sv, zv, _ = weight_consts(op, ctx, m.value(w), 1 if ctx.per_channel else None, transpose=trans)
        y = _int_matmul(op, m[x], qv, zv, sv, m.gemm.name)
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        if alpha != 1.0:
            y = op.Mul(y, np.array(alpha, np.float32))
        c = m.get(b)
        if c is not None:
            y = op.Add(y, op.const((c.astype(np.float64) * beta).astype(np.float32), name=f"{m.gemm.name}_bias"),
                       _name=f"{m.gemm.name}_bias_add")
        return y

    dynamic_quantize_gemm = Rule("dynamic_quantize_gemm", op.Gemm(x, w, op.optional(b), name="gemm"),
                                 gemm_replacement, check=gemm_check)

    return [dynamic_quantize_matmul, dynamic_quantize_gemm, *embedding_rules(ctx)]


def embedding_rules(ctx: QuantContext) -> list[Rule]:
    """Gather(W, ids) on a constant 2-D table → int8 rows with per-row scales (also used by weight-only)."""
    w, ids = Const("w", where=is_float_weight), Var("ids")

    def gather_check(m):
        if m.gather.meta.get(PROVENANCE_RULE) == "quantize_embedding":
            return m.fail("this Gather reads a table quantize_embedding made (int8 rows or their scales)", m.gather)
        why = ctx.why_not(m.gather)
        if why:
            return m.fail(why, m.gather)
        if m.gather.attrs.get("axis", 0) != 0 or m[w].ndim != 2:
            return m.fail("only 2-D tables gathered on axis 0 are quantized", m.gather)
        if m[w].size < ctx.min_weight_elements:
            return m.fail(f"table has {m[w].size} elements, fewer than min_weight_elements="
                          f"{ctx.min_weight_elements}", m.gather)
        if m[w].shape[0] < ctx.embedding_min_rows:
            return m.fail(f"table has {m[w].shape[0]} rows, fewer than embedding_min_rows={ctx.embedding_min_rows}",
                          m.gather)

    def gather_replacement(op, m):
        """Gather(W, ids) -> Cast(Gather(int8 W, ids)) * Gather(row scales, ids)."""
        table = m[w]
        if not ctx.embedding_per_row:
            p = weight_params(table, None, INT8_SYM, name=m.value(w).name)
            key = (m.value(w).name, "tensor")
            hit = ctx.weight_cache.get(key)
            if hit is not None and all(v.graph is not None for v in hit):
                qv, sv, zv = hit
            else:
                qv = op.const(quantize(table, p), name=f"{m.value(w).name}_quantized")
                sv = op.const(np.asarray(p.scale, table.dtype).reshape(()), name=f"{m.value(w).name}_scale")
                zv = op.const(np.zeros((), np.int8), name=f"{m.value(w).name}_zero_point")
                ctx.weight_cache[key] = (qv, sv, zv)
            return op.DequantizeLinear(op.Gather(qv, m[ids], axis=0, _name=m.gather.name), sv, zv,
                                       _name=f"{m.gather.name}_dequantize")
        p = weight_params(table, 0, INT8_SYM, name=m.value(w).name)
        key = (m.value(w).name, "rows")
        hit = ctx.weight_cache.get(key)
        if hit is not None and all(v.graph is not None for v in hit):
            qv, sv = hit
        else:
            qv = op.const(quantize(table, p), name=f"{m.value(w).name}_quantized")
            sv = op.const(p.scale.reshape(-1, 1).astype(table.dtype), name=f"{m.value(w).name}_row_scale")
            ctx.weight_cache[key] = (qv, sv)
        rows = op.Cast(op.Gather(qv, m[ids], axis=0, _name=m.gather.name), to=int(DataType.from_numpy(table.dtype)),
                       _name=f"{m.gather.name}_Cast")
        return op.Mul(rows, op.Gather(sv, m[ids], axis=0, _name=f"{m.gather.name}_scales"),
                      _name=f"{m.gather.name}_dequantize")

    quantize_embedding = Rule("quantize_embedding", op.Gather(w, ids, name="gather"), gather_replacement,
                              check=gather_check)
    return [quantize_embedding]


def smoothing_rules(ctx: QuantContext) -> list[Rule]:
    """MatMul(x, W) -> MatMul(x[..., idx] * a, W[idx] * b[:, None]) for x in ``ctx.smoothing``.

    With ``Migration(index, a, b)``: Σ_{j: idx_j = k} a_j b_j = 1 for every input channel k, so
    the product is unchanged. Plain SmoothQuant is idx = identity, a = 1/s, b = s; outlier
    channel splitting (Zhao et al. 2019, "Improving Neural Network Quantization without
    Retraining using Outlier Channel Splitting", §3) repeats channel k m_k times with
    a = 1/m_k, b = 1, dividing its activation range by m_k without growing any weight row.
    Readers of the same x share one Gather/Mul.
    """
    x = Var("x", where=lambda v: v.name in ctx.smoothing)
    w = Const("w", where=is_float_weight)
    shared: dict[str, object] = {}

    def check(m):
        why = ctx.why_not(m.matmul)
        if why:
            return m.fail(why, m.matmul)
        mig = ctx.smoothing[m[x].name]
        if m[w].ndim != 2 or m[w].shape[0] != mig.channels:
            return m.fail(f"weight shape {m[w].shape} does not match the migration ({mig.channels} channels)",
                          m.matmul)

    def replacement(op, m):
        """MatMul(x, W) -> MatMul(x[..., idx] * a, W[idx] * b)."""
        name = m[x].name
        mig = ctx.smoothing[name]
        prev = shared.get(name)
        if prev is not None and prev.graph is not None:
            xs = prev
        else:
            src = m[x]
            if mig.index is not None:
                # index = [0..K-1, extra copies]: copy only the few outlier columns (a Gather on the
                # last axis copies element by element) and append them to x with one Concat
                extra = mig.index[mig.channels:]
                copies = op.Gather(src, op.const(extra.astype(np.int64), name=f"{name}_split_index"), axis=-1,
                                   _name=f"{name}_split")
                src = op.Concat(src, copies, axis=-1, _name=f"{name}_split_concat")
            xs = op.Mul(src, op.const(mig.a.astype(np.float32), name=f"{name}_smooth_scale"), _name=f"{name}_smooth")
            shared[name] = xs
        wt = m[w].astype(np.float64)
        if mig.index is not None:
            wt = wt[mig.index]
        w2 = (wt * mig.b[:, None]).astype(m[w].dtype)
        return reemit(op, m.matmul, [xs, op.const(w2, name=f"{m.value(w).name}_smoothed")])

    smooth = Rule("smooth_matmul_input", op.MatMul(x, w, name="matmul"), replacement, check=check)
    return [smooth]


RULES: list[Rule] = []  # dynamic rules need a context (selection, schemes): see dynamic_rules(ctx)
