"""ONNX transformer ops as torch functions (conventions: :mod:`graft.ir.torch_ops`): Attention-23/24/25
and RotaryEmbedding-23, following the operator specs and ``onnx.reference`` step by step."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graft.ir.torch_ops import ONNX_DTYPES, onnx_op


def _heads(x, n):
    """[batch, seq, n*d] → [batch, n, seq, d]."""
    return x.reshape(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def _frontier_bias(lq, lk, offset, dtype, device, allowed_fn):
    """An additive bias (0 allowed, -inf masked) of ``allowed_fn(query position + offset - key index)``:
    [lq, lk] for an int ``offset``, [batch, 1, lq, lk] for a per-batch tensor."""
    i = torch.arange(lq, device=device).reshape(lq, 1)
    j = torch.arange(lk, device=device).reshape(1, lk)
    if isinstance(offset, torch.Tensor):
        diff = (i + offset.reshape(-1, 1, 1).to(torch.int64)) - j
        allowed = allowed_fn(diff).unsqueeze(1)
    else:
        allowed = allowed_fn(i + offset - j)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=device))


def _safe_softmax(x):
    """Softmax over the last axis with an all ``-inf`` row giving zeros instead of NaN."""
    mx = x.amax(-1, keepdim=True)
    mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
    e = torch.exp(x - mx)
    s = e.sum(-1, keepdim=True)
    return e / torch.where(s == 0, torch.ones_like(s), s)


@onnx_op("Attention", since=23)
def Attention(q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *, is_causal=0,
              kv_num_heads=None, q_num_heads=None, qk_matmul_output_mode=0, scale=None, softcap=0.0,
              softmax_precision=None, left_window_size=-1, right_window_size=-1, _outputs=1):
    """ONNX Attention-25: ``softmax(softcap(Q K^T * scale) + bias) V``, the scale applied as ``sqrt(scale)``
    to Q and to K as the spec's function body does, ``scale`` defaulting to ``1/sqrt(head_size)``.

    Q [batch, q_heads, q_seq, head] (or [batch, q_seq, q_heads*head] with ``q_num_heads`` /
    ``kv_num_heads``); K, V likewise with kv heads, K/V appended to ``past_key`` / ``past_value`` on the
    sequence axis (outputs present_key / present_value). The bias: ``attn_mask`` (bool: False masks; float:
    added; padded with masked keys up to the key length), ``is_causal`` (key j allowed for query i when
    ``j <= i + offset``, offset = past length, or ``nonpad_kv_seqlen[b] - q_seq``), the sliding window
    ``left_window_size`` / ``right_window_size`` and ``nonpad_kv_seqlen`` padding. A query whose keys are
    all masked gets zeros. Grouped-query attention repeats each kv head ``q_heads / kv_heads`` times.
    ``qk_matmul_output`` (4th output): the scaled (soft-capped) product (mode 0/1), plus the bias (2), or
    the softmax (3). ``softmax_precision``: the ONNX type the softmax runs in.
    """
    rank3 = q.dim() == 3
    batch = q.shape[0]
    if rank3:
        q, k, v = _heads(q, q_num_heads), _heads(k, kv_num_heads), _heads(v, kv_num_heads)
    if scale is None:
        scale = 1 / math.sqrt(q.shape[3])
    s = torch.tensor(math.sqrt(scale), dtype=q.dtype, device=q.device)
    k = torch.cat([past_key, k], 2) if past_key is not None else k
    v = torch.cat([past_value, v], 2) if past_value is not None else v
    present_k, present_v = k, v
    lq, lk = q.shape[2], k.shape[2]
    dt, dev = q.dtype, q.device
    neg_inf = torch.full((), float("-inf"), dtype=dt, device=dev)
    zero = torch.zeros((), dtype=dt, device=dev)
    mask = attn_mask
    if mask is not None and mask.shape[-1] < lk:
        mask = F.pad(mask, (0, lk - mask.shape[-1]), value=False if mask.dtype == torch.bool else float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.where(mask, zero, neg_inf)
    windowed = left_window_size >= 0 or right_window_size >= 0
    if nonpad_kv_seqlen is not None and past_key is None:
        offset = nonpad_kv_seqlen.reshape(-1) - lq
    else:
        offset = past_key.shape[2] if past_key is not None else 0
    bias = torch.zeros((lq, lk), dtype=dt, device=dev)
    if is_causal:
        base = bias if mask is None else mask
        if windowed:
            base = bias + base
        bias = base + _frontier_bias(lq, lk, offset, dt, dev, lambda d: d >= 0)
    elif mask is not None:
        bias = bias + mask
    if windowed:
        def allowed(d):
            ok = torch.ones_like(d, dtype=torch.bool)
            if left_window_size >= 0:
                ok = ok & (d <= left_window_size)
            if right_window_size >= 0:
                ok = ok & (-d <= right_window_size)
            return ok
        bias = bias + _frontier_bias(lq, lk, offset, dt, dev, allowed)
    if nonpad_kv_seqlen is not None:
        keep = torch.arange(lk, device=dev) < nonpad_kv_seqlen.reshape(-1, 1).to(dev)
        bias = bias + torch.where(keep, zero, neg_inf).reshape(batch, 1, 1, lk)
    hq = q.shape[1]
    hk = k.shape[1]
    if hq != hk and hq % hk == 0 and v.shape[1] == hk:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    qk = torch.matmul(q * s, k.transpose(-1, -2) * s)
    if softcap and softcap > 0:
        qk = torch.tanh(qk / softcap) * softcap
    scores = qk + bias
    qk_out = scores if qk_matmul_output_mode == 2 else qk
    if softmax_precision:
        scores = scores.to(ONNX_DTYPES[int(softmax_precision)])
    probs = _safe_softmax(scores)
    all_masked = torch.isneginf(bias.amax(-1, keepdim=True))
    probs = torch.where(all_masked, torch.zeros((), dtype=probs.dtype, device=dev), probs)
    if qk_matmul_output_mode == 3:
        qk_out = probs
    y = torch.matmul(probs.to(dt), v)
    if rank3:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    out = (y, present_k, present_v, qk_out.to(dt))
    return out[:_outputs] if _outputs > 1 else y


@onnx_op("RotaryEmbedding", since=23)
def RotaryEmbedding(x, cos_cache, sin_cache, position_ids=None, *, interleaved=0, num_heads=0,
                    rotary_embedding_dim=0):
    """ONNX RotaryEmbedding-23: rotate the first ``rotary_embedding_dim`` (default: all) features of each
    head by the angles whose cos/sin are ``cos_cache`` / ``sin_cache`` ([max_pos, dim/2], looked up with
    ``position_ids`` [batch, seq]; or already [batch, seq, dim/2]). Pairs are (i, i + dim/2), or adjacent
    (2i, 2i+1) with ``interleaved``: ``(x1, x2) → (cos*x1 - sin*x2, sin*x1 + cos*x2)``.
    x: [batch, heads, seq, head] or [batch, seq, heads*head] (with ``num_heads``); same shape out."""
    shape = x.shape
    if x.dim() == 4:
        x = x.transpose(1, 2)  # [batch, seq, heads, head]
    else:
        x = x.reshape(shape[0], shape[1], num_heads, -1)
    dim = rotary_embedding_dim or x.shape[3]
    rot, keep = x[..., :dim], x[..., dim:]
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids], sin_cache[position_ids]
    cos, sin = cos_cache.unsqueeze(2), sin_cache.unsqueeze(2)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot.chunk(2, -1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    rot = torch.stack([real, imag], -1).reshape(rot.shape) if interleaved else torch.cat([real, imag], -1)
    out = torch.cat([rot, keep], -1)
    return out.reshape(shape) if len(shape) == 3 else out.transpose(1, 2)


@onnx_op("SwiGLU", since=28)
def SwiGLU(a, b, *, alpha=1.0):
    """ONNX SwiGLU-28: ``a * sigmoid(alpha * a) * b`` (a and b of one shape)."""
    return a * torch.sigmoid(alpha * a).to(a.dtype) * b


@onnx_op("LinearAttention", since=27)
def LinearAttention(query, key, value, past_state=None, decay=None, beta=None, *, chunk_size=64, kv_num_heads,
                    q_num_heads, scale=0.0, update_rule="gated_delta", _outputs=1):
    """ONNX LinearAttention-27: a recurrent state ``S`` [batch, kv_heads, d_k, d_v] (``past_state``, else 0),
    for each step t: ``S *= exp(decay_t)`` (gated rules), ``v_t = beta_t * (v_t - S^T k_t)`` (delta rules),
    ``S += k_t v_t^T``, ``o_t = scale * q_t S`` (kv heads repeated for grouped queries; ``scale`` 0 means
    ``1/sqrt(d_k)``). Runs in float32. q/k/v [batch, T, heads*dim]; decay [batch, T, kv_heads] or
    [batch, T, kv_heads*d_k]; beta [batch, T, kv_heads or 1]. Returns (output [batch, T, q_heads*d_v],
    present_state). ``chunk_size`` is a tuning hint without effect."""
    gating = update_rule in ("gated", "gated_delta")
    delta = update_rule in ("delta", "gated_delta")
    b, t, _ = query.shape
    dk = query.shape[-1] // q_num_heads
    dv = value.shape[-1] // kv_num_heads
    group = q_num_heads // kv_num_heads
    q4 = _heads(query, q_num_heads).float()
    k4 = _heads(key, kv_num_heads).float()
    v4 = _heads(value, kv_num_heads).float()
    if gating:
        d4 = decay.reshape(b, t, kv_num_heads, -1).transpose(1, 2).float()  # [b, h, t, 1 or d_k]
    if delta:
        b4 = beta.reshape(b, t, beta.shape[-1], 1).transpose(1, 2).float()
    state = past_state.float() if past_state is not None else \
        torch.zeros(b, kv_num_heads, dk, dv, dtype=torch.float32, device=query.device)
    s = scale if scale else 1.0 / math.sqrt(dk)
    outs = []
    for i in range(t):
        k_t, v_t = k4[:, :, i], v4[:, :, i]
        if gating:
            state = state * torch.exp(d4[:, :, i]).unsqueeze(-1)
        if delta:
            v_t = b4[:, :, i] * (v_t - torch.einsum("bhdm,bhd->bhm", state, k_t))
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        read = state.repeat_interleave(group, dim=1) if group > 1 else state
        outs.append(s * torch.einsum("bhd,bhdm->bhm", q4[:, :, i], read))
    out = torch.stack(outs, 2).transpose(1, 2).reshape(b, t, q_num_heads * dv).to(query.dtype)
    present = state.to(past_state.dtype if past_state is not None else query.dtype)
    return (out, present) if _outputs > 1 else out


@onnx_op("CausalConvWithState", since=27)
def CausalConvWithState(x, weight, bias=None, past_state=None, *, activation="none", _outputs=1):
    """ONNX CausalConvWithState-27: depthwise causal 1-D convolution of x [batch, C, L] with weight [C, 1, k],
    left-padded with ``past_state`` [batch, C, k-1] (default zeros), optionally followed by SiLU; also
    returns the last k-1 input positions as the next state."""
    k = weight.shape[2]
    pad = past_state if past_state is not None else x.new_zeros(x.shape[0], x.shape[1], k - 1)
    padded = torch.cat([pad, x], 2)
    y = F.conv1d(padded, weight, bias, groups=x.shape[1])
    if activation in ("silu", "swish"):
        y = (y.float() * torch.sigmoid(y.float())).to(x.dtype)
    present = padded[:, :, padded.shape[2] - (k - 1):]
    return (y, present) if _outputs > 1 else y
