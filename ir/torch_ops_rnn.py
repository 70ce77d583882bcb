"""ONNX recurrent ops (RNN-14, GRU-14, LSTM-14) as torch functions (conventions: :mod:`graft.ir.torch_ops`).

Shapes (``layout`` 0; ``layout`` 1 swaps the first two axes of X, Y, Y_h, Y_c and of the initial states):
X ``[seq, batch, input]``; W ``[dirs, gates*H, input]``; R ``[dirs, gates*H, H]``; B ``[dirs, 2*gates*H]``
(input biases, then recurrent biases); ``sequence_lens`` ``[batch]``; initial_h / initial_c
``[dirs, batch, H]``; P (LSTM peepholes i, o, f) ``[dirs, 3*H]``. Outputs Y ``[seq, dirs, batch, H]``,
Y_h / Y_c ``[dirs, batch, H]``. Gate order in W, R, B: LSTM i, o, f, c; GRU z, r, h; RNN one gate.

Equations (https://onnx.ai/onnx/operators/onnx__LSTM.html, ``__GRU``, ``__RNN``), ``f, g, h`` the
``activations`` (defaults Sigmoid, Tanh, Tanh; RNN Tanh), ``clip`` bounding every gate's
pre-activation to ``[-clip, clip]``:

- LSTM: ``i = f(Wi x + Ri h + Pi*c + b)``, ``f = f(Wf x + Rf h + Pf*c + b)`` (``1 - i`` with
  ``input_forget``), ``c~ = g(Wc x + Rc h + b)``, ``c' = f*c + i*c~``, ``o = f(Wo x + Ro h + Po*c' + b)``,
  ``h' = o*h(c')``.
- GRU: ``z = f(Wz x + Rz h + b)``, ``r = f(Wr x + Rr h + b)``, ``h~ = g(Wh x + Rh (r*h) + b)`` (with
  ``linear_before_reset``: ``g(Wh x + r*(Rh h + Rbh) + Wbh)``), ``h' = (1 - z)*h~ + z*h``.
- RNN: ``h' = f(Wi x + Ri h + b)``.

``reverse`` runs each sequence from its last valid step (``sequence_lens``) to the first;
``bidirectional`` runs both and stacks them on the ``dirs`` axis. Steps past a sequence's length
leave the state unchanged and write zeros to Y. The time loop is Python over torch ops, so the
module stays differentiable (backpropagation through time).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graft.ir.torch_ops import onnx_op, refuses

# name -> (fn(x, alpha, beta), default alpha, default beta); None: the activation takes no such value
_ACTIVATIONS = {
    "Relu": (lambda x, a, b: torch.relu(x), None, None),
    "Tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "Sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "Affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "LeakyRelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, None),
    "ThresholdedRelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
    "ScaledTanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    "HardSigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5),
    "Elu": (lambda x, a, b: F.elu(x, a), 1.0, None),
    "Softsign": (lambda x, a, b: F.softsign(x), None, None),
    "Softplus": (lambda x, a, b: F.softplus(x), None, None),
}
_CANON = {k.lower(): k for k in _ACTIVATIONS}


def _activations(names, alphas, betas, default, dirs):
    """One list of callables per direction. ``activation_alpha`` / ``_beta`` are consumed in order by the
    activations that take them (as onnxruntime reads them); the others use the ONNX op defaults."""
    names = list(names) if names else default * dirs
    alphas, betas = list(alphas or []), list(betas or [])
    out = []
    for name in names:
        fn, da, db = _ACTIVATIONS[_CANON[name.lower()]]
        a = alphas.pop(0) if da is not None and alphas else da
        b = betas.pop(0) if db is not None and betas else db
        out.append(lambda x, fn=fn, a=a, b=b: fn(x, a, b))
    per = len(names) // dirs
    return [out[d * per:(d + 1) * per] for d in range(dirs)]


@refuses("RNN", "GRU", "LSTM")
def _rnn_check(attrs, n_outputs, in_types, opset, in_ranks):
    for name in attrs.get("activations") or ():
        if name.lower() not in _CANON:
            return f"attribute activations contains {name!r}, which is not an ONNX RNN activation"
    return None


def _reverse_within(x, lens):
    """Each batch column of ``x`` ([seq, batch, ...]) reversed within its first ``lens[b]`` steps."""
    seq = x.shape[0]
    t = torch.arange(seq, device=x.device).unsqueeze(1)
    idx = torch.where(t < lens, lens - 1 - t, t)  # [seq, batch]
    idx = idx.reshape(seq, -1, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 0, idx)


def _run(cell, x, states, lens, reverse):
    """Run ``cell(x_t, states) -> states`` (states[0] is h) over [seq, batch, input] ``x``."""
    seq = x.shape[0]
    if lens is None:
        steps = range(seq - 1, -1, -1) if reverse else range(seq)
        ys = [None] * seq
        for t in steps:
            states = cell(x[t], states)
            ys[t] = states[0]
        return (torch.stack(ys) if seq else x.new_zeros((0, *states[0].shape))), states
    xs = _reverse_within(x, lens) if reverse else x
    ys = []
    for t in range(seq):
        new = cell(xs[t], states)
        live = (t < lens).unsqueeze(1)  # [batch, 1]
        states = tuple(torch.where(live, n, s) for n, s in zip(new, states))
        ys.append(torch.where(live, new[0], torch.zeros_like(new[0])))
    y = torch.stack(ys) if seq else x.new_zeros((0, *states[0].shape))
    return (_reverse_within(y, lens) if reverse else y), states


def _recurrent(x, w, r, b, lens, init, direction, layout, hidden_size, gates, cell_of, n_states, outputs):
    if layout:
        x = x.transpose(0, 1)
        init = [s.transpose(0, 1) if s is not None else None for s in init]
    dirs = w.shape[0]
    hsz = r.shape[-1]
    batch = x.shape[1]
    if lens is not None:
        lens = lens.to(torch.int64).to(x.device)
    ys, finals = [], [[] for _ in range(n_states)]
    for d in range(dirs):
        bias = b[d] if b is not None else torch.zeros(2 * gates * hsz, dtype=x.dtype, device=x.device)
        states = tuple(s[d] if s is not None else torch.zeros(batch, hsz, dtype=x.dtype, device=x.device)
                       for s in init[:n_states])
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        y, states = _run(cell_of(d, w[d], r[d], bias[:gates * hsz], bias[gates * hsz:]), x, states, lens, reverse)
        ys.append(y)
        for i, s in enumerate(states):
            finals[i].append(s)
    y = torch.stack(ys, 1)  # [seq, dirs, batch, H]
    finals = [torch.stack(f, 0) for f in finals]  # [dirs, batch, H]
    if layout:
        y = y.permute(2, 0, 1, 3)
        finals = [f.transpose(0, 1) for f in finals]
    out = (y, *finals)
    return out[:outputs] if outputs > 1 else out[0]


def _clip(v, clip):
    return v if clip is None else torch.clamp(v, -clip, clip)


@onnx_op("LSTM", since=7)
def LSTM(x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, *, activation_alpha=None,
         activation_beta=None, activations=None, clip=None, direction="forward", hidden_size=None, input_forget=0,
         layout=0, _outputs=1):
    """ONNX LSTM-14 (see the module doc). Returns Y, or (Y, Y_h[, Y_c]) for a node with more outputs."""
    dirs = w.shape[0]
    acts = _activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh", "Tanh"], dirs)

    def cell_of(d, wd, rd, wb, rb):
        f, g, h = acts[d]
        pi, po, pf = (p[d].chunk(3) if p is not None else (None, None, None))
        bias = wb + rb
        wt, rt = wd.t(), rd.t()

        def cell(xt, states):
            ht, ct = states
            gi, go, gf, gc = (xt @ wt + ht @ rt + bias).chunk(4, -1)
            if pi is not None:
                gi, gf = gi + pi * ct, gf + pf * ct
            i = f(_clip(gi, clip))
            fg = 1 - i if input_forget else f(_clip(gf, clip))
            c = fg * ct + i * g(_clip(gc, clip))
            if po is not None:
                go = go + po * c
            o = f(_clip(go, clip))
            return o * h(c), c
        return cell

    return _recurrent(x, w, r, b, sequence_lens, [initial_h, initial_c], direction, layout, hidden_size, 4, cell_of,
                      2, _outputs)


@onnx_op("GRU", since=7)
def GRU(x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None, activation_beta=None,
        activations=None, clip=None, direction="forward", hidden_size=None, linear_before_reset=0, layout=0,
        _outputs=1):
    """ONNX GRU-14 (see the module doc). Returns Y, or (Y, Y_h)."""
    dirs = w.shape[0]
    acts = _activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh"], dirs)

    def cell_of(d, wd, rd, wb, rb):
        f, g = acts[d]
        wt = wd.t()
        rz_r, rh = rd[:2 * rd.shape[1]].t(), rd[2 * rd.shape[1]:].t()
        wbz, wbr, wbh = wb.chunk(3)
        rbz, rbr, rbh = rb.chunk(3)
        bzr = torch.cat([wbz + rbz, wbr + rbr])

        def cell(xt, states):
            (ht,) = states
            xz, xr, xh = (xt @ wt).chunk(3, -1)
            hz, hr = (ht @ rz_r + bzr).chunk(2, -1)
            z = f(_clip(xz + hz, clip))
            rg = f(_clip(xr + hr, clip))
            if linear_before_reset:
                hh = g(_clip(xh + wbh + rg * (ht @ rh + rbh), clip))
            else:
                hh = g(_clip(xh + wbh + (rg * ht) @ rh + rbh, clip))
            return ((1 - z) * hh + z * ht,)
        return cell

    return _recurrent(x, w, r, b, sequence_lens, [initial_h], direction, layout, hidden_size, 3, cell_of, 1,
                      _outputs)


@onnx_op("RNN", since=7)
def RNN(x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None, activation_beta=None,
        activations=None, clip=None, direction="forward", hidden_size=None, layout=0, _outputs=1):
    """ONNX RNN-14 (see the module doc). Returns Y, or (Y, Y_h)."""
    dirs = w.shape[0]
    acts = _activations(activations, activation_alpha, activation_beta, ["Tanh"], dirs)

    def cell_of(d, wd, rd, wb, rb):
        (f,) = acts[d]
        wt, rt, bias = wd.t(), rd.t(), wb + rb

        def cell(xt, states):
            (ht,) = states
            return (f(_clip(xt @ wt + ht @ rt + bias, clip)),)
        return cell

    return _recurrent(x, w, r, b, sequence_lens, [initial_h], direction, layout, hidden_size, 1, cell_of, 1,
                      _outputs)
