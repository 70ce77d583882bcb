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

from graft.ir.torch_ops import ONNX_DTYPES, cast_to, ints, norm_axis, onnx_op, refuses

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
    """ONNX ConvTranspose-11: the full transposed convolution (``(in - 1)*stride + (k - 1)*dilation + 1``
    per axis, plus ``output_padding`` zeros at the end), cropped by ``pads``. With ``output_shape`` (or
    SAME_*, whose default output is ``in*stride``) the pads follow the spec's equations:
    ``total = full - output_shape``; SAME_UPPER puts ``total // 2`` at the beginning, otherwise the
    beginning gets ``total - total // 2`` (a negative pad adds zeros). The bias is added last."""
    n = w.dim() - 2
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    output_padding = list(output_padding or [0] * n)[:n]
    full = _CONVT[n](x, w, None, strides, 0, 0, group, dilations)
    sizes = [full.shape[2 + i] + output_padding[i] for i in range(n)]
    same = auto_pad in ("SAME_UPPER", "SAME_LOWER")
    if output_shape is not None or same:
        out = list(output_shape)[-n:] if output_shape is not None else [x.shape[2 + i] * strides[i] for i in range(n)]
        begin = []
        for i in range(n):
            total = sizes[i] - out[i]
            begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    else:
        p = list(pads) if pads else [0] * (2 * n)
        begin = p[:n]
        out = [sizes[i] - p[i] - p[n + i] for i in range(n)]
    amounts = []
    for i in reversed(range(n)):  # F.pad: last axis first; negative amounts crop
        amounts += [-begin[i], begin[i] + out[i] - full.shape[2 + i]]
    y = F.pad(full, amounts) if any(amounts) else full
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * n))
    return y


def _batch_norm(x, scale, bias, mean, var, epsilon, momentum, train, spatial, outputs):
    """Inference: ``scale*(x - mean)/sqrt(var + eps) + bias``. Training (ONNX BatchNormalization-15 and
    the earlier output forms): normalized with the batch mean and biased variance over every axis but 1,
    running statistics ``stat*momentum + batch_stat*(1 - momentum)``."""
    dt = x.dtype
    if not spatial:  # opset < 9, spatial=0: statistics per activation (shape x.shape[1:])
        return (scale * (x - mean) / torch.sqrt(var + epsilon) + bias).to(dt)
    if not train:  # statistics and scale/bias as given: float32 ones next to float16 x keep their precision
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)
    dims = [0] + list(range(2, x.dim()))
    b_mean = x.mean(dims)
    b_var = x.var(dims, unbiased=False)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - b_mean.reshape(shape)) / torch.sqrt(b_var.reshape(shape) + epsilon) * scale.to(dt).reshape(shape) \
        + bias.to(dt).reshape(shape)
    if outputs == 1:
        return y
    run_mean = (mean * momentum + b_mean.to(mean.dtype) * (1 - momentum)).to(mean.dtype)
    run_var = (var * momentum + b_var.to(var.dtype) * (1 - momentum)).to(var.dtype)
    return (y, run_mean, run_var, b_mean, b_var)[:outputs]


@onnx_op("BatchNormalization", since=1)
def BatchNormalization_1(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, is_test=0, spatial=1,
                         _outputs=1):
    return _batch_norm(x, scale, bias, mean, var, epsilon, momentum, not is_test or _outputs > 1, spatial,
                       _outputs)


@onnx_op("BatchNormalization", since=7)
def BatchNormalization_7(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, spatial=1, _outputs=1):
    return _batch_norm(x, scale, bias, mean, var, epsilon, momentum, _outputs > 1, spatial, _outputs)


@onnx_op("BatchNormalization", since=14)
def BatchNormalization(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0, _outputs=1):
    return _batch_norm(x, scale, bias, mean, var, epsilon, momentum, bool(training_mode), 1, _outputs)


@refuses("BatchNormalization")
def _bn_check(attrs, n_outputs, in_types, opset, in_ranks):
    if not attrs.get("spatial", 1) and (n_outputs > 1 or (opset < 7 and not attrs.get("is_test", 0))):
        return "attribute spatial=0 in training mode is not supported"
    return None


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
    """``x / ||x||_p`` along ``axis``; a zero vector stays zero (as ``onnx.reference`` does)."""
    norm = torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)
    return torch.where(norm == 0, torch.zeros_like(x), x / torch.where(norm == 0, torch.ones_like(norm), norm))


@onnx_op("MeanVarianceNormalization")
def MeanVarianceNormalization(x, *, axes=(0, 2, 3)):
    """``(x - mean) / sqrt(var)`` over ``axes`` (biased variance; ONNX MeanVarianceNormalization-13's function
    body, epsilon 1e-9)."""
    axes = [norm_axis(a, x.dim()) for a in axes]
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    return (x - mean) / (torch.sqrt(var) + 1e-9)


@onnx_op("RMSNormalization", since=23)
def RMSNormalization(x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    """``x / sqrt(mean(x^2 over axis..last) + epsilon) * scale`` (ONNX RMSNormalization-23), computed in
    float32 (``stash_type`` 1) and returned in ``x``'s dtype."""
    axis = norm_axis(axis, x.dim())
    xf = x.to(torch.float32) if stash_type == 1 else x
    dims = list(range(axis, x.dim()))
    y = xf * torch.rsqrt((xf * xf).mean(dims, keepdim=True) + epsilon)
    return (y.to(x.dtype) * scale).to(x.dtype)


@onnx_op("LRN")
def LRN(x, *, size, alpha=1e-4, beta=0.75, bias=1.0):
    """Local response normalization across channels (ONNX LRN-13):
    ``x / (bias + alpha/size * sum(x^2 over channels c-floor((size-1)/2) .. c+ceil((size-1)/2)))^beta``."""
    sq = (x * x).unsqueeze(1)  # [N, 1, C, ...]: pool over the channel axis
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = F.pad(sq.reshape(sq.shape[0], 1, sq.shape[2], -1), (0, 0, lo, hi))
    summed = F.avg_pool2d(sq, (size, 1), stride=1) * size
    summed = summed.reshape(x.shape)
    return x / (bias + alpha / size * summed) ** beta


# --------------------------------------------------------------------------- pooling
def _pool_out(size, k, s, d, b, e, ceil_mode):
    """ONNX pooling output length on one axis: windows of extent ``(k-1)*d + 1`` over the padded input,
    rounded up with ``ceil_mode`` — but a window may not start inside the end padding."""
    span = size + b + e - ((k - 1) * d + 1)
    o = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (o - 1) * s >= size + b:
        o -= 1
    return o


def _pool_frame(x, kernel, strides, dilations, p, ceil_mode, value):
    """``x`` padded with ``value`` by ``p`` and, for ``ceil_mode``, at the end so every window fits."""
    n = len(kernel)
    pads = list(p)
    for i in range(n):
        o = _pool_out(x.shape[2 + i], kernel[i], strides[i], dilations[i], p[i], p[n + i], ceil_mode)
        need = (o - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - (x.shape[2 + i] + p[i] + p[n + i])
        pads[n + i] += max(need, 0)
    return F.pad(x, _torch_pad(pads), value=value) if any(pads) else x, pads


@onnx_op("MaxPool")
def MaxPool(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape, pads=None, storage_order=0,
            strides=None, _outputs=1):
    """ONNX MaxPool-12. The optional Indices output holds flat indices into ``x``
    (``(n*C + c)*prod(spatial) + offset``, the offset row-major, or column-major for ``storage_order`` 1),
    the first maximum of each window."""
    n = len(kernel_shape)
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    p = _pads(x, kernel_shape, strides, dilations, pads, auto_pad)
    if _outputs == 1:
        if _symmetric(p) and all(p[i] * 2 <= kernel_shape[i] for i in range(n)):
            return _MAXPOOL[n](x, kernel_shape, strides, p[:n], dilations, bool(ceil_mode))
        xp = F.pad(x, _torch_pad(p), value=float("-inf"))
        return _MAXPOOL[n](xp, kernel_shape, strides, 0, dilations, bool(ceil_mode))
    xp, full = _pool_frame(x, kernel_shape, strides, dilations, p, ceil_mode, float("-inf"))
    y, idx = _MAXPOOL[n](xp, kernel_shape, strides, 0, dilations, False, True)
    # torch's indices are row-major offsets into the padded plane: back to coordinates in x
    padded = [xp.shape[2 + i] for i in range(n)]
    coords, rest = [], idx
    for i in reversed(range(n)):
        coords.append(rest % padded[i] - full[i])
        rest = rest // padded[i]
    coords.reverse()
    spatial = [x.shape[2 + i] for i in range(n)]
    flat = torch.zeros_like(idx)
    order = range(n) if not storage_order else reversed(range(n))
    for i in order:
        flat = flat * spatial[i] + coords[i]
    plane = math.prod(spatial)
    base = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1],
                                                                         *([1] * n)) * plane
    return y, flat + base


def _window_sum(x, kernel, strides, dilations):
    """Sum over each (dilated) pooling window: a depthwise convolution with a kernel of ones."""
    n = len(kernel)
    c = x.shape[1]
    w = torch.ones((c, 1, *kernel), dtype=x.dtype, device=x.device)
    return _CONV[n](x, w, None, strides, 0, dilations, c)


@onnx_op("AveragePool")
def AveragePool(x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape,
                pads=None, strides=None):
    """ONNX AveragePool-19: the window mean; with ``count_include_pad`` the divisor counts the explicit pads,
    never the extra end positions ``ceil_mode`` adds."""
    n = len(kernel_shape)
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    p = _pads(x, kernel_shape, strides, dilations, pads, auto_pad)
    if all(d == 1 for d in dilations):
        if _symmetric(p) and all(p[i] * 2 <= kernel_shape[i] for i in range(n)):
            return _AVGPOOL[n](x, kernel_shape, strides, p[:n], bool(ceil_mode), bool(count_include_pad))
        if not ceil_mode:
            padded = F.pad(x, _torch_pad(p))
            total = _AVGPOOL[n](padded, kernel_shape, strides, 0, False, True)
            if count_include_pad:
                return total
            ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(p))
            return total / _AVGPOOL[n](ones, kernel_shape, strides, 0, False, True)
    xp, full = _pool_frame(x, kernel_shape, strides, dilations, p, ceil_mode, 0.0)
    total = _window_sum(xp, kernel_shape, strides, dilations)
    # the divisor: ones over x (and over the explicit pads with count_include_pad), zero over ceil's extra
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if count_include_pad:
        ones = F.pad(ones, _torch_pad(p), value=1.0)
        extra = [0] * n + [full[n + i] - p[n + i] for i in range(n)]
    else:
        extra = full
    ones = F.pad(ones, _torch_pad(extra)) if any(extra) else ones
    return total / _window_sum(ones, kernel_shape, strides, dilations)


@onnx_op("LpPool")
def LpPool(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape, p=2, pads=None, strides=None):
    """ONNX LpPool-18: ``(sum over the window of |x|^p)^(1/p)``, zero padding."""
    n = len(kernel_shape)
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    pd = _pads(x, kernel_shape, strides, dilations, pads, auto_pad)
    xp, _ = _pool_frame(x, kernel_shape, strides, dilations, pd, ceil_mode, 0.0)
    return _window_sum(xp.abs() ** p, kernel_shape, strides, dilations) ** (1.0 / p)


@onnx_op("GlobalLpPool")
def GlobalLpPool(x, *, p=2):
    return (x.abs() ** p).sum(list(range(2, x.dim())), keepdim=True) ** (1.0 / p)


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


# Resize (ONNX Resize-10/11/13/18/19) is separable: each resized axis is a contraction with an
# [out, in] weight matrix built exactly as onnx.reference's _interpolate_1d_along_axis builds its
# coefficients (coordinate transform, kernel, edge-clamped neighbours, exclude_outside, antialias), so
# every mode and attribute is honoured; common cases go to F.interpolate, which computes the same thing.
def _source_coords(y, in_w, out_w, scale, ctm, roi):
    """Input coordinate of each output position (float64) and, for tf_crop_and_resize, which fall outside."""
    width = scale * in_w
    extrap = None
    if ctm == "align_corners":
        x = torch.zeros_like(y) if width == 1 else y * (in_w - 1) / (width - 1)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "tf_crop_and_resize":
        lo, hi = roi
        x = torch.full_like(y, (hi - lo) * (in_w - 1) / 2) if width == 1 else y * (hi - lo) * (in_w - 1) / (width - 1)
        x = x + lo * (in_w - 1)
        extrap = (x < 0) | (x > in_w - 1)
    elif ctm == "pytorch_half_pixel":
        x = torch.full_like(y, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        offset = in_w / 2 * (1 - out_w / width)
        x = offset + (y + 0.5) / scale - 0.5
    elif ctm == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    else:  # half_pixel
        x = (y + 0.5) / scale - 0.5
    return x, extrap


def _coeffs(ratio, scale, mode, nearest_mode, a, antialias):
    """[out, n] interpolation weights for the fractional positions ``ratio`` (in (0, 1])."""
    r = ratio.unsqueeze(1)
    if mode == "nearest":
        whole = r == 1.0
        if nearest_mode == "round_prefer_ceil":
            right = r >= 0.5
        elif nearest_mode == "floor":
            right = torch.zeros_like(whole)
        elif nearest_mode == "ceil":
            right = torch.ones_like(whole)
        else:  # round_prefer_floor
            right = r > 0.5
        right = right | whole
        return torch.cat([(~right).double(), right.double()], 1)
    s = min(scale, 1.0)
    if mode == "linear":
        if not antialias:
            return torch.cat([1 - r, r], 1)
        start = math.floor(-1 / s) + 1
        args = (torch.arange(start, 2 - start, dtype=torch.float64) - r) * s
        c = (1 - args.abs()).clamp(0, 1)
        return c / c.sum(1, keepdim=True)
    if not antialias:
        q = 1 - r
        return torch.cat([((a * (r + 1) - 5 * a) * (r + 1) + 8 * a) * (r + 1) - 4 * a,
                          ((a + 2) * r - (a + 3)) * r * r + 1,
                          ((a + 2) * q - (a + 3)) * q * q + 1,
                          ((a * (q + 1) - 5 * a) * (q + 1) + 8 * a) * (q + 1) - 4 * a], 1)
    start = math.floor(-2 / s) + 1
    t = ((torch.arange(start, 2 - start, dtype=torch.float64) - r) * s).abs()
    c = torch.where(t <= 1, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
                    torch.where(t < 2, a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a, torch.zeros_like(t)))
    return c / c.sum(1, keepdim=True)


def _axis_weights(in_w, out_w, scale, mode, ctm, roi, nearest_mode, a, exclude_outside, antialias):
    """The [out, in] float64 weight matrix of one axis and the tf_crop_and_resize extrapolation mask."""
    y = torch.arange(out_w, dtype=torch.float64)
    x, extrap = _source_coords(y, in_w, out_w, scale, ctm, roi)
    xi = torch.floor(x)
    ratio = torch.where(x == xi, torch.ones_like(x), x - xi)  # prefer the pixel left of x
    c = _coeffs(ratio, scale, mode, nearest_mode, a, antialias)
    n = c.shape[1]
    pad = -(-n // 2)
    xp = x + pad
    p = torch.floor(xp)
    frac = xp - p
    if n % 2 == 0:
        offset = torch.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = torch.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    idx = (p + offset).long().unsqueeze(1) + torch.arange(n) - pad
    if exclude_outside:
        c = torch.where((idx < 0) | (idx >= in_w), torch.zeros_like(c), c)
        total = c.sum(1, keepdim=True)
        c = c / torch.where(total == 0, torch.ones_like(total), total)
    w = torch.zeros(out_w, in_w, dtype=torch.float64).scatter_add_(1, idx.clamp(0, in_w - 1), c)
    return w, extrap


def _resize_geometry(x, roi, scales, sizes, axes, policy):
    """(resized axes, output size per axis, scale per axis, roi (start, end) per axis or None)."""
    rank = x.dim()
    ax = [norm_axis(a, rank) for a in axes] if axes is not None else list(range(rank))
    if sizes is not None and sizes.numel():
        req = ints(sizes)
        sc = [req[i] / x.shape[a] for i, a in enumerate(ax)]
        if policy in ("not_larger", "not_smaller"):
            one = min(sc) if policy == "not_larger" else max(sc)
            sc = [one] * len(ax)
            out = [int(one * x.shape[a] + 0.5) for a in ax]
        else:
            out = req
    else:
        sc = [float(v) for v in scales.reshape(-1).tolist()]
        out = [int(sc[i] * x.shape[a]) for i, a in enumerate(ax)]
    rois = None
    if roi is not None and roi.numel():
        rv = [float(v) for v in roi.reshape(-1).tolist()]
        k = len(rv) // 2
        rois = [(rv[i], rv[k + i]) for i in range(k)]
        if axes is None and k == rank:
            rois = [rois[a] for a in ax]
    return ax, out, sc, rois


def _contract(y, axis, w):
    """``y`` with axis ``axis`` replaced by ``w @ y`` along it."""
    return torch.movedim(torch.tensordot(y, w.to(y.dtype), dims=([axis], [1])), -1, axis)


def _resize(x, roi, scales, sizes, *, mode="nearest", coordinate_transformation_mode="half_pixel",
            nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0,
            antialias=0, axes=None, keep_aspect_ratio_policy="stretch"):
    ctm = coordinate_transformation_mode
    ax, out, sc, rois = _resize_geometry(x, roi, scales, sizes, axes, keep_aspect_ratio_policy)
    moved = [(a, o, s, rois[i] if rois else (0.0, 1.0)) for i, (a, o, s) in enumerate(zip(ax, out, sc))
             if not (o == x.shape[a] and math.isclose(s, 1.0) and
                     (rois is None or (math.isclose(rois[i][0], 0.0) and math.isclose(rois[i][1], 1.0))))]
    if not moved:
        return x
    spatial = [a for a, *_ in moved]
    fast = (mode in ("linear", "cubic") and not antialias and x.is_floating_point() and
            spatial == list(range(2, x.dim())) and ctm in ("half_pixel", "align_corners", "pytorch_half_pixel") and
            all(o > 1 for _, o, _, _ in moved) and
            (mode == "linear" and 3 <= x.dim() <= 5 or
             mode == "cubic" and x.dim() == 4 and cubic_coeff_a == -0.75 and not exclude_outside))
    if fast:
        interp = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()] if mode == "linear" else "bicubic"
        exact = all(math.isclose(o, s * x.shape[a]) for a, o, s, _ in moved)  # out == scale*in
        if exact:
            return F.interpolate(x, size=[o for _, o, _, _ in moved], mode=interp,
                                 align_corners=ctm == "align_corners")
        if ctm != "align_corners":  # align_corners maps with the fractional scale*in: the general path
            return F.interpolate(x, scale_factor=[s for *_, s, _ in moved], mode=interp, align_corners=False,
                                 recompute_scale_factor=False)
    integer = not x.is_floating_point()
    # integers in float64 (exact, then rounded as onnx.reference rounds); 16-bit floats in float32
    y = x.to(torch.float64) if integer else x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    for a, o, s, r in moved:
        w, extrap = _axis_weights(x.shape[a], o, s, mode, ctm, r, nearest_mode, cubic_coeff_a, exclude_outside,
                                  antialias)
        w = w.to(y.device)
        if mode == "nearest":
            y = y.index_select(a, w.argmax(1))  # one-hot rows: the selected neighbour
        else:
            y = _contract(y, a, w)
        if extrap is not None and bool(extrap.any()):
            shape = [1] * y.dim()
            shape[a] = o
            y = torch.where(extrap.to(y.device).reshape(shape), torch.full_like(y, extrapolation_value), y)
    if integer:
        info = torch.iinfo(x.dtype)
        return torch.round(y).clamp(info.min, info.max).to(x.dtype)
    return y.to(x.dtype)


@onnx_op("Resize", since=10)
def Resize_10(x, scales, *, mode="nearest"):
    return _resize(x, None, scales, None, mode=mode, coordinate_transformation_mode="asymmetric",
                   nearest_mode="floor")


@onnx_op("Resize", since=11)
def Resize(x, roi=None, scales=None, sizes=None, *, mode="nearest", coordinate_transformation_mode="half_pixel",
           nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0,
           antialias=0, axes=None, keep_aspect_ratio_policy="stretch"):
    """ONNX Resize-19 (and the earlier versions, whose attributes are a subset): see ``_resize``."""
    return _resize(x, roi, scales, sizes, mode=mode, coordinate_transformation_mode=coordinate_transformation_mode,
                   nearest_mode=nearest_mode, cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside,
                   extrapolation_value=extrapolation_value, antialias=antialias, axes=axes,
                   keep_aspect_ratio_policy=keep_aspect_ratio_policy)


@onnx_op("Upsample", since=7)
def Upsample_7(x, *, mode="nearest", scales):
    return _resize(x, None, torch.tensor(scales, dtype=torch.float32), None, mode=mode,
                   coordinate_transformation_mode="asymmetric", nearest_mode="floor")


@onnx_op("Upsample", since=9)
def Upsample(x, scales=None, *, mode="nearest"):
    return _resize(x, None, scales, None, mode=mode, coordinate_transformation_mode="asymmetric",
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
def SpaceToDepth(x, *, blocksize, mode="DCR"):
    """Blocks of ``blocksize``² pixels into channels: DCR puts the block offset outermost
    (``(by*b + bx)*C + c``), CRD innermost (``c*b*b + by*b + bx``)."""
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, c, h // b, b, w // b, b)
    y = y.permute(0, 3, 5, 1, 2, 4) if mode == "DCR" else y.permute(0, 1, 3, 5, 2, 4)
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


def _q_param(t, x, axis, block_size):
    """A scale / zero point shaped to broadcast against ``x``: one element (per tensor), a vector along
    ``axis`` (per axis), or with ``block_size`` a tensor of ``x``'s rank whose ``axis`` is repeated
    ``block_size`` times (blocked, ONNX QuantizeLinear-21)."""
    if block_size:
        a = norm_axis(axis, x.dim())
        return t.repeat_interleave(block_size, dim=a).narrow(a, 0, x.shape[a])
    return _per_axis(t, x, axis)


@onnx_op("QuantizeLinear", since=10)
def QuantizeLinear(x, scale, zero_point=None, *, axis=1, saturate=1, block_size=0, output_dtype=0, precision=0):
    """ONNX QuantizeLinear-23: integers ``clamp(round_half_even(x / scale) + zero_point)``; float8
    ``x / scale`` cast with ``saturate`` (the zero point is 0). The output type is the zero point's, else
    ``output_dtype``, else uint8; ``precision`` is the type the division runs in."""
    dtype = zero_point.dtype if zero_point is not None else ONNX_DTYPES[output_dtype] if output_dtype \
        else torch.uint8
    s = _q_param(scale, x, axis, block_size)
    v = x.to(ONNX_DTYPES[precision]) / s.to(ONNX_DTYPES[precision]) if precision else x / s
    if dtype.is_floating_point:
        return cast_to(v, dtype, saturate)
    lo, hi = _QRANGE[dtype]
    q = torch.round(v).to(torch.int64)
    if zero_point is not None:
        q = q + _q_param(zero_point, x, axis, block_size).to(torch.int64)
    return torch.clamp(q, lo, hi).to(dtype)


@onnx_op("DequantizeLinear", since=10)
def DequantizeLinear(x, scale, zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    """ONNX DequantizeLinear-23: ``(x - zero_point) * scale`` in float32, returned in ``output_dtype`` or the
    scale's type (a float8 ``x`` has no zero point)."""
    xf = x.to(torch.float32)
    if zero_point is not None and not x.dtype.is_floating_point:
        xf = xf - _q_param(zero_point, x, axis, block_size).to(torch.float32)
    y = xf * _q_param(scale, x, axis, block_size).to(torch.float32)
    return y.to(ONNX_DTYPES[output_dtype] if output_dtype else scale.dtype)


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


# --------------------------------------------------------------------------- losses
def _nll(logp, target, weight, ignore_index, reduction):
    """``-logp[n, target[n, ...], ...]`` (0 where ``target == ignore_index``), times ``weight[target]``;
    ``mean`` divides by the summed weights of the counted elements (ONNX NegativeLogLikelihoodLoss-22)."""
    t = target.to(torch.int64)
    ignored = t == ignore_index if ignore_index is not None else torch.zeros_like(t, dtype=torch.bool)
    safe = torch.where(ignored, torch.zeros_like(t), t).clamp(0, logp.shape[1] - 1)
    loss = -torch.gather(logp, 1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(ignored, torch.zeros_like(loss), loss)
    w = None
    if weight is not None:
        w = torch.where(ignored, torch.zeros((), dtype=weight.dtype, device=weight.device), weight[safe])
    elif ignore_index is not None:
        w = (~ignored).to(logp.dtype)
    if w is not None:
        loss = loss * w
        if reduction == "mean":
            return loss.sum() / w.sum()
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


@onnx_op("NegativeLogLikelihoodLoss", since=12)
def NegativeLogLikelihoodLoss(x, target, weight=None, *, ignore_index=None, reduction="mean"):
    """x: [N, C, d...] log-probabilities; target: int [N, d...]; weight: [C]. See ``_nll``."""
    return _nll(x, target, weight, ignore_index, reduction).to(x.dtype)


@onnx_op("SoftmaxCrossEntropyLoss", since=12)
def SoftmaxCrossEntropyLoss(scores, labels, weights=None, *, ignore_index=None, reduction="mean", _outputs=1):
    """ONNX SoftmaxCrossEntropyLoss-13: ``_nll(log_softmax(scores, axis=1), labels, ...)``; the second
    output is the log-probabilities."""
    logp = torch.log_softmax(scores, 1)
    loss = _nll(logp, labels, weights, ignore_index, reduction).to(scores.dtype)
    return (loss, logp) if _outputs > 1 else loss


# --------------------------------------------------------------------------- integer (quantized) compute
# Integer products and sums are computed in float64, exact for 8- and 16-bit operands (every partial sum
# stays far below 2^53), then rounded back: torch has no integer convolution and no CPU int8 GEMM.
def _centered(t, zero_point, axis_shape=None):
    t = t.to(torch.float64)
    if zero_point is None:
        return t
    zp = zero_point.to(torch.float64)
    if axis_shape is not None and zp.numel() > 1:
        zp = zp.reshape(axis_shape)
    return t - zp


@onnx_op("MatMulInteger", since=10)
def MatMulInteger(a, b, a_zero_point=None, b_zero_point=None):
    """ONNX MatMulInteger-10: ``(a - a_zp) @ (b - b_zp)`` as int32 (a per-row a_zp / per-column b_zp broadcast)."""
    za = a_zero_point.reshape(-1, 1) if a_zero_point is not None and a_zero_point.numel() > 1 else a_zero_point
    return torch.matmul(_centered(a, za), _centered(b, b_zero_point)).round().to(torch.int32)


@onnx_op("ConvInteger", since=10)
def ConvInteger(x, w, x_zero_point=None, w_zero_point=None, **attrs):
    """ONNX ConvInteger-10: Conv of ``x - x_zp`` and ``w - w_zp`` (per output channel when a vector), int32."""
    wc = _centered(w, w_zero_point, (-1,) + (1,) * (w.dim() - 1))
    return Conv(_centered(x, x_zero_point), wc, **attrs).round().to(torch.int32)


def _requantize(acc, multiplier, y_zero_point, default_dtype):
    """``clamp(round_half_even(acc * multiplier) + y_zp)`` in the zero point's type (``default_dtype`` without)."""
    y = acc * multiplier.to(torch.float64)
    dtype = y_zero_point.dtype if y_zero_point is not None else default_dtype
    if y_zero_point is not None:
        y = y + y_zero_point.to(torch.float64)
    lo, hi = _QRANGE[dtype]
    return torch.clamp(torch.round(y), lo, hi).to(dtype)


@onnx_op("QLinearMatMul", since=10)
def QLinearMatMul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    """ONNX QLinearMatMul-21: ``requantize((a - a_zp) @ (b - b_zp), a_scale*b_scale/y_scale, y_zp)``, the
    multiplier computed in the scales' type as ``onnx.reference`` does."""
    acc = torch.matmul(_centered(a, a_zero_point), _centered(b, b_zero_point))
    return _requantize(acc, a_scale * b_scale / y_scale, y_zero_point, a.dtype)


@onnx_op("QLinearConv", since=10)
def QLinearConv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, b=None, **attrs):
    """ONNX QLinearConv-10: ``requantize(Conv(x - x_zp, w - w_zp) + b, x_scale*w_scale/y_scale, y_zp)``;
    ``w_scale`` / ``w_zp`` may be per output channel."""
    per_out = (-1,) + (1,) * (w.dim() - 1)
    acc = Conv(_centered(x, x_zero_point), _centered(w, w_zero_point, per_out),
               b.to(torch.float64) if b is not None else None, **attrs)
    mult = x_scale * w_scale / y_scale
    if mult.numel() > 1:
        mult = mult.reshape(1, -1, *([1] * (x.dim() - 2)))
    return _requantize(acc, mult, y_zero_point, x.dtype)


@onnx_op("DynamicQuantizeLinear", since=11)
def DynamicQuantizeLinear(x, *, _outputs=3):
    """ONNX DynamicQuantizeLinear-11: uint8 with ``scale = (max(x, 0) - min(x, 0)) / 255`` (1/255 when the
    range is empty), ``zp = round(clamp(-min/scale, 0, 255))``; returns (y, scale, zp)."""
    mx = torch.clamp(x.max(), min=0).to(torch.float32)
    mn = torch.clamp(x.min(), max=0).to(torch.float32)
    scale = torch.where(mx == mn, torch.ones_like(mx), mx - mn) / 255.0
    zp = torch.round(torch.clamp(0.0 - mn / scale, 0, 255))
    y = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return y.to(torch.uint8), scale.to(x.dtype), zp.to(torch.uint8)
