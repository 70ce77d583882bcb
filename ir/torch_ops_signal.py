"""ONNX signal-processing ops as torch functions (conventions: :mod:`graft.ir.torch_ops`): DFT-17/20,
STFT-17, the Hann / Hamming / Blackman windows and MelWeightMatrix, as ``onnx.reference`` defines them.

Complex tensors are real tensors with a last axis of 2 (real, imaginary); a real signal has a last
axis of 1. Transforms run with ``torch.fft`` in the input's precision.
"""
from __future__ import annotations

import math

import torch

from graft.ir.torch_ops import ONNX_DTYPES, item, onnx_op


def _complex(x):
    """[..., 1] real or [..., 2] (re, im) → a complex (or real) tensor without the last axis."""
    if x.shape[-1] == 1:
        return x[..., 0]
    return torch.complex(x[..., 0], x[..., 1])


def _split(z, dtype):
    """A complex tensor → [..., 2] (re, im) in ``dtype``."""
    z = z if z.is_complex() else torch.complex(z, torch.zeros_like(z))
    return torch.stack([z.real, z.imag], -1).to(dtype)


def _dft(x, n, axis, inverse, onesided):
    axis = axis % x.dim()
    if n is None:
        n = 2 * (x.shape[axis] - 1) if inverse and onesided else x.shape[axis]
    z = _complex(x)
    if inverse:
        if onesided:  # one-sided spectrum → real signal of length n
            return torch.fft.irfft(z, n=n, dim=axis).unsqueeze(-1).to(x.dtype)
        return _split(torch.fft.ifft(z, n=n, dim=axis), x.dtype)
    out = torch.fft.fft(z, n=n, dim=axis)
    if onesided:
        out = out.narrow(axis, 0, out.shape[axis] // 2 + 1)
    return _split(out, x.dtype)


@onnx_op("DFT", since=17)
def DFT_17(x, dft_length=None, *, axis=1, inverse=0, onesided=0):
    """ONNX DFT-17: the discrete Fourier transform of ``x`` ([..., 1] real or [..., 2] complex) along
    ``axis`` (an attribute), zero-padded / truncated to ``dft_length``; ``onesided`` keeps the first
    ``n//2 + 1`` bins (forward) or takes a one-sided spectrum to a real signal (inverse, 1/n scaled)."""
    return _dft(x, int(item(dft_length)) if dft_length is not None else None, axis, inverse, onesided)


@onnx_op("DFT", since=20)
def DFT(x, dft_length=None, axis=None, *, inverse=0, onesided=0):
    """ONNX DFT-20: as DFT-17 with ``axis`` an input (default -2)."""
    n = int(item(dft_length)) if dft_length is not None and dft_length.numel() else None
    return _dft(x, n, int(item(axis)) if axis is not None else -2, inverse, onesided)


@onnx_op("STFT", since=17)
def STFT(signal, frame_step, window=None, frame_length=None, *, onesided=1):
    """ONNX STFT-17: frames of ``frame_length`` (default: the window's length) every ``frame_step`` samples,
    ``1 + (length - frame_length) // frame_step`` of them, each multiplied by ``window`` (default ones) and
    transformed. signal [batch, length, 1|2] → [batch, frames, bins, 2] (bins ``n//2 + 1`` when
    ``onesided``)."""
    step = int(item(frame_step))
    n = int(item(frame_length)) if frame_length is not None else \
        (window.shape[0] if window is not None else signal.shape[-2])
    frames = signal.unfold(1, n, step)  # [batch, frames, 1|2, n]
    frames = frames.movedim(-1, -2)  # [batch, frames, n, 1|2]
    if window is not None:
        frames = frames * window.to(signal.dtype).reshape(1, 1, -1, 1)
    return _dft(frames, n, -2, False, onesided)


def _window_pos(size, periodic, dtype):
    n = int(item(size))
    denom = n if periodic else n - 1
    return torch.arange(n, dtype=ONNX_DTYPES[dtype]), denom


@onnx_op("HannWindow", since=17)
def HannWindow(size, *, output_datatype=1, periodic=1):
    """``sin(pi*n/N)^2``, N = size (periodic) or size - 1 (symmetric)."""
    i, d = _window_pos(size, periodic, output_datatype)
    return (torch.sin(i * math.pi / d) ** 2).to(i.dtype)


@onnx_op("HammingWindow", since=17)
def HammingWindow(size, *, output_datatype=1, periodic=1):
    """``25/46 - 21/46*cos(2*pi*n/N)``."""
    i, d = _window_pos(size, periodic, output_datatype)
    alpha = 25.0 / 46.0
    return (alpha - torch.cos(i * math.pi * 2 / d) * (1 - alpha)).to(i.dtype)


@onnx_op("BlackmanWindow", since=17)
def BlackmanWindow(size, *, output_datatype=1, periodic=1):
    """``0.42 - 0.5*cos(2*pi*n/N) + 0.08*cos(4*pi*n/N)``."""
    n = int(item(size))
    d = n if periodic else n - 1
    i = torch.arange(n, dtype=torch.float64)
    y = torch.cos(i * (math.pi * 2) / d) * -0.5 + torch.cos(i * (math.pi * 4) / d) * 0.08 + 0.42
    return y.to(ONNX_DTYPES[output_datatype])


@onnx_op("MelWeightMatrix", since=17)
def MelWeightMatrix(num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz, *,
                    output_datatype=1):
    """ONNX MelWeightMatrix-17: [dft_length//2 + 1, num_mel_bins] triangular filters on the mel scale
    (``mel = 2595*log10(1 + hz/700)``), edges at integer spectrogram bins ``((n + 1)*hz) // sample_rate``,
    as ``onnx.reference`` computes them."""
    bins, n, rate = int(item(num_mel_bins)), int(item(dft_length)), int(item(sample_rate))
    lo, hi = float(item(lower_edge_hertz)), float(item(upper_edge_hertz))
    lo_mel = 2595 * math.log1p(lo / 700) / math.log(10)
    hi_mel = 2595 * math.log1p(hi / 700) / math.log(10)
    step = (hi_mel - lo_mel) / (bins + 2)
    freq = torch.arange(bins + 2, dtype=torch.float64) * step + lo_mel
    freq = 700 * torch.expm1(freq / 2595 * math.log(10))
    edges = [int(v) for v in torch.floor((n + 1) * freq / rate).tolist()]
    out = torch.zeros(n // 2 + 1, bins, dtype=torch.float64)
    for i in range(bins):
        left, center, right = edges[i], edges[i + 1], edges[i + 2]
        if center == left:
            out[center, i] = 1
        else:
            for j in range(left, center + 1):
                out[j, i] = (j - left) / (center - left)
        for j in range(center, right):
            out[j, i] = (right - j) / (right - center)
    return out.to(ONNX_DTYPES[output_datatype])
