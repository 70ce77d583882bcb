"""Lower ATen shape, indexing and symbolic-size ops to ONNX (opset 18).

- ``view``/``reshape``: Reshape (torch never means "copy this dim" by 0, so a static 0 sets
  ``allowzero=1``); ``flatten(x, s, e)``: Reshape to ``[0]*s + [-1] + x.shape[e+1:]`` (0 copies
  the input dim in ONNX Reshape).
- ``permute``/``transpose``/``t``: Transpose; ``expand(x, size)``: Expand with -1 → 1 (ONNX
  Expand broadcasts, so 1 keeps the input's dim); ``repeat``: Tile (after Unsqueeze when
  ``repeats`` is longer than the rank).
- ``squeeze``: Squeeze of the dims the captured shapes show were squeezed (torch skips non-1 dims,
  ONNX would fail); ``unsqueeze``: Unsqueeze.
- ``cat``: Concat; ``stack``: Unsqueeze + Concat; ``split``/``split_with_sizes``/``chunk``: Split
  with the captured sizes of each piece; ``unbind``: Split + Squeeze.
- ``slice(x, d, start, end, step)``: Slice (``None`` bounds are 0 / INT64_MAX);
  ``select(x, d, i)``: Gather with a 0-d index (drops dim d); ``index_select``: Gather;
  ``gather``: GatherElements; ``index(x, [i0, i1, ...])`` (advanced indexing, integer indices):
  one index → Gather; several → broadcast, stack on a new last axis, GatherND, with the
  broadcast dims placed where torch puts them (first, or at the first indexed dim when the
  indexed dims are adjacent — NumPy's advanced-indexing rule).
- ``sym_size(x, d)``: Gather(Shape(x), d), a 0-d int64; ``sym_numel``: Size.
- ``constant_pad_nd(x, pad, v)``: Pad (torch lists pads last axis first);
  ``upsample_nearest*``: Resize(nearest, asymmetric, floor) = torch's "nearest";
  ``upsample_bilinear2d``: Resize(linear, align_corners or pytorch_half_pixel);
  ``pixel_shuffle``: DepthToSpace(CRD).
- ``unflatten(x, d, sizes)``: Reshape to ``x.shape[:d] + sizes + x.shape[d+1:]``; ``flip``: Slice with
  step -1; ``expand_as(x, y)``: Expand(x, Shape(y)).
- in-place writes, functionalized: ``select_scatter(x, src, d, i)`` = Where(one-hot mask of i along d,
  Unsqueeze(src, d), x); ``slice_scatter(x, src, d, start, end, step)`` = Where(mask of the slice,
  Gather(src, idx, d), x), idx[p] = the src row written at position p (static dim d).
- ``split``/``chunk`` along a run-time dim D: pieces of s = split_size (chunk: ceil(D / chunks)) and
  a last one of D - s*(n-1), the count n fixed at capture.
"""
from __future__ import annotations

import numpy as np

from graft.ir import DataType, Value
from graft.rules.lower_aten_nn import passthrough
from graft.rules.lower_aten_util import (INT64_MAX, axis, cast, const, ints, lowering, one_d, out_dtype, permuted, rank,
                                   refuse, scalar, static_dim)


def view(op, a, n):
    """view/reshape(x, size) -> Reshape."""
    x, size = a["self"], a.get("size", a.get("shape"))
    if isinstance(size, Value):
        return op.Reshape(x, size)
    if 0 in size:
        if -1 in size:
            refuse("a zero-size dim together with -1")
        return op.Reshape(x, ints(op, size), allowzero=1)
    return op.Reshape(x, ints(op, size))


def flatten(op, a, n):
    """flatten(x, start_dim, end_dim) -> Reshape."""
    x = a["self"]
    r = rank(x)
    if r == 0:
        return op.Reshape(x, ints(op, [1]))
    s, e = axis(a["start_dim"], r), axis(a["end_dim"], r)
    if s == e:
        return passthrough(op, x, n)
    tail = list(x.shape[e + 1:])
    if all(isinstance(d, int) for d in tail):
        return op.Reshape(x, ints(op, [0] * s + [-1] + tail))
    return op.Reshape(x, op.Concat(ints(op, [0] * s + [-1]), op.Shape(x, start=e + 1), axis=0))


def unflatten(op, a, n):
    """unflatten(x, dim, sizes) -> Reshape to ``x.shape[:dim] + sizes + x.shape[dim+1:]``."""
    x, sizes = a["self"], a["sizes"]
    r = rank(x)
    d = axis(a["dim"], r)
    out = n.outputs[0].shape
    if out is not None and all(isinstance(s, int) for s in out):
        return op.Reshape(x, ints(op, list(out)), allowzero=int(0 in out))
    parts = [op.Shape(x, start=0, end=d)] if d > 0 else []
    parts.append(sizes if isinstance(sizes, Value) else ints(op, sizes))
    if d + 1 < r:
        parts.append(op.Shape(x, start=d + 1))
    return op.Reshape(x, op.Concat(*parts, axis=0) if len(parts) > 1 else parts[0])


def permute(op, a, n):
    """permute(x, dims) -> Transpose."""
    x = a["self"]
    r = rank(x)
    return permuted(op, x, [axis(d, r) for d in a["dims"]])


def transpose(op, a, n):
    """transpose(x, d0, d1) / t(x) -> Transpose."""
    x = a["self"]
    r = rank(x)
    if r < 2:
        return passthrough(op, x, n)
    d0, d1 = (axis(a["dim0"], r), axis(a["dim1"], r)) if "dim0" in a else \
        (r - 2, r - 1) if n.op_type.startswith("mT") else (0, 1)
    perm = list(range(r))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return permuted(op, x, perm)


def expand(op, a, n):
    """expand(x, size) -> Expand (-1 → 1, broadcasting keeps x's dim)."""
    x, size = a["self"], a["size"]
    if isinstance(size, Value):
        one = const(op, np.array(1), DataType.INT64)
        size = op.Where(op.Less(size, const(op, np.array(0), DataType.INT64)), one, size)
        return op.Expand(x, size)
    return op.Expand(x, ints(op, [1 if s == -1 else s for s in size]))


def repeat(op, a, n):
    """repeat(x, repeats) -> Tile."""
    x, reps = a["self"], a["repeats"]
    if isinstance(reps, Value):
        refuse("repeats known only at run time")
    extra = len(reps) - rank(x)
    if extra > 0:
        x = op.Unsqueeze(x, ints(op, list(range(extra))))
    return op.Tile(x, ints(op, reps))


def squeeze(op, a, n):
    """squeeze(x[, dims]) -> Squeeze of the dims that were squeezed."""
    x = a["self"]
    r, r_out = rank(x), rank(n.outputs[0])
    if r == r_out:
        return passthrough(op, x, n)
    dims = a.get("dim")
    if dims is None:
        dims = list(range(r))
    elif isinstance(dims, int):
        dims = [dims]
    dims = sorted({axis(d, r) for d in dims})
    if len(dims) != r - r_out:
        dims = [d for d in dims if x.shape[d] == 1]
    if len(dims) != r - r_out:
        refuse("cannot tell which dims were squeezed")
    return op.Squeeze(x, ints(op, dims))


def unsqueeze(op, a, n):
    """unsqueeze(x, d) -> Unsqueeze."""
    x = a["self"]
    return op.Unsqueeze(x, ints(op, [axis(a["dim"], rank(x) + 1)]))


def cat(op, a, n):
    """cat(tensors, dim) -> Concat (legacy empty 1-D inputs dropped)."""
    dt = out_dtype(n)
    r = rank(n.outputs[0])
    ts = [cast(op, t, dt) for t in a["tensors"] if not (t.shape == (0,) and r != 1)]
    return op.Concat(*ts, axis=axis(a["dim"], r))


def stack(op, a, n):
    """stack(tensors, dim) -> Unsqueeze each + Concat."""
    dt = out_dtype(n)
    d = axis(a["dim"], rank(n.outputs[0]))
    return op.Concat(*[op.Unsqueeze(cast(op, t, dt), ints(op, [d])) for t in a["tensors"]], axis=d)


def split(op, a, n):
    """split/split_with_sizes/chunk/unbind -> Split with the captured piece sizes."""
    x = a["self"]
    r = rank(x)
    d = axis(a.get("dim", 0), r)
    unbind = n.op_type.startswith("unbind")
    sizes = [1] * len(n.outputs) if unbind else []
    if not unbind:
        for o in n.outputs:
            if o.shape is None or not isinstance(o.shape[d], int):
                sizes = None  # a piece size depends on a run-time dim
                break
            sizes.append(o.shape[d])
    count = len(n.outputs)
    pieces = op.Split(x, ints(op, sizes) if sizes is not None else _runtime_split(op, a, n, x, d, count),
                      axis=d, _outputs=count)
    pieces = pieces if isinstance(pieces, tuple) else (pieces,)
    if unbind:
        pieces = tuple(op.Squeeze(p, ints(op, [d])) for p in pieces)
    return pieces


def _runtime_split(op, a, n, x, d: int, count: int):
    """Split sizes when the split dim is known only at run time: ``split_with_sizes``' own list, else
    ``count - 1`` pieces of the split size s and the rest, s = split_size (``split``) or
    ceil(D / chunks) (``chunk``)."""
    if "split_sizes" in a:
        got = a["split_sizes"]
        return got if isinstance(got, Value) else refuse("piece sizes known only at run time")
    dim = op.Gather(op.Shape(x), const(op, np.array(d), DataType.INT64), axis=0)
    if "chunks" in a:
        c = const(op, np.array(a["chunks"]), DataType.INT64)
        size = op.Div(op.Add(dim, op.Sub(c, const(op, np.array(1), DataType.INT64))), c)
    else:
        size = scalar(op, a["split_size"])
    if count == 1:
        return op.Unsqueeze(dim, ints(op, [0]))
    first = op.Expand(op.Unsqueeze(size, ints(op, [0])), ints(op, [count - 1]))
    rest = op.Sub(dim, op.Mul(size, const(op, np.array(count - 1), DataType.INT64)))
    return op.Concat(first, op.Unsqueeze(rest, ints(op, [0])), axis=0)


def slice_(op, a, n):
    """slice(x, dim, start, end, step) -> Slice."""
    x = a["self"]
    start = a["start"] if a["start"] is not None else 0
    end = a["end"] if a["end"] is not None else INT64_MAX
    step = a["step"] if a["step"] is not None else 1
    if isinstance(step, Value):
        refuse("slice step known only at run time")
    if start == 0 and isinstance(end, int) and end >= INT64_MAX and step == 1:
        return passthrough(op, x, n)
    return op.Slice(x, one_d(op, start), one_d(op, end), ints(op, [a["dim"]]), ints(op, [step]))


def select(op, a, n):
    """select(x, dim, index) -> Gather with a 0-d index."""
    return op.Gather(a["self"], scalar(op, a["index"]), axis=a["dim"])


def index_select(op, a, n):
    """index_select(x, dim, index) -> Gather."""
    return op.Gather(a["self"], cast(op, a["index"], DataType.INT64), axis=a["dim"])


def gather(op, a, n):
    """gather(x, dim, index) -> GatherElements."""
    return op.GatherElements(a["self"], cast(op, a["index"], DataType.INT64), axis=a["dim"])


def index(op, a, n):
    """index(x, [i0, None, i2, ...]) with integer index tensors -> Gather / GatherND."""
    x, idx = a["self"], a["indices"]
    pos = [i for i, t in enumerate(idx) if t is not None]
    if any(idx[i].dtype in (DataType.BOOL, DataType.UINT8) for i in pos):
        refuse("boolean-mask indexing (data-dependent output shape)")
    if len(pos) == 1:
        return op.Gather(x, cast(op, idx[pos[0]], DataType.INT64), axis=pos[0])
    r = rank(x)
    ins = [cast(op, idx[i], DataType.INT64) for i in pos]
    total = ins[0]
    for t in ins[1:]:
        total = op.Add(total, t)  # the broadcast shape of all indices
    shape = op.Shape(total)
    stacked = op.Concat(*[op.Unsqueeze(op.Expand(t, shape), ints(op, [-1])) for t in ins], axis=-1)
    rest = [i for i in range(r) if i not in pos]
    if pos != list(range(len(pos))):
        x = op.Transpose(x, perm=pos + rest)
    y = op.GatherND(x, stacked)
    adjacent = pos == list(range(pos[0], pos[0] + len(pos)))
    if adjacent and pos[0] > 0:
        b = max(rank(idx[i]) for i in pos)  # broadcast rank
        lead = pos[0]
        perm = list(range(b, b + lead)) + list(range(b)) + list(range(b + lead, b + len(rest)))
        y = op.Transpose(y, perm=perm)
    return y


def sym_size(op, a, n):
    """sym_size(x, d) -> Gather(Shape(x), d): a 0-d int64."""
    return op.Gather(op.Shape(a["self"]), const(op, np.array(a["dim"]), DataType.INT64), axis=0)


def sym_numel(op, a, n):
    """sym_numel(x) -> Size(x)."""
    return op.Size(a["self"])


def _onnx_pads(op, x, pad):
    """torch's pad list (last dim first: ``[l_last, r_last, l_prev, r_prev, ...]``) as ONNX Pad's
    ``pads`` input (int64, ``[x1_begin, ..., xr_begin, x1_end, ..., xr_end]``, ONNX Pad-18)."""
    if isinstance(pad, Value):
        refuse("pads known only at run time")
    r = rank(x)
    begins, ends = [0] * r, [0] * r
    for i in range(len(pad) // 2):
        begins[r - 1 - i], ends[r - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return ints(op, begins + ends)


def constant_pad(op, a, n):
    """constant_pad_nd(x, pad, value) -> Pad(constant)."""
    x = a["self"]
    pads = _onnx_pads(op, x, a["pad"])
    value = const(op, np.array(a.get("value") or 0), x.dtype)
    return op.Pad(x, pads, value, mode="constant")


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad(op, a, n):
    """pad(x, pad, mode, value) -> Pad (constant / reflect / edge / wrap)."""
    mode = a.get("mode", "constant")
    if mode not in _PAD_MODES:
        refuse(f"pad mode {mode!r}")
    if mode == "constant":
        return constant_pad(op, a, n)
    x = a["self"]
    return op.Pad(x, _onnx_pads(op, x, a["pad"]), mode=_PAD_MODES[mode])


def upsample(op, a, n):
    """upsample_nearest*/upsample_bilinear2d(x, output_size, ...) -> Resize with the captured output size."""
    x = a["input"] if "input" in a else a["self"]
    out = n.outputs[0]
    if out.shape is None:
        refuse("output size unknown")
    if all(isinstance(d, int) for d in out.shape):
        sizes = ints(op, list(out.shape))
    else:
        k = len(out.shape) - 2
        osz, sf = a.get("output_size"), a.get("scale_factors")
        if isinstance(osz, list) and all(isinstance(d, int) for d in osz):
            sizes = op.Concat(op.Shape(x, start=0, end=2), ints(op, osz[-k:]), axis=0)
        elif isinstance(osz, Value):
            sizes = op.Concat(op.Shape(x, start=0, end=2), cast(op, osz, DataType.INT64), axis=0)
        elif isinstance(sf, list) and len(sf) == k:
            # out = floor(in * scale), source = dst / scale: torch's rule when scale_factor is given
            sizes = None
            scales = const(op, np.array([1.0, 1.0, *sf]), DataType.FLOAT)
        else:
            refuse("output size known only at run time")
    args = (x, None, None, sizes) if sizes is not None else (x, None, scales)
    if "nearest" in n.op_type:
        return op.Resize(*args, mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    ctm = "align_corners" if a.get("align_corners") else "pytorch_half_pixel"
    return op.Resize(*args, mode="linear", coordinate_transformation_mode=ctm)


def pixel_shuffle(op, a, n):
    """pixel_shuffle(x, r) -> DepthToSpace(blocksize=r, mode=CRD) (an unbatched [C, H, W] x as a batch of one)."""
    x = a["self"]
    if rank(x) == 3:
        zero = ints(op, [0])
        return op.Squeeze(op.DepthToSpace(op.Unsqueeze(x, zero), blocksize=a["upscale_factor"], mode="CRD"), zero)
    if rank(x) != 4:
        refuse("pixel_shuffle of a tensor with more than one batch dim")
    return op.DepthToSpace(x, blocksize=a["upscale_factor"], mode="CRD")


def _positions(d: int, start, end, step: int) -> list[int]:
    """The positions ``range(d)[start:end:step]`` (torch/Python slice semantics)."""
    if isinstance(start, Value) or isinstance(end, Value):
        refuse("slice bounds known only at run time")
    return list(range(d))[slice(start, end, step)]


def select_scatter(op, a, n):
    """select_scatter(x, src, dim, i) = Where(position == i along dim, Unsqueeze(src, dim), x)."""
    x, src = a["self"], a["src"]
    r = rank(x)
    d = axis(a["dim"], r)
    size = static_dim(x, d)
    i = a["index"]
    if isinstance(i, Value):
        refuse("index known only at run time")
    mask = np.zeros([size if j == d else 1 for j in range(r)], dtype=bool)
    mask.reshape(-1)[i % size] = True
    return op.Where(const(op, mask), op.Unsqueeze(cast(op, src, x.dtype), ints(op, [d])), x)


def slice_scatter(op, a, n):
    """slice_scatter(x, src, dim, start, end, step): x with ``x[..., start:end:step, ...] = src``, as
    Where(mask, Gather(src, idx, dim), x) where position p of the slice reads src[idx[p]]."""
    x, src = a["self"], a["src"]
    r = rank(x)
    d = axis(a["dim"], r)
    size = static_dim(x, d)
    step = a.get("step", 1) or 1
    if isinstance(step, Value):
        refuse("slice step known only at run time")
    pos = _positions(size, a.get("start"), a.get("end"), step)
    if not pos:
        return passthrough(op, x, n)
    idx = np.zeros(size, dtype=np.int64)
    mask = np.zeros([size if j == d else 1 for j in range(r)], dtype=bool)
    for j, p in enumerate(pos):
        idx[p] = j
        mask.reshape(-1)[p] = True
    if pos == list(range(size)):
        return passthrough(op, cast(op, src, x.dtype), n)
    return op.Where(const(op, mask), op.Gather(cast(op, src, x.dtype), const(op, idx), axis=d), x)


def flip(op, a, n):
    """flip(x, dims) -> Slice with step -1 on each dim."""
    x = a["self"]
    r = rank(x)
    dims = [axis(d, r) for d in a["dims"]]
    if not dims:
        return passthrough(op, x, n)
    k = len(dims)
    return op.Slice(x, ints(op, [-1] * k), ints(op, [-INT64_MAX] * k), ints(op, dims), ints(op, [-1] * k))


def expand_as(op, a, n):
    """expand_as(x, other) -> Expand(x, Shape(other))."""
    return op.Expand(a["self"], op.Shape(a["other"]))


RULES = [
    *lowering(["view.default", "reshape.default", "_unsafe_view.default"], view),
    *lowering("flatten.using_ints", flatten),
    *lowering("unflatten.int", unflatten),
    *lowering("permute.default", permute),
    *lowering(["transpose.int", "t.default", "mT.default"], transpose),
    *lowering("expand.default", expand),
    *lowering("repeat.default", repeat),
    *lowering(["squeeze.dim", "squeeze.dims", "squeeze.default"], squeeze),
    *lowering("unsqueeze.default", unsqueeze),
    *lowering("cat.default", cat),
    *lowering("stack.default", stack),
    *lowering(["split.Tensor", "split_with_sizes.default", "chunk.default", "unbind.int",
               "unsafe_split.Tensor"], split),
    *lowering("slice.Tensor", slice_),
    *lowering("select.int", select),
    *lowering("index_select.default", index_select),
    *lowering("gather.default", gather),
    *lowering("index.Tensor", index),
    *lowering("sym_size.int", sym_size),
    *lowering("sym_numel.default", sym_numel),
    *lowering("constant_pad_nd.default", constant_pad),
    *lowering("pad.default", pad),
    *lowering(["upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec",
               "upsample_nearest2d.default", "upsample_bilinear2d.vec", "upsample_bilinear2d.default"], upsample),
    *lowering("pixel_shuffle.default", pixel_shuffle),
    *lowering("select_scatter.default", select_scatter),
    *lowering("slice_scatter.default", slice_scatter),
    *lowering("flip.default", flip),
    *lowering("expand_as.default", expand_as),
]
