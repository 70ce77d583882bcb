"""ONNX neural-network ops as torch functions: convolution, pooling, normalization,
padding, resizing, quantization (see :mod:`graft.ir.torch_ops` for the conventions).

Padding: ONNX ``pads`` are ``[b_1..b_n, e_1..e_n]`` over the spatial axes; torch
convolutions and pools pad symmetrically, so unequal pads are applied with
``F.pad`` first (``-inf`` for MaxPool). ``auto_pad`` SAME_UPPER/SAME_LOWER follow
the ONNX Conv spec: ``total = max((ceil(in/s) - 1)*s + (k - 1)*d + 1 - in, 0)``,
the extra element at the end (UPPER) or the beginning (LOWER).

Quantization (ONNX QuantizeLinear / DequantizeLinear, opset 10-21):
``q = saturate(round_half_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``;
per-tensor when ``scale`` has one element, else per-channel along ``axis``.
A QuantizeLinear→DequantizeLinear pair becomes :func:`fake_quantize`
(``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``, straight-through gradient).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graft.ir.torch_ops import UnsupportedInTorchBackend, norm_axis, ints, onnx_op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pads(x, kernel, strides, dilations, pads, auto_pad) -> list[int]:
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i in range(n):
            size = x.shape[2 + i]
            total = max((-(-size // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small = total // 2
            out.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        return [b for b, _ in out] + [e for _, e in out]
    if auto_pad == "VALID" or pads is None:
        return [0] * (2 * n)
    return list(pads)


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] → F.pad's [b_n, e_n, ..., b_1, e_1] (last axis first)."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[n + i]]
    return out


def _symmetric(pads: list[int]) -> bool:
    n = len(pads) // 2
    return pads[:n] == pads[n:]


# --------------------------------------------------------------------------- convolution
@onnx_op("Conv")
def Conv(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None,
         strides=None):
    n = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    p = _pads(x, kernel, strides, dilations, pads, auto_pad)
    if _symmetric(p):
        return _CONV[n](x, w, b, strides, p[:n], dilations, group)
    return _CONV[n](F.pad(x, _torch_pad(p)), w, b, strides, 0, dilations, group)


@onnx_op("ConvTranspose")
def ConvTranspose(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                  output_padding=None, output_shape=None, pads=None, strides=None):
    n = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    output_padding = output_padding or [0] * n
    full = _CONVT[n](x, w, b, strides, 0, output_padding, group, dilations)
    if output_shape is not None:
        out = list(output_shape)[-n:]
        begin, end = [], []
        for i in range(n):
            total = strides[i] * (x.shape[2 + i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 - out[i]
            small = total // 2
            if auto_pad == "SAME_UPPER":
                begin.append(small), end.append(total - small)
            else:
                begin.append(total - small), end.append(small)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            total = strides[i] * (x.shape[2 + i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 \
                - x.shape[2 + i] * strides[i]
            small = total // 2
            (begin.append(small), end.append(total - small)) if auto_pad == "SAME_UPPER" else \
                (begin.append(total - small), end.append(small))
    else:
        p = list(pads) if pads else [0] * (2 * n)
        begin, end = p[:n], p[n:]
    for i in range(n):
        if begin[i] or end[i]:
            full = full.narrow(2 + i, begin[i], full.shape[2 + i] - begin[i] - end[i])
    return full


# --------------------------------------------------------------------------- normalization
@onnx_op("BatchNormalization")
def BatchNormalization(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0, spatial=1,
                       _outputs=1):
    if training_mode:
        raise UnsupportedInTorchBackend("BatchNormalization with training_mode=1 is not supported by the torch "
                                        "backend")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


@onnx_op("InstanceNormalization")
def InstanceNormalization(x, scale, bias, *, epsilon=1e-5):
    return F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


@onnx_op("LayerNormalization", since=17)
def LayerNormalization(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1, _outputs=1):
    axis = norm_axis(axis, x.dim())
    shape = tuple(x.shape[axis:])
    if _outputs == 1 and tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, epsilon)
    dims = list(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + epsilon)
    y = (x - mean) * inv * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv)[:_outputs] if _outputs > 1 else y


@onnx_op("GroupNormalization", since=18)
def GroupNormalization_18(x, scale, bias, *, epsilon=1e-5, num_groups, stash_type=1):
    # opset 18: scale and bias are per group
    c = x.shape[1]
    rep = c // num_groups
    return F.group_norm(x, num_groups, scale.repeat_interleave(rep), bias.repeat_interleave(rep), epsilon)


@onnx_op("GroupNormalization", since=21)
def GroupNormalization(x, scale, bias, *, epsilon=1e-5, num_groups, stash_type=1):
    return F.group_norm(x, num_groups, scale, bias, epsilon)


@onnx_op("LpNormalization")
def LpNormalization(x, *, axis=-1, p=2):
    return F.normalize(x, p=p, dim=axis, eps=0.0)


# --------------------------------------------------------------------------- pooling
@onnx_op("MaxPool")
def MaxPool(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape, pads=None, storage_order=0,
            strides=None, _outputs=1):
    if _outputs > 1:
        raise UnsupportedInTorchBackend("MaxPool's Indices output is not supported by the torch backend")
    n = len(kernel_shape)
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    p = _pads(x, kernel_shape, strides, dilations, pads, auto_pad)
    if _symmetric(p) and all(p[i] * 2 <= kernel_shape[i] for i in range(n)):
        return _MAXPOOL[n](x, kernel_shape, strides, p[:n], dilations, bool(ceil_mode))
    x = F.pad(x, _torch_pad(p), value=float("-inf"))
    return _MAXPOOL[n](x, kernel_shape, strides, 0, dilations, bool(ceil_mode))


@onnx_op("AveragePool")
def AveragePool(x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape,
                pads=None, strides=None):
    n = len(kernel_shape)
    strides = strides or [1] * n
    if dilations and any(d != 1 for d in dilations):
        raise UnsupportedInTorchBackend("AveragePool with dilations is not supported by the torch backend")
    p = _pads(x, kernel_shape, strides, [1] * n, pads, auto_pad)
    if _symmetric(p) and all(p[i] * 2 <= kernel_shape[i] for i in range(n)):
        return _AVGPOOL[n](x, kernel_shape, strides, p[:n], bool(ceil_mode), bool(count_include_pad))
    padded = F.pad(x, _torch_pad(p))
    total = _AVGPOOL[n](padded, kernel_shape, strides, 0, bool(ceil_mode), True)
    if count_include_pad:
        return total
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(p))
    frac = _AVGPOOL[n](ones, kernel_shape, strides, 0, bool(ceil_mode), True)
    return total / frac


@onnx_op("GlobalAveragePool")
def GlobalAveragePool(x):
    return x.mean(list(range(2, x.dim())), keepdim=True)


@onnx_op("GlobalMaxPool")
def GlobalMaxPool(x):
    return x.amax(list(range(2, x.dim())), keepdim=True)


# --------------------------------------------------------------------------- pad / resize
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(x, pads, mode, value):
    tp = _torch_pad(list(pads))
    while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:
        tp = tp[:-2]  # torch pads non-constant modes over the last 1-3 dims only: drop untouched leading dims
    return F.pad(x, tp, _PAD_MODES[mode], value if mode == "constant" else None)


@onnx_op("Pad", since=1)
def Pad_1(x, *, pads, mode="constant", value=0.0):
    return _pad(x, pads, mode, value)


@onnx_op("Pad", since=11)
def Pad(x, pads, constant_value=None, axes=None, *, mode="constant"):
    p = ints(pads)
    if axes is not None:
        ax = [norm_axis(a, x.dim()) for a in ints(axes)]
        full = [0] * (2 * x.dim())
        for i, a in enumerate(ax):
            full[a], full[x.dim() + a] = p[i], p[len(ax) + i]
        p = full
    v = float(constant_value.reshape(-1)[0]) if constant_value is not None else 0.0
    return _pad(x, p, mode, v)


def _nearest_index(out_size, in_size, scale, ctm, nearest_mode):
    """Source index of each output position (ONNX Resize coordinate transform + nearest rounding)."""
    o = torch.arange(out_size, dtype=torch.float64)
    if ctm == "asymmetric":
        src = o / scale
    elif ctm == "align_corners":
        src = o * (in_size - 1) / (out_size - 1) if out_size > 1 else torch.zeros_like(o)
    elif ctm == "pytorch_half_pixel":
        src = (o + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros_like(o)
    elif ctm == "tf_half_pixel_for_nn":
        src = (o + 0.5) / scale
    else:  # half_pixel
        src = (o + 0.5) / scale - 0.5
    if nearest_mode == "floor":
        idx = torch.floor(src)
    elif nearest_mode == "ceil":
        idx = torch.ceil(src)
    elif nearest_mode == "round_prefer_ceil":
        idx = torch.floor(src + 0.5)
    else:  # round_prefer_floor
        idx = torch.ceil(src - 0.5)
    return idx.clamp(0, in_size - 1).long()


@onnx_op("Resize", since=10)
def Resize(x, roi=None, scales=None, sizes=None, *, mode="nearest", coordinate_transformation_mode="half_pixel",
           nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0,
           antialias=0, axes=None, keep_aspect_ratio_policy="stretch"):
    rank = x.dim()
    if sizes is not None and sizes.numel():
        out = ints(sizes)
        out = list(x.shape[:rank - len(out)]) + out
        sc = [out[i] / x.shape[i] for i in range(rank)]
    else:
        s = [float(v) for v in scales.reshape(-1).tolist()] if scales is not None and scales.numel() else \
            [float(v) for v in roi.reshape(-1).tolist()]  # opset 10: the second input is scales
        sc = [1.0] * (rank - len(s)) + s
        out = [int(math.floor(x.shape[i] * sc[i])) for i in range(rank)]
    if antialias:
        raise UnsupportedInTorchBackend("Resize with antialias=1 is not supported by the torch backend")
    if out[0] != x.shape[0] or out[1] != x.shape[1]:
        raise UnsupportedInTorchBackend("Resize of the batch or channel axis is not supported by the torch "
                                        "backend")
    spatial = out[2:]
    if mode == "nearest":
        y = x
        for i, size in enumerate(spatial):
            idx = _nearest_index(size, x.shape[2 + i], sc[2 + i], coordinate_transformation_mode, nearest_mode)
            y = y.index_select(2 + i, idx.to(x.device))
        return y
    interp = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)] if mode == "linear" else "bicubic"
    ctm = coordinate_transformation_mode
    if ctm == "align_corners":
        return F.interpolate(x, size=spatial, mode=interp, align_corners=True)
    if ctm in ("half_pixel", "pytorch_half_pixel"):
        return F.interpolate(x, size=spatial, mode=interp, align_corners=False)
    raise UnsupportedInTorchBackend(f"Resize mode={mode!r} with coordinate_transformation_mode={ctm!r} "
                                    f"is not supported by the torch backend")


@onnx_op("Upsample")
def Upsample(x, scales=None, *, mode="nearest", **_):
    return Resize(x, None, scales, None, mode=mode, coordinate_transformation_mode="asymmetric",
                  nearest_mode="floor")


@onnx_op("DepthToSpace")
def DepthToSpace(x, *, blocksize, mode="DCR"):
    if mode == "CRD":
        return F.pixel_shuffle(x, blocksize)
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@onnx_op("SpaceToDepth")
def SpaceToDepth(x, *, blocksize):
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


# --------------------------------------------------------------------------- quantization
_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535),
           torch.int16: (-32768, 32767), torch.int32: (-2**31, 2**31 - 1)}


def _per_axis(t, x, axis):
    """Reshape a per-channel 1-D parameter to broadcast along ``axis`` of ``x``."""
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[norm_axis(axis, x.dim())] = t.numel()
    return t.reshape(shape)


@onnx_op("QuantizeLinear", since=10)
def QuantizeLinear(x, scale, zero_point=None, *, axis=1, saturate=1, block_size=0, output_dtype=0):
    dtype = zero_point.dtype if zero_point is not None else torch.uint8
    lo, hi = _QRANGE[dtype]
    zp = _per_axis(zero_point, x, axis).to(torch.float32) if zero_point is not None else 0.0
    q = torch.round(x / _per_axis(scale, x, axis)) + zp
    return torch.clamp(q, lo, hi).to(dtype)


@onnx_op("DequantizeLinear", since=10)
def DequantizeLinear(x, scale, zero_point=None, *, axis=1, block_size=0):
    zp = _per_axis(zero_point, x, axis).to(torch.float32) if zero_point is not None else 0.0
    return (x.to(torch.float32) - zp) * _per_axis(scale, x, axis)


def fake_quantize(x, scale, zero_point, *, axis=1, quant_min, quant_max):
    """QuantizeLinear→DequantizeLinear as one torch fake-quantize call (per tensor or per channel).

    Args:
        x: float tensor; scale: float32, one element (per tensor) or ``x.shape[axis]``
        elements (per channel); zero_point: integer tensor of the same size.
        quant_min, quant_max: the integer range of the quantized type (0..255 for uint8).

    Returns:
        ``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale`` with a
        straight-through gradient for ``x``.
    """
    zp = zero_point.to(torch.int32)
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1).to(torch.float32), zp.reshape(1),
                                                     quant_min, quant_max)
    return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1).to(torch.float32), zp.reshape(-1),
                                                  norm_axis(axis, x.dim()), quant_min, quant_max)


def quant_range(dtype) -> tuple[int, int]:
    """(qmin, qmax) of a torch integer dtype used by QuantizeLinear."""
    return _QRANGE[dtype]
