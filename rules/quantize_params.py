"""Quantization parameters: scales and zero points from ranges, per the ONNX QuantizeLinear spec.

ONNX QuantizeLinear (opset 10/13/19/21, https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html):
    y = saturate(round_half_to_even(x / y_scale) + y_zero_point)
DequantizeLinear:
    x = (y - x_zero_point) * x_scale
The zero point's element type selects the integer type (uint8, int8, int32 for biases,
int4/uint4 from opset 21).

Schemes (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", §2.1; Krishnamoorthi 2018, "Quantizing deep
convolutional networks for efficient inference", §2):

- asymmetric uint8: [rmin, rmax] is widened to contain 0 (so 0.0 is exact, padding and ReLU
  stay exact), scale = (rmax - rmin) / 255, zero_point = round(-rmin / scale).
- symmetric int8: scale = max(|rmin|, |rmax|) / 127, zero_point = 0 (the grid is [-127, 127];
  -128 is left unused so that negation is exact, as in onnxruntime's quantizer).
- symmetric int4: scale = amax / 7, grid [-7, 7] (weight-only blocks).
- int32 bias: scale = s_x * s_w (per output channel), zero_point = 0, so that
  Conv/MatMul accumulators add the bias without rescaling.

Degenerate ranges never produce a zero, infinite or NaN scale: a range of all zeros
(or no finite values at all) gets scale 1.0, and a :class:`QuantizationWarning` names the
tensor; non-finite values are ignored when ranges are observed (see
:mod:`graft.compiler.techniques.calibration.observers`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from graft.ir.dtypes import DataType


class QuantizationWarning(UserWarning):
    """A tensor got a safe fallback scale (degenerate range) or a clamped value."""


class QuantizationError(ValueError):
    """A quantization request that cannot be met (bad option, opset too old, no calibration for a tensor)."""


# Smallest scale handed out: keeps x / scale finite for float32 x (max ~3.4e38).
MIN_SCALE = 1e-30


@dataclass(frozen=True)
class QType:
    """An integer grid: element type and the range of integer levels used."""

    name: str
    dtype: DataType
    qmin: int
    qmax: int
    symmetric: bool

    @property
    def numpy(self):
        return self.dtype.to_numpy()


UINT8_ASYM = QType("uint8", DataType.UINT8, 0, 255, False)
INT8_SYM = QType("int8", DataType.INT8, -127, 127, True)
INT4_SYM = QType("int4", DataType.INT4, -7, 7, True)
INT32_BIAS = QType("int32", DataType.INT32, -(2**31 - 1), 2**31 - 1, True)


@dataclass
class QParams:
    """Scale and zero point of one tensor (per-tensor: shape (); per-axis: shape (C,); blocked: any).

    Attributes:
        scale: float32 array, all entries > 0 and finite.
        zero_point: integer array of ``qtype``'s numpy dtype, same shape as ``scale``.
        qtype: the integer grid.
        axis: the channel axis for per-axis parameters, else None.
        block_size: the block length along ``axis`` for blocked parameters (opset 21), else 0.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QType
    axis: int | None = None
    block_size: int = 0

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1 and self.axis is None

    def same_as(self, other: "QParams") -> bool:
        return (self.qtype == other.qtype and self.axis == other.axis and self.block_size == other.block_size
                and self.scale.shape == other.scale.shape and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point, other.zero_point))


def _safe_scale(scale: np.ndarray, what: str) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64)
    bad = ~np.isfinite(scale) | (scale <= 0)
    if np.any(bad):
        n = int(np.count_nonzero(bad))
        where = "" if scale.ndim == 0 else f" ({n} of {scale.size} channels)"
        warnings.warn(QuantizationWarning(
            f"{what}: degenerate range (all zeros, constant zero, or no finite values){where}; "
            f"using scale 1.0 there so that nothing divides by zero"), stacklevel=3)
        scale = np.where(bad, 1.0, scale)
    return np.maximum(scale, MIN_SCALE).astype(np.float32)


def activation_params(lo: float, hi: float, qtype: QType = UINT8_ASYM, name: str = "tensor") -> QParams:
    """Per-tensor parameters for an activation observed in ``[lo, hi]``.

    Args:
        lo, hi: the calibrated range (floats; non-finite values are treated as 0).
        qtype: :data:`UINT8_ASYM` or :data:`INT8_SYM`.
        name: tensor name used in warnings.

    Returns:
        :class:`QParams` with scalar scale/zero point.
    """
    lo = float(lo) if np.isfinite(lo) else 0.0
    hi = float(hi) if np.isfinite(hi) else 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if qtype.symmetric:
        amax = max(-lo, hi)
        scale = _safe_scale(np.array(amax / qtype.qmax), name)
        zp = np.zeros((), dtype=qtype.numpy)
    else:
        scale = _safe_scale(np.array((hi - lo) / (qtype.qmax - qtype.qmin)), name)
        zp = np.array(np.clip(np.round(qtype.qmin - lo / float(scale)), qtype.qmin, qtype.qmax), dtype=qtype.numpy)
    return QParams(scale.reshape(()), zp.reshape(()), qtype)


def weight_params(w: np.ndarray, axis: int | None, qtype: QType = INT8_SYM, name: str = "weight") -> QParams:
    """Symmetric parameters for a weight: per channel along ``axis``, or per tensor when ``axis`` is None.

    Raises:
        QuantizationError: ``axis`` out of range for ``w``.
    """
    w = np.asarray(w, dtype=np.float64)
    finite = np.where(np.isfinite(w), np.abs(w), 0.0)
    if axis is None:
        amax = np.array(finite.max() if finite.size else 0.0)
    else:
        if not -w.ndim <= axis < w.ndim:
            raise QuantizationError(f"{name}: channel axis {axis} is out of range for a weight of shape {w.shape}")
        axis = axis % w.ndim
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = finite.max(axis=red) if red else finite
    scale = _safe_scale(amax / qtype.qmax, name)
    zp = np.zeros(scale.shape, dtype=qtype.numpy)
    return QParams(scale, zp, qtype, axis)


def blocked_weight_params(w: np.ndarray, axis: int, block_size: int, qtype: QType = INT8_SYM,
                          name: str = "weight") -> QParams:
    """Symmetric blockwise parameters (ONNX DequantizeLinear-21 ``block_size``).

    The scale has ``w``'s shape except along ``axis``, where it has ceil(D / block_size)
    entries; entry i covers ``w[..., i*block_size:(i+1)*block_size, ...]``.

    Raises:
        QuantizationError: ``block_size`` < 2.
    """
    if block_size < 2:
        raise QuantizationError(f"{name}: block_size must be >= 2, got {block_size}")
    w = np.asarray(w, dtype=np.float64)
    axis = axis % w.ndim
    d = w.shape[axis]
    nblocks = -(-d // block_size)
    pad = nblocks * block_size - d
    finite = np.where(np.isfinite(w), np.abs(w), 0.0)
    if pad:
        widths = [(0, 0)] * w.ndim
        widths[axis] = (0, pad)
        finite = np.pad(finite, widths)
    shp = list(finite.shape)
    shp[axis:axis + 1] = [nblocks, block_size]
    amax = finite.reshape(shp).max(axis=axis + 1)
    scale = _safe_scale(amax / qtype.qmax, name)
    zp = np.zeros(scale.shape, dtype=qtype.numpy)
    return QParams(scale, zp, qtype, axis, block_size)


def _expand(p: QParams, ndim: int, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    s = p.scale.astype(np.float64)
    z = p.zero_point.astype(np.float64)
    if p.block_size:
        s = np.repeat(s, p.block_size, axis=p.axis)
        z = np.repeat(z, p.block_size, axis=p.axis)
        idx = [slice(None)] * ndim
        idx[p.axis] = slice(0, shape[p.axis])
        return s[tuple(idx)], z[tuple(idx)]
    if p.axis is not None and s.ndim == 1:
        bshape = [1] * ndim
        bshape[p.axis] = -1
        return s.reshape(bshape), z.reshape(bshape)
    return s, z


def _saturation(qtype: QType) -> tuple[int, int]:
    # QuantizeLinear saturates to the element type's full range, not to the grid used for scales
    return {DataType.UINT8: (0, 255), DataType.INT8: (-128, 127), DataType.INT4: (-8, 7),
            DataType.UINT4: (0, 15)}.get(qtype.dtype, (qtype.qmin, qtype.qmax))


def quantize(x: np.ndarray, p: QParams) -> np.ndarray:
    """QuantizeLinear in numpy (round half to even, saturate to the element type), ``p.qtype``'s dtype."""
    x = np.asarray(x, dtype=np.float64)
    s, z = _expand(p, x.ndim, x.shape)
    lo, hi = _saturation(p.qtype)
    q = np.clip(np.rint(np.where(np.isfinite(x), x, 0.0) / s) + z, lo, hi)
    return q.astype(p.qtype.numpy)


def dequantize(q: np.ndarray, p: QParams) -> np.ndarray:
    """DequantizeLinear in numpy (float32 result)."""
    q = np.asarray(q).astype(np.float64)
    s, z = _expand(p, q.ndim, q.shape)
    return ((q - z) * s).astype(np.float32)


def bias_params(x_scale: np.ndarray, w_scale: np.ndarray) -> QParams:
    """int32 bias parameters with scale ``x_scale * w_scale`` (per output channel)."""
    s = np.asarray(x_scale, dtype=np.float64).reshape(()) * np.asarray(w_scale, dtype=np.float64)
    s = _safe_scale(s, "bias")
    return QParams(s, np.zeros(s.shape, dtype=np.int32), INT32_BIAS, 0 if s.ndim == 1 else None)


def quantize_bias(b: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray, name: str = "bias"
                  ) -> tuple[np.ndarray, QParams]:
    """``b`` as int32 with scale ``x_scale * w_scale``; values beyond int32 are clamped (with a warning)."""
    p = bias_params(x_scale, w_scale)
    s = p.scale.astype(np.float64)
    raw = np.rint(np.asarray(b, dtype=np.float64) / (s if s.ndim == 0 else s.reshape(-1)))
    lim = float(INT32_BIAS.qmax)
    if np.any(np.abs(raw) > lim):
        warnings.warn(QuantizationWarning(
            f"{name}: {int(np.count_nonzero(np.abs(raw) > lim))} bias value(s) exceed int32 at scale "
            f"s_x*s_w and were clamped (the activation or weight scale is very small)"), stacklevel=2)
    return np.clip(raw, -lim, lim).astype(np.int32), p


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum(ref^2) / sum((ref - approx)^2)) in dB (inf if exact)."""
    r = np.asarray(reference, dtype=np.float64)
    a = np.asarray(approx, dtype=np.float64)
    ok = np.isfinite(r) & np.isfinite(a)
    noise = float(np.sum((r[ok] - a[ok]) ** 2))
    signal = float(np.sum(r[ok] ** 2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))
