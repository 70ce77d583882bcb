"""More ONNX tensor ops as torch functions (conventions: :mod:`graft.ir.torch_ops`): selection
(Compress, ReverseSequence, Unique, CenterCropPad), scatter variants (Scatter, TensorScatter,
MaxUnpool, Col2Im), construction (EyeLike), CumProd, Det and BitCast."""
from __future__ import annotations

import math

import torch

from graft.ir.torch_ops import (ONNX_DTYPES, ScatterElements, ints, item, norm_axis, onnx_op, refuses,
                                type_name)


@onnx_op("CumProd", since=26)
def CumProd(x, axis, *, exclusive=0, reverse=0):
    """Cumulative product along ``axis`` (ONNX CumProd-26); ``exclusive`` starts from 1, ``reverse`` runs
    from the end."""
    a = norm_axis(int(item(axis)), x.dim())
    if reverse:
        x = x.flip(a)
    if exclusive:
        ones = torch.ones_like(x.narrow(a, 0, 1))
        x = torch.cat([ones, x.narrow(a, 0, x.shape[a] - 1)], a)
    y = torch.cumprod(x, a, dtype=x.dtype)
    return y.flip(a) if reverse else y


@onnx_op("EyeLike", since=9)
def EyeLike(x, *, dtype=None, k=0):
    """Ones on diagonal ``k`` of a matrix shaped like 2-D ``x``, in ``dtype`` (default x's)."""
    n, m = x.shape
    i = torch.arange(n, device=x.device).unsqueeze(1)
    j = torch.arange(m, device=x.device).unsqueeze(0)
    return (j - i == k).to(ONNX_DTYPES[dtype] if dtype is not None else x.dtype)


@onnx_op("Compress", since=9)
def Compress(x, condition, *, axis=None):
    """The slices along ``axis`` (elements of the flattened ``x`` without it) where ``condition`` is true;
    slices past the condition's length are dropped."""
    if axis is None:
        x, axis = x.reshape(-1), 0
    axis = norm_axis(axis, x.dim())
    cond = condition.reshape(-1).to(torch.bool)[:x.shape[axis]]
    return x.index_select(axis, torch.nonzero(cond).reshape(-1))


@onnx_op("ReverseSequence", since=10)
def ReverseSequence(x, sequence_lens, *, batch_axis=1, time_axis=0):
    """Each batch entry's first ``sequence_lens[b]`` steps along ``time_axis`` reversed, the rest kept."""
    t_len = x.shape[time_axis]
    shape = [1] * x.dim()
    shape[time_axis] = t_len
    t = torch.arange(t_len, device=x.device).reshape(shape)
    lshape = [1] * x.dim()
    lshape[batch_axis] = x.shape[batch_axis]
    lens = sequence_lens.to(torch.int64).reshape(lshape)
    idx = torch.where(t < lens, lens - 1 - t, t).expand(x.shape)
    return torch.gather(x, time_axis, idx)


@onnx_op("Scatter", since=9)
def Scatter(x, indices, updates, *, axis=0):
    """ONNX Scatter-9/11 (deprecated): ScatterElements without reduction."""
    return ScatterElements(x, indices, updates, axis=axis)


@onnx_op("TensorScatter", since=24)
def TensorScatter(past, update, write_indices=None, *, axis=-2, mode="linear"):
    """ONNX TensorScatter-24: ``update`` written into ``past`` along ``axis`` from position
    ``write_indices[b]`` (default 0) of each batch entry (axis 0); ``circular`` wraps around."""
    axis = norm_axis(axis, past.dim())  # >= 1: axis 0 is the batch
    length, steps = past.shape[axis], update.shape[axis]
    start = write_indices.to(torch.int64) if write_indices is not None else \
        torch.zeros(past.shape[0], dtype=torch.int64, device=past.device)
    pos = start.reshape(-1, *([1] * (axis - 1)), 1) + torch.arange(steps, device=past.device)  # [B, 1.., S]
    if mode == "circular":
        pos = pos % length
    pos = pos.reshape(*pos.shape, *([1] * (past.dim() - axis - 1))).expand(update.shape)
    return past.scatter(axis, pos, update)


@refuses("BitCast")
def _bitcast_check(attrs, n_outputs, in_types, opset, in_ranks):
    to = int(attrs.get("to", 0))
    if to not in ONNX_DTYPES:
        return f"attribute to={type_name(to)} ({to}): torch has no such tensor type"
    return None


@onnx_op("BitCast", since=26)
def BitCast(x, *, to):
    """The bits of ``x`` read as type ``to`` of the same width (ONNX BitCast-26)."""
    return x.view(ONNX_DTYPES[int(to)])


@onnx_op("CenterCropPad", since=18)
def CenterCropPad(x, shape, *, axes=None):
    """Crop or zero-pad ``axes`` (default all) to ``shape``, centred; an odd difference puts the extra
    element at the end (ONNX CenterCropPad-18)."""
    target = ints(shape)
    axes = [norm_axis(a, x.dim()) for a in axes] if axes is not None else list(range(x.dim()))
    for a, size in zip(axes, target):
        dim = x.shape[a]
        if size < dim:
            x = x.narrow(a, (dim - size) // 2, size)
        elif size > dim:
            before = (size - dim) // 2
            pad_shape = list(x.shape)
            pad_shape[a] = before
            after_shape = list(x.shape)
            after_shape[a] = size - dim - before
            x = torch.cat([x.new_zeros(pad_shape), x, x.new_zeros(after_shape)], a)
    return x


@onnx_op("Det", since=11)
def Det(x):
    """Determinant of each [..., M, M] matrix."""
    return torch.linalg.det(x)


@onnx_op("Unique", since=11)
def Unique(x, *, axis=None, sorted=1, _outputs=1):
    """ONNX Unique-11: the distinct elements (or slices along ``axis``), ascending when ``sorted`` else in
    order of first occurrence; also the index of each one's first occurrence, the inverse indices and
    the counts (int64)."""
    data = x.reshape(-1) if axis is None else x
    dim = 0 if axis is None else norm_axis(axis, x.dim())
    y, inverse, counts = torch.unique(data, sorted=True, return_inverse=True, return_counts=True, dim=dim)
    n = data.shape[dim]
    first = torch.full((y.shape[dim],), n, dtype=torch.int64, device=x.device)
    first = first.scatter_reduce(0, inverse.reshape(-1), torch.arange(n, device=x.device), "amin")
    if not sorted:
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=x.device)
        y, first, counts, inverse = y.index_select(dim, order), first[order], counts[order], rank[inverse]
    out = (y, first, inverse.reshape(-1), counts)
    return out[:_outputs] if _outputs > 1 else y


@onnx_op("MaxUnpool", since=9)
def MaxUnpool(x, indices, output_shape=None, *, kernel_shape, pads=None, strides=None):
    """ONNX MaxUnpool-11: zeros of the unpooled shape (``(in - 1)*stride + kernel - pads`` per axis) with
    ``x`` written at the flat ``indices`` MaxPool returned; a larger ``output_shape`` pads with zeros at
    the end of each axis (as ``onnx.reference`` does)."""
    n = len(kernel_shape)
    strides = strides or [1] * n
    pads = pads or [0] * (2 * n)
    shape = list(x.shape[:2]) + [(x.shape[2 + i] - 1) * strides[i] + kernel_shape[i] - pads[i] - pads[n + i]
                                 for i in range(n)]
    out = x.new_zeros(math.prod(shape))
    out = out.scatter(0, indices.reshape(-1).to(torch.int64), x.reshape(-1)).reshape(shape)
    if output_shape is not None:
        want = ints(output_shape)
        grow = []
        for i in reversed(range(len(shape))):
            grow += [0, want[i] - shape[i]]
        out = torch.nn.functional.pad(out, grow)
    return out


@onnx_op("Col2Im", since=18)
def Col2Im(x, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    """ONNX Col2Im-18 (the inverse of im2col, N-D): x [N, C*prod(block), L] columns summed back into an
    image [N, C, *image_shape]; ``pads`` are cropped from the result."""
    image, block = ints(image_shape), ints(block_shape)
    n = len(image)
    dilations = dilations or [1] * n
    strides = strides or [1] * n
    pads = pads or [0] * (2 * n)
    padded = [image[i] + pads[i] + pads[n + i] for i in range(n)]
    counts = [(padded[i] - (dilations[i] * (block[i] - 1) + 1)) // strides[i] + 1 for i in range(n)]
    batch, cols, _ = x.shape
    c = cols // math.prod(block)
    cols = x.reshape(batch, c, math.prod(block), math.prod(counts))
    # flat position in the padded image of (block offset k, window l): per axis, the window's start
    # (l's coordinate * stride) plus the offset's coordinate * dilation; k and l are row-major over axes
    dev = x.device
    pos = torch.zeros(1, 1, dtype=torch.int64, device=dev)
    for i in range(n):
        along = torch.arange(block[i], device=dev).reshape(-1, 1) * dilations[i] + \
            torch.arange(counts[i], device=dev).reshape(1, -1) * strides[i]  # [block_i, counts_i]
        pos = (pos.reshape(pos.shape[0], 1, pos.shape[1], 1) * padded[i] + along.reshape(1, block[i], 1, counts[i]))
        pos = pos.reshape(pos.shape[0] * block[i], pos.shape[2] * counts[i])
    out = x.new_zeros(batch, c, math.prod(padded))
    out = out.index_add(2, pos.reshape(-1), cols.reshape(batch, c, -1))
    out = out.reshape(batch, c, *padded)
    for i in range(n):
        out = out.narrow(2 + i, pads[i], image[i])
    return out
