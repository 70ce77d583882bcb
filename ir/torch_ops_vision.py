"""ONNX detection and sampling ops as torch functions (conventions: :mod:`graft.ir.torch_ops`):
NonMaxSuppression, GridSample, AffineGrid, RoiAlign, DeformConv."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graft.ir.torch_ops import UnsupportedInTorchBackend, item, onnx_op, refuses


def _corners(boxes, center_point_box):
    """[..., 4] boxes as (xmin, ymin, xmax, ymax): ``[y1, x1, y2, x2]`` with the corners in either order,
    or ``[x_center, y_center, width, height]`` when ``center_point_box`` is 1."""
    if center_point_box:
        cx, cy, w, h = boxes.unbind(-1)
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    y1, x1, y2, x2 = boxes.unbind(-1)
    return torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2), torch.maximum(y1, y2)


def _suppression(boxes, center_point_box, iou_threshold):
    """[N, N] bool: box i suppresses box j (IoU > threshold; boxes without area suppress nothing)."""
    x0, y0, x1, y1 = _corners(boxes, center_point_box)
    iw = torch.minimum(x1[:, None], x1[None]) - torch.maximum(x0[:, None], x0[None])
    ih = torch.minimum(y1[:, None], y1[None]) - torch.maximum(y0[:, None], y0[None])
    inter = iw * ih
    area = (x1 - x0) * (y1 - y0)
    union = area[:, None] + area[None] - inter
    ok = (iw > 0) & (ih > 0) & (inter > 0) & (area[:, None] > 0) & (area[None] > 0) & (union > 0)
    return ok & (inter / torch.where(ok, union, torch.ones_like(union)) > iou_threshold)


@onnx_op("NonMaxSuppression", since=10)
def NonMaxSuppression(boxes, scores, max_output_boxes_per_class=None, iou_threshold=None, score_threshold=None, *,
                      center_point_box=0):
    """ONNX NonMaxSuppression-11: greedy per batch and class — boxes in descending score order (the lower
    index first on ties), kept unless a kept box overlaps them with IoU > ``iou_threshold``; only scores
    above ``score_threshold`` (when given) compete; at most ``max_output_boxes_per_class`` (default 0:
    none) per class.

    Args:
        boxes: [batches, N, 4] float; scores: [batches, classes, N] float; the thresholds 1-element tensors.

    Returns:
        int64 [selected, 3]: (batch, class, box index), batch-major, then class, then selection order.
        Not differentiable (indices).
    """
    def scalar(t, default):
        return item(t) if t is not None and t.numel() else default

    limit = max(int(scalar(max_output_boxes_per_class, 0)), 0)
    iou = float(scalar(iou_threshold, 0.0))
    out = []
    for b in range(boxes.shape[0]):
        sup = _suppression(boxes[b], center_point_box, iou) if limit else None
        for c in range(scores.shape[1]):
            if not limit:
                break
            s = scores[b, c]
            order = torch.sort(s, descending=True, stable=True).indices
            if score_threshold is not None and score_threshold.numel():
                order = order[s[order] > score_threshold.reshape(-1)[0]]
            alive = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
            kept = []
            for i in order.tolist():
                if len(kept) >= limit:
                    break
                if alive[i]:
                    kept.append(i)
                    alive &= ~sup[i]
            out += [(b, c, i) for i in kept]
    return torch.tensor(out, dtype=torch.int64, device=boxes.device).reshape(-1, 3)


_GRID_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic",
               "cubic": "bicubic"}


@refuses("GridSample")
def _grid_check(attrs, n_outputs, in_types, opset, in_ranks):
    mode = attrs.get("mode", "bilinear" if opset < 20 else "linear")
    if mode not in _GRID_MODES:
        return f"attribute mode={mode!r} is not an ONNX GridSample mode"
    if _GRID_MODES[mode] == "bicubic" and in_ranks[0] == 5:
        return f"attribute mode={mode!r} on a 3-D (5-D tensor) grid: torch has no such kernel"
    return None


@onnx_op("GridSample", since=16)
def GridSample(x, grid, *, align_corners=0, mode="bilinear", padding_mode="zeros"):
    """ONNX GridSample-22 with ``F.grid_sample`` (the same sampling: normalized grid coordinates,
    ``align_corners``, zeros/border/reflection padding, nearest rounding half to even, cubic A = -0.75).
    x [N, C, *in_spatial], grid [N, *out_spatial, rank]; torch samples 2-D (all modes) and 3-D
    (linear, nearest) grids."""
    m = _GRID_MODES[mode]
    if x.dim() == 5 and m == "bicubic":  # rank unknown at conversion
        raise UnsupportedInTorchBackend("GridSample: cubic sampling of a 3-D grid has no torch kernel")
    return F.grid_sample(x, grid.to(x.dtype), mode=m, padding_mode=padding_mode, align_corners=bool(align_corners))


@onnx_op("AffineGrid", since=20)
def AffineGrid(theta, size, *, align_corners=0):
    """ONNX AffineGrid-20: the sampling grid of affine matrices ``theta`` ([N, 2, 3] or [N, 3, 4]) for an
    output of ``size`` ([N, C, H, W] or [N, C, D, H, W]), with ``F.affine_grid``."""
    return F.affine_grid(theta, [int(v) for v in size.reshape(-1).tolist()], align_corners=bool(align_corners))


def _roi_axis(start, bin_size, grid, pooled, size):
    """Sample positions along one axis (``pooled * grid`` of them) → (low index, high index, low weight,
    high weight, in-bounds) as RoiAlign's bilinear interpolation takes them (onnxruntime's rules: a point
    beyond [-1, size] contributes nothing; others clamp to the edge)."""
    p = torch.arange(pooled, dtype=torch.float64).unsqueeze(1)
    g = torch.arange(grid, dtype=torch.float64).unsqueeze(0)
    v = (start + p * bin_size + (g + 0.5) * bin_size / grid).reshape(-1)
    inside = (v >= -1.0) & (v <= size)
    v = v.clamp(min=0)
    low = v.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    v = torch.where(edge, low.double(), v)
    frac = v - low
    return low, high, 1 - frac, frac, inside


@onnx_op("RoiAlign", since=10)
def RoiAlign(x, rois, batch_indices, *, coordinate_transformation_mode="half_pixel", mode="avg", output_height=1,
             output_width=1, sampling_ratio=0, spatial_scale=1.0):
    """ONNX RoiAlign-16: each ROI ``[x1, y1, x2, y2]`` (scaled by ``spatial_scale``, shifted by -0.5 for
    ``half_pixel``) divided into ``output_height x output_width`` bins, each the average (or max) of
    ``sampling_ratio`` (default ``ceil(roi size / bins)``) bilinear samples per axis.
    x [N, C, H, W], rois [R, 4], batch_indices [R] → [R, C, output_height, output_width]."""
    half = coordinate_transformation_mode == "half_pixel"
    h, w = x.shape[2], x.shape[3]
    out = []
    for r in range(rois.shape[0]):
        x1, y1, x2, y2 = (float(v) * spatial_scale - (0.5 if half else 0.0) for v in rois[r].tolist())
        rw, rh = x2 - x1, y2 - y1
        if not half:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / output_height, rw / output_width
        gh = int(sampling_ratio) if sampling_ratio > 0 else math.ceil(rh / output_height)
        gw = int(sampling_ratio) if sampling_ratio > 0 else math.ceil(rw / output_width)
        yl, yh, wyl, wyh, iny = _roi_axis(y1, bh, gh, output_height, h)
        xl, xh, wxl, wxh, inx = _roi_axis(x1, bw, gw, output_width, w)
        img = x[int(batch_indices[r])]  # [C, H, W]
        valid = (iny.unsqueeze(1) & inx.unsqueeze(0)).to(x.dtype)  # [Ny, Nx]
        wyl, wyh, wxl, wxh = (t.to(x.dtype) for t in (wyl, wyh, wxl, wxh))
        rows_l, rows_h = img[:, yl], img[:, yh]  # [C, Ny, W]
        corners = [wyl[:, None] * wxl * rows_l[:, :, xl], wyl[:, None] * wxh * rows_l[:, :, xh],
                   wyh[:, None] * wxl * rows_h[:, :, xl], wyh[:, None] * wxh * rows_h[:, :, xh]]
        if mode == "avg":
            v = sum(corners) * valid
            v = v.reshape(-1, output_height, gh, output_width, gw).sum((2, 4)) / max(gh * gw, 1)
        else:
            v = torch.stack(corners).amax(0) * valid
            v = v.reshape(-1, output_height, gh, output_width, gw).amax((2, 4))
        out.append(v)
    if not out:
        return x.new_zeros((0, x.shape[1], output_height, output_width))
    return torch.stack(out)


@refuses("DeformConv")
def _deform_check(attrs, n_outputs, in_types, opset, in_ranks):
    if in_ranks[0] not in (None, 4):
        return f"a {in_ranks[0]}-D input: only 2-D deformable convolution is defined (onnx.reference)"
    return None


@onnx_op("DeformConv", since=19)
def DeformConv(x, w, offset, b=None, mask=None, *, dilations=None, group=1, kernel_shape=None, offset_group=1,
               pads=None, strides=None):
    """ONNX DeformConv-19 (2-D): each kernel tap of each output position samples ``x`` bilinearly (zero
    outside) at its regular position plus ``offset`` ([N, offset_group*kh*kw*2, oh, ow], (dy, dx) per tap),
    scaled by ``mask`` ([N, offset_group*kh*kw, oh, ow], default 1); then a grouped convolution of
    the samples with ``w`` plus ``b``."""
    if x.dim() != 4:  # rank unknown at conversion
        raise UnsupportedInTorchBackend("DeformConv: only 2-D inputs are defined by the ONNX reference")
    n, ic, ih, iw = x.shape
    oc, icg, kh, kw = w.shape
    oh, ow = offset.shape[-2:]
    sh, sw = strides or (1, 1)
    dh, dw = dilations or (1, 1)
    pads = pads or (0, 0, 0, 0)
    off = offset.reshape(n, offset_group, kh, kw, 2, oh, ow)
    m = mask.reshape(n, offset_group, kh, kw, oh, ow) if mask is not None else None
    base_y = (torch.arange(oh, dtype=x.dtype, device=x.device) * sh - pads[0]).reshape(oh, 1)
    base_x = (torch.arange(ow, dtype=x.dtype, device=x.device) * sw - pads[1]).reshape(1, ow)
    ky = (torch.arange(kh, dtype=x.dtype, device=x.device) * dh).reshape(kh, 1, 1, 1)
    kx = (torch.arange(kw, dtype=x.dtype, device=x.device) * dw).reshape(1, kw, 1, 1)
    y = base_y + ky + off[:, :, :, :, 0]  # [n, G, kh, kw, oh, ow]
    xx = base_x + kx + off[:, :, :, :, 1]
    grid = torch.stack([xx / (iw - 1) * 2 - 1, y / (ih - 1) * 2 - 1], -1)  # (x, y) normalized, align_corners
    per = ic // offset_group
    cols = []
    for g in range(offset_group):
        s = F.grid_sample(x[:, g * per:(g + 1) * per], grid[:, g].reshape(n, kh * kw * oh, ow, 2),
                          mode="bilinear", padding_mode="zeros", align_corners=True)
        s = s.reshape(n, per, kh, kw, oh, ow)
        cols.append(s * m[:, g].unsqueeze(1) if m is not None else s)
    cols = torch.cat(cols, 1).reshape(n, group, icg * kh * kw, oh * ow)
    out = torch.einsum("gok,ngkl->ngol", w.reshape(group, oc // group, icg * kh * kw), cols)
    out = out.reshape(n, oc, oh, ow)
    return out + b.reshape(1, -1, 1, 1) if b is not None else out
