"""Weight-only k-bit quantization in the forms runtimes execute directly.

Blockwise round-to-nearest (RTN) of a weight W (K, N) read by ``MatMul(x, W)``: K is cut in
blocks of ``B`` rows (the last one zero-padded when B does not divide K); each block of each
column n gets its own scale (and zero point):

- symmetric, b bits: ``m = W[k*, n]`` with ``k* = argmax_k |W[k, n]|`` over the block,
  ``s = m / -2^(b-1)``, ``q = clip(round(W / s), -2^(b-1), 2^(b-1) - 1)``, ``W ≈ q s``. The
  sign of ``s`` maps the largest-magnitude weight onto ``-2^(b-1)`` exactly, so all 2^b levels are
  used (the scheme of onnxruntime's ``MatMulNBitsQuantizer`` and llama.cpp's Q4_0);
- asymmetric: ``lo = min(0, min W)``, ``hi = max(0, max W)``, ``s = (hi - lo) / (2^b - 1)``,
  ``z = clip(round(-lo / s), 0, 2^b - 1)``, ``q = clip(round(W / s) + z, 0, 2^b - 1)``,
  ``W ≈ (q - z) s``.

Two forms carry the same integers (Dettmers & Zettlemoyer 2023, "The case for 4-bit precision",
§3, for why small blocks make 4-bit weights work):

- ``matmulnbits`` — ``com.microsoft.MatMulNBits(x, B, scales[, zero_points])``
  (onnxruntime ContribOperators.md, MatMulNBits, since version 1): ``B`` uint8 (N, K/B, B·b/8)
  holds each column's codes ``q`` (symmetric: ``q + 2^(b-1)``, whose implied zero point is
  ``2^(b-1)``) packed along K, low bits first; ``scales`` float (N, K/B); ``zero_points`` uint8
  (N, ceil(K/B · b/8)) packed the same way; attributes K, N, bits, block_size, accuracy_level.
  onnxruntime reads the packed weights directly: no float copy of W exists at run time.
- ``dq`` — standard ONNX ``MatMul(x, DequantizeLinear(q, s[, z], axis=0, block_size=B))``
  (DequantizeLinear-21), q int4/int8 (symmetric) or uint4/uint8 (asymmetric) of shape (K, N),
  s of shape (ceil(K/B), N). onnxruntime 1.32 fuses exactly this into MatMulNBits when B is a
  power of two ≥ 16, the DequantizeLinear feeds only that MatMul (a weight read by two MatMuls is
  not fused), and q, s, z are initializers (its ``DQMatMulNodeGroupSelector``; verified by the
  tests on the graph onnxruntime writes with ``optimized_model_filepath``). ``Gemm`` is rewritten
  to ``MatMul`` + ``Add`` for this form: onnxruntime fuses Gemm with a following activation
  (FusedGemm) before it looks for dequantized weights, and then runs it in float.

Weights are quantized in slices of a few MiB along K (:data:`CHUNK_ELEMENTS`) and a weight still
in its external data file gets its pages handed back once done
(:func:`graft.ir.external_data.drop_pages`): quantizing holds the integers made so far, not
float copies of the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.compiler.engine import Const, Rule, Var, op
from graft.ir import Value
from graft.ir.dtypes import DataType
from graft.ir.external_data import drop_pages
from graft.rules.quantize_common import float_activation, is_float_weight
from graft.rules.quantize_context import QNAME_KEY, QuantContext, node_key
from graft.rules.quantize_params import QuantizationError

MIN_OPSET_DQ = 21  # DequantizeLinear block_size, int4/uint4
CHUNK_ELEMENTS = 1 << 21  # float32 elements per slice: 8 MiB
FORMS = ("dq", "matmulnbits")


@dataclass(frozen=True)
class NBitsOptions:
    """How weight-only rules quantize and which form they emit.

    Attributes:
        bits: 4 or 8.
        block_size: rows of K per scale; a power of two in [16, 256] (what MatMulNBits accepts,
            and what onnxruntime fuses in the ``dq`` form).
        symmetric: no zero points (symmetric grid) or per-block zero points.
        form: ``"dq"`` (standard ONNX) or ``"matmulnbits"`` (onnxruntime contrib op).
        accuracy_level: MatMulNBits ``accuracy_level`` (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
            activations): the precision onnxruntime computes in; only the ``matmulnbits`` form has it.
        embeddings: also quantize tables read by ``Gather`` on axis 0 (token embeddings), blockwise
            along their rows: ``com.microsoft.GatherBlockQuantized`` (``matmulnbits`` form) or
            ``DequantizeLinear(Gather(q), Gather(s), axis=-1, block_size)`` (``dq`` form). Off by
            default, as in onnxruntime's quantizer: every constant table a Gather reads qualifies,
            rotary cos/sin tables included, which 4 bits represent poorly (exclude them by node name).
            The ``dq`` form quantizes tables at 8 bits only: ONNX Gather takes no int4.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    form: str = "dq"
    accuracy_level: int = 0
    embeddings: bool = False

    def check(self) -> "NBitsOptions":
        """Raises QuantizationError naming the option and the values allowed."""
        if self.bits not in (4, 8):
            raise QuantizationError(f"weight-only bits must be 4 or 8, got {self.bits}")
        b = self.block_size
        if not isinstance(b, int) or b < 16 or b > 256 or b & (b - 1):
            raise QuantizationError(f"weight-only block_size must be a power of two from 16 to 256 (MatMulNBits "
                                    f"and onnxruntime's DequantizeLinear→MatMul fusion need it), got {b!r}")
        if self.form not in FORMS:
            raise QuantizationError(f"weight-only form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QuantizationError(f"accuracy_level must be 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8), "
                                    f"got {self.accuracy_level!r}")
        return self


# --------------------------------------------------------------------------- math
@dataclass
class BlockwiseWeight:
    """Integers and parameters of one weight W (K, N), in both layouts.

    Attributes:
        q: (K, N) integers: int8 in [-2^(bits-1), 2^(bits-1)) (symmetric) or uint8 in [0, 2^bits)
            (asymmetric).
        scales: (nblocks, N) float32.
        zero_points: (nblocks, N) uint8, or None (symmetric).
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        """W as the runtime computes it: ``(q - z) * s`` per block, float32 (K, N)."""
        k = self.q.shape[0]
        s = np.repeat(self.scales, self.block_size, axis=0)[:k]
        q = self.q.astype(np.float32)
        if self.zero_points is not None:
            q -= np.repeat(self.zero_points, self.block_size, axis=0)[:k].astype(np.float32)
        return q * s


def _quantize_slice(c: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """(q, s, z or None) of float32 ``c`` (rows, n), rows a multiple of ``block_size``: blocks along axis 0."""
    n = c.shape[1]
    c = c.reshape(-1, block_size, n)
    half, top = 1 << (bits - 1), (1 << bits) - 1
    if symmetric:
        idx = np.abs(c).argmax(axis=1)[:, None, :]
        s = np.take_along_axis(c, idx, axis=1)[:, 0, :] / np.float32(-half)
        safe = np.where(s == 0, np.float32(1), s)
        q = np.clip(np.rint(c / safe[:, None, :]), -half, half - 1).astype(np.int8)
        return q.reshape(-1, n), s, None
    lo = np.minimum(c.min(axis=1), 0)
    hi = np.maximum(c.max(axis=1), 0)
    s = (hi - lo) / np.float32(top)
    safe = np.where(s == 0, np.float32(1), s)
    z = np.clip(np.rint(-lo / safe), 0, top)
    q = np.clip(np.rint(c / safe[:, None, :]) + z[:, None, :], 0, top).astype(np.uint8)
    return q.reshape(-1, n), s, z.astype(np.uint8)


def quantize_blockwise(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True) -> BlockwiseWeight:
    """Round-to-nearest blockwise quantization of ``w`` (K, N) along K (module docstring's formulas).

    Works through ``w`` in slices of about :data:`CHUNK_ELEMENTS` elements, so a memory-mapped
    weight is read once and never held in float beyond one slice. Rounding is numpy's (half to even).
    """
    if w.ndim != 2:
        raise QuantizationError(f"blockwise quantization takes a 2-D weight, got shape {list(w.shape)}")
    k, n = w.shape
    nb = -(-k // block_size)
    q = np.empty((k, n), np.int8 if symmetric else np.uint8)
    scales = np.empty((nb, n), np.float32)
    zps = None if symmetric else np.empty((nb, n), np.uint8)
    rows = max(block_size, (CHUNK_ELEMENTS // max(n, 1)) // block_size * block_size)
    for r0 in range(0, k, rows):
        r1 = min(k, r0 + rows)
        c = np.asarray(w[r0:r1], dtype=np.float32)
        pad = -(r1 - r0) % block_size
        if pad:
            c = np.concatenate([c, np.zeros((pad, n), np.float32)])
        qc, s, z = _quantize_slice(c, bits, block_size, symmetric)
        b0 = r0 // block_size
        scales[b0:b0 + s.shape[0]] = s
        if z is not None:
            zps[b0:b0 + z.shape[0]] = z
        q[r0:r1] = qc[: r1 - r0]
    return BlockwiseWeight(q, scales, zps, bits, block_size)


def quantize_rows(table: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blockwise quantization of ``table`` (V, H) along its rows (axis 1), H a multiple of
    ``block_size``: (q (V, H), scales (V, H / block_size), zero points (V, H / block_size) or None),
    the same formulas as :func:`quantize_blockwise`, slice by slice of rows."""
    v, h = table.shape
    q = np.empty((v, h), np.int8 if symmetric else np.uint8)
    scales = np.empty((v, h // block_size), np.float32)
    zps = None if symmetric else np.empty((v, h // block_size), np.uint8)
    rows = max(1, CHUNK_ELEMENTS // max(h, 1))
    for r0 in range(0, v, rows):
        r1 = min(v, r0 + rows)
        c = np.ascontiguousarray(np.asarray(table[r0:r1], dtype=np.float32).T)  # (H, rows): blocks along axis 0
        qc, s, z = _quantize_slice(c, bits, block_size, symmetric)
        q[r0:r1] = qc.T
        scales[r0:r1] = s.T
        if z is not None:
            zps[r0:r1] = z.T
    return q, scales, zps


def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., L) → bytes (..., ceil(L·bits/8)), element i of a byte in its bits i·bits.. (low first)."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def matmulnbits_tensors(bw: BlockwiseWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 (N, nblocks, B·bits/8), scales float32 (N, nblocks), zero_points uint8 packed or None):
    the inputs of ``com.microsoft.MatMulNBits`` for ``bw`` (onnxruntime's layout)."""
    k, n = bw.shape
    bs, bits = bw.block_size, bw.bits
    nb = bw.scales.shape[0]
    offset = 0 if bw.zero_points is not None else 1 << (bits - 1)
    blob = bs * bits // 8
    packed = np.empty((n, nb, blob), np.uint8)
    cols = max(1, CHUNK_ELEMENTS // max(k, 1))
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        codes = (bw.q[:, c0:c1].astype(np.int16) + offset).astype(np.uint8)  # (K, n_c)
        if nb * bs != k:  # zero-pad K: the padded codes stand for weight 0
            fill = np.full((nb * bs - k, c1 - c0), offset if bw.zero_points is None else 0, np.uint8)
            if bw.zero_points is not None:
                fill[:] = bw.zero_points[-1, c0:c1]
            codes = np.concatenate([codes, fill])
        codes = np.ascontiguousarray(codes.T).reshape(c1 - c0, nb, bs)
        packed[c0:c1] = _pack_low_first(codes, bits)
    scales = np.ascontiguousarray(bw.scales.T)
    zp = None
    if bw.zero_points is not None:
        zp = _pack_low_first(np.ascontiguousarray(bw.zero_points.T), bits)
    return packed, scales, zp


def dq_tensors(bw: BlockwiseWeight) -> tuple[np.ndarray, DataType, np.ndarray, np.ndarray | None]:
    """(q as int4/uint4/int8/uint8 numpy (ml_dtypes for 4 bits), its DataType, scales (nblocks, N),
    zero points in q's type or None): the inputs of ``DequantizeLinear(axis=0, block_size)``."""
    import ml_dtypes

    sym = bw.zero_points is None
    if bw.bits == 4:
        npdt, dt = (ml_dtypes.int4, DataType.INT4) if sym else (ml_dtypes.uint4, DataType.UINT4)
    else:
        npdt, dt = (np.int8, DataType.INT8) if sym else (np.uint8, DataType.UINT8)
    q = bw.q.astype(npdt)
    zp = None if sym else bw.zero_points.astype(npdt)
    return q, dt, bw.scales, zp


# --------------------------------------------------------------------------- rules
def nbits_rules(ctx: QuantContext, opts: NBitsOptions) -> list[Rule]:
    """MatMul/Gemm with a constant 2-D float weight → the ``opts.form`` of its k-bit weight.

    ``ctx`` selects the nodes (exclusions, ``min_weight_elements``) and caches each weight's
    integers, so a weight read by several nodes is quantized once.
    """
    opts.check()
    x, c = Var("x"), Var("c")
    w = Const("w", where=is_float_weight)

    def _check(m, node, k_axis: int):
        why = ctx.why_not(node)
        if why:
            return m.fail(why, node)
        if opts.form == "dq" and m.opset < MIN_OPSET_DQ:
            return m.fail(f"DequantizeLinear with block_size needs opset {MIN_OPSET_DQ}, the model has {m.opset} "
                          f"(upgrade the opset, or use the matmulnbits form)", node)
        arr = m[w]
        if arr.ndim != 2:
            return m.fail(f"weight {m.value(w).name!r} has rank {arr.ndim}; only 2-D weights are quantized", node)
        if arr.dtype != np.float32:
            return m.fail(f"weight {m.value(w).name!r} is {arr.dtype}; weight-only quantization takes float32 "
                          f"weights (MatMulNBits' scales share the activation's type)", node)
        if arr.size < ctx.min_weight_elements:
            return m.fail(f"weight has {arr.size} elements, fewer than min_weight_elements="
                          f"{ctx.min_weight_elements}", node)
        if not float_activation(m[x]) or (m[x].dtype is not None and m[x].dtype != DataType.FLOAT):
            return m.fail("input is not a float32 activation", node)
        return None

    def consts(op, m, transpose: bool) -> dict:
        """The initializers of the weight's k-bit form, made once per weight, layout and form (a
        weight read by several nodes is quantized once); the float weight is not kept."""
        wv = m.value(w)
        key = ("nbits", wv.name, transpose, opts.bits, opts.block_size, opts.symmetric, opts.form)
        hit = ctx.weight_cache.get(key)
        if hit is not None and all(v.graph is not None for v in hit.values() if isinstance(v, Value)):
            return hit
        arr = m[w]
        bw = quantize_blockwise(arr.T if transpose else arr, opts.bits, opts.block_size, opts.symmetric)
        drop_pages(arr)
        hint = wv.name
        made: dict = {"K": bw.shape[0], "N": bw.shape[1]}
        if opts.form == "matmulnbits":
            b, s, z = matmulnbits_tensors(bw)
            made.update(B=op.const(b, name=f"{hint}_Q{opts.bits}", copy=False),
                        scales=op.const(s, name=f"{hint}_scales", copy=False),
                        zero_points=None if z is None else op.const(z, name=f"{hint}_zero_points", copy=False))
        else:
            q, dt, s, z = dq_tensors(bw)
            made.update(q=op.const(q, dtype=dt, name=f"{hint}_quantized", copy=False),
                        scale=op.const(s, name=f"{hint}_scale", copy=False),
                        zero_point=None if z is None else op.const(z, dtype=dt, name=f"{hint}_zero_point",
                                                                   copy=False))
        ctx.weight_cache[key] = made
        return made

    def emit(op, m, node, transpose: bool, bias):
        t = consts(op, m, transpose)
        hint = m.value(w).name
        if opts.form == "matmulnbits":
            attrs = dict(K=t["K"], N=t["N"], bits=opts.bits, block_size=opts.block_size)
            if opts.accuracy_level:
                attrs["accuracy_level"] = opts.accuracy_level
            ins = [m[x], t["B"], t["scales"]] + ([t["zero_points"]] if t["zero_points"] is not None else [])
            if bias is not None:
                ins += [None] * (5 - len(ins)) + [bias]  # A, B, scales, zero_points, g_idx, bias
            y = op.domain("com.microsoft").MatMulNBits(*ins, _name=node.name or "MatMulNBits", **attrs)
        else:
            dq_in = [t["q"], t["scale"]] + ([t["zero_point"]] if t["zero_point"] is not None else [])
            wq = op.DequantizeLinear(*dq_in, axis=0, block_size=opts.block_size, _name=f"{hint}_DequantizeLinear")
            y = op.MatMul(m[x], wq, _name=node.name or "MatMul")
            if bias is not None:
                y = op.Add(y, bias, _name=f"{node.name or 'Gemm'}_bias")
        y.producer.meta[QNAME_KEY] = node_key(node)
        return y

    def matmul_check(m):
        return _check(m, m.matmul, 0)

    def matmul_replacement(op, m):
        """MatMul(x, W) -> MatMulNBits(x, pack(q), s) | MatMul(x, DQ(q, s, axis=0, block_size))."""
        return emit(op, m, m.matmul, False, None)

    def gemm_check(m):
        g = m.gemm
        if g.attrs.get("transA", 0) or g.attrs.get("alpha", 1.0) != 1.0 or \
                (m[c] is not None and g.attrs.get("beta", 1.0) != 1.0):
            return m.fail(f"Gemm {g.name!r} has transA, alpha or beta other than the MatMul + Add defaults", g)
        if m[c] is not None and (m.value(c).shape is None or len(m.value(c).shape) > 1):
            return m.fail(f"Gemm {g.name!r}'s bias C is not a vector of N values", g)
        return _check(m, g, 1 if g.attrs.get("transB", 0) else 0)

    def gemm_replacement(op, m):
        """Gemm(x, W, C) (transB 0 or 1) -> MatMulNBits(x, pack(q), s, bias=C) | MatMul(x, DQ(q, s)) + C."""
        g = m.gemm
        return emit(op, m, g, bool(g.attrs.get("transB", 0)), m.value(c))

    suffix = "matmulnbits" if opts.form == "matmulnbits" else "dq"
    rules = [Rule(f"weight_only_matmul_{suffix}", op.MatMul(x, w, name="matmul"), matmul_replacement,
                  check=matmul_check),
             Rule(f"weight_only_gemm_{suffix}", op.Gemm(x, w, op.optional(c), name="gemm"), gemm_replacement,
                  check=gemm_check)]
    if opts.embeddings:
        rules.append(_embedding_rule(ctx, opts, suffix))
    return rules


def _embedding_rule(ctx: QuantContext, opts: NBitsOptions, suffix: str) -> Rule:
    """Gather(T, ids) on a constant float32 (V, H) table, axis 0 → blockwise k-bit rows (:func:`quantize_rows`)."""
    table, ids = Const("table", where=is_float_weight), Var("ids")

    def check(m):
        g = m.gather
        why = ctx.why_not(g)
        if why:
            return m.fail(why, g)
        t = m[table]
        if g.attrs.get("axis", 0) != 0 or t.ndim != 2:
            return m.fail("only 2-D tables gathered on axis 0 are quantized", g)
        if t.dtype != np.float32:
            return m.fail(f"table {m.value(table).name!r} is {t.dtype}, not float32", g)
        if t.shape[1] % opts.block_size:
            return m.fail(f"table {m.value(table).name!r} has rows of {t.shape[1]} values, not a multiple of "
                          f"block_size {opts.block_size}; it stays float", g)
        if t.size < ctx.min_weight_elements:
            return m.fail(f"table has {t.size} elements, fewer than min_weight_elements={ctx.min_weight_elements}",
                          g)
        if opts.form == "dq" and m.opset < MIN_OPSET_DQ:
            return m.fail(f"DequantizeLinear with block_size needs opset {MIN_OPSET_DQ}, the model has {m.opset}", g)
        if opts.form == "dq" and opts.bits == 4:
            return m.fail("ONNX Gather takes no int4 tensor (Gather-13), so a 4-bit table cannot be gathered "
                          "before it is dequantized; it stays float (use the matmulnbits form, whose "
                          "GatherBlockQuantized reads 4-bit rows, or 8 bits)", g)
        return None

    def consts(op, m) -> dict:
        tv = m.value(table)
        key = ("nbits-table", tv.name, opts.bits, opts.block_size, opts.symmetric, opts.form)
        hit = ctx.weight_cache.get(key)
        if hit is not None and all(v.graph is not None for v in hit.values() if isinstance(v, Value)):
            return hit
        arr = m[table]
        q, sc, z = quantize_rows(arr, opts.bits, opts.block_size, opts.symmetric)
        drop_pages(arr)
        import ml_dtypes

        if opts.bits == 4:
            npdt, dt = (ml_dtypes.int4, DataType.INT4) if opts.symmetric else (ml_dtypes.uint4, DataType.UINT4)
        elif opts.symmetric:
            npdt, dt = (np.int8, DataType.INT8) if opts.form == "dq" else (np.uint8, DataType.UINT8)
        else:
            npdt, dt = np.uint8, DataType.UINT8
        if opts.bits == 8 and opts.symmetric and opts.form == "matmulnbits":
            q = (q.astype(np.int16) + 128).astype(np.uint8)  # GatherBlockQuantized: uint8 codes, zero point 128
        made = {"q": op.const(q.astype(npdt), dtype=dt, name=f"{tv.name}_quantized", copy=False),
                "scale": op.const(sc, name=f"{tv.name}_scale", copy=False),
                "zero_point": None if z is None else op.const(z.astype(npdt), dtype=dt,
                                                               name=f"{tv.name}_zero_point", copy=False)}
        ctx.weight_cache[key] = made
        return made

    def replacement(op, m):
        """Gather(T, ids) -> GatherBlockQuantized(q, ids, s[, z]) | DQ(Gather(q, ids), Gather(s, ids)[, ...], axis=-1)."""
        g = m.gather
        t = consts(op, m)
        if opts.form == "matmulnbits":
            ins = [t["q"], m[ids], t["scale"]] + ([t["zero_point"]] if t["zero_point"] is not None else [])
            y = op.domain("com.microsoft").GatherBlockQuantized(*ins, gather_axis=0, quantize_axis=1,
                                                                block_size=opts.block_size, bits=opts.bits,
                                                                _name=g.name or "GatherBlockQuantized")
        else:
            parts = [op.Gather(t[k], m[ids], axis=0, _name=f"{g.name or 'Gather'}_{k}")
                     for k in ("q", "scale", "zero_point") if t[k] is not None]
            y = op.DequantizeLinear(*parts, axis=-1, block_size=opts.block_size,
                                    _name=f"{g.name or 'Gather'}_dequantize")
        y.producer.meta[QNAME_KEY] = node_key(g)
        return y

    return Rule(f"weight_only_embedding_{suffix}", op.Gather(table, ids, name="gather"), replacement, check=check)
