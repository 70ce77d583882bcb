"""Fuse decomposed layer normalization into LayerNormalization-17, and Add + LayerNormalization into
onnxruntime's SkipLayerNormalization.

Layer normalization (Ba et al. 2016, "Layer Normalization", eq. 4) over the trailing axes
``[axis, rank)``::

    mean = ReduceMean(x, axes)                    d = x - mean
    var  = ReduceMean(d², axes)                   y = d / sqrt(var + ε) · γ + β

which is ONNX LayerNormalization-17 (``axis``, ``epsilon``, Scale γ and B β of the normalized
shape). Exporters write it decomposed for opset < 17, and hand-written modules at any opset.

- ``fuse_layernorm``: ``Div(Sub(x, ReduceMean(x)), Sqrt(Add(ReduceMean(Pow(Sub(..), 2)), ε)))``
  -> ``LayerNormalization(x, 1, 0, axis, epsilon=ε)``, when both ReduceMeans (axes attribute
  before opset 18, input from 18; keepdims=1) reduce the same trailing axes, the exponent is 2,
  ε a positive scalar, the normalized dims static, and the opset >= 17 (earlier opsets have no
  LayerNormalization: the rule refuses and says so).
- ``absorb_scale_into_layernorm``: ``Mul(LayerNormalization(x, γ, β), g) = LayerNormalization(x,
  γ·g, β·g)`` and ``absorb_shift_into_layernorm``: ``Add(LayerNormalization(x, γ, β), c) =
  LayerNormalization(x, γ, β + c)`` for constants g, c that broadcast over the normalized axes
  only (their rank <= the number of normalized axes), so the affine part of a decomposed norm
  — or any per-channel affine after a norm — lands in γ and β.
- ``fuse_skip_layernorm`` (onnxruntime target): ``LayerNormalization(Add(a, s), γ, β)`` over the
  last axis, with a and s provably of the same 3-D shape (B, S, D), -> ``com.microsoft
  SkipLayerNormalization(a, s, γ, β, epsilon)``; when ``a = Add(t, bias)`` with a 1-D constant
  bias, the bias becomes SkipLayerNormalization's ``bias`` input (onnxruntime
  docs/ContribOperators.md, SkipLayerNormalization version 1: output = LayerNorm(input + skip +
  bias)). onnxruntime's kernel can be slower than Add + LayerNormalization (measured with
  all-MiniLM-L6-v2 at one thread, bench/bench_fusions.py), so the ``fuse_ort`` pipeline leaves
  this rule out; ``fuse_ort_skiplayernorm`` includes it.

Sources: ONNX LayerNormalization-17, ReduceMean-13/-18, Pow-15, Sqrt-13; onnxruntime
docs/ContribOperators.md (com.microsoft.SkipLayerNormalization).
"""
from __future__ import annotations

import numpy as np

from graft.compiler.engine import Const, Rule, Var, op
from graft.ir import Node, Value
from graft.rules.fuse_facts import dims_equal, is_scalar, rank, scalar, static_dim

MS = "com.microsoft"

x, axes1, axes2, two, eps = Var("x"), Var("axes1"), Var("axes2"), Const("two"), Const("eps")
centered = op.Sub(x, op.ReduceMean(x, op.optional(axes1), name="mean"), name="center")
variance = op.ReduceMean(op.Pow(centered, two, name="square"), op.optional(axes2), name="var")
ln_pattern = op.Div(centered, op.Sqrt(op.Add(variance, eps, name="add_eps"), name="sqrt"), name="div")


def _desc(node: Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} (output {node.outputs[0].name!r})"


def _axes(node: Node, axes_value: Value | None, r: int) -> list[int] | None:
    """ReduceMean's axes (attribute before opset 18, input from 18), normalized to [0, r); None if unknown."""
    if axes_value is not None:
        arr = axes_value.constant()
        if arr is None:
            return None
        raw = [int(a) for a in arr.reshape(-1)]
    else:
        raw = node.attrs.get("axes")
        if raw is None:
            return list(range(r))  # no axes: all of them
    return sorted(a + r if a < 0 else a for a in raw)


def _ln_check(m):
    r = rank(m[x])
    if r is None:
        return m.fail(f"rank of {m[x].name!r} is unknown (run shape inference first)", m.mean)
    for node, av in ((m.mean, m.value(axes1)), (m.var, m.value(axes2))):
        if not node.attrs.get("keepdims", 1):
            return m.fail(f"{_desc(node)} has keepdims=0; the mean must broadcast back over x", node)
    a1, a2 = _axes(m.mean, m.value(axes1), r), _axes(m.var, m.value(axes2), r)
    if a1 is None or a2 is None:
        return m.fail("ReduceMean axes are not constant", m.mean if a1 is None else m.var)
    if a1 != a2:
        return m.fail(f"mean over axes {a1} but variance over {a2}", m.var)
    if not a1 or a1 != list(range(a1[0], r)):
        return m.fail(f"{_desc(m.mean)} reduces axes {a1}, not a trailing range; LayerNormalization normalizes "
                      f"[axis, rank)", m.mean)
    if not is_scalar(m.value(two), 2.0, rtol=0):
        return m.fail(f"{_desc(m.square)} raises to {m[two].reshape(-1)[:2].tolist()}, not 2", m.square)
    e = scalar(m.value(eps), max_rank=r)
    if e is None or not e > 0:
        return m.fail(f"epsilon {m[eps].reshape(-1)[:2].tolist()} at {_desc(m.add_eps)} is not a positive scalar",
                      m.add_eps)
    norm = [static_dim(m[x], i) for i in a1]
    if any(d is None for d in norm):
        return m.fail(f"normalized dims {norm} of {m[x].name!r} are not static; LayerNormalization's scale and "
                      f"bias need them", m.mean)
    if m[x].dtype is None or m[x].dtype.name not in ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"):
        return m.fail(f"{m[x].name!r} has dtype {m[x].dtype}; LayerNormalization takes float tensors", m.div)
    if m.opset < 17:
        return m.fail(f"model opset {m.opset} < 17 has no LayerNormalization (re-export with opset_version=17 "
                      f"or later)", m.div)
    return None


def _ln_replacement(op, m):
    """(x - mean) / sqrt(var + eps) -> LayerNormalization(x, 1, 0, axis, epsilon)."""
    r = rank(m[x])
    a = _axes(m.mean, m.value(axes1), r)
    shape = [static_dim(m[x], i) for i in a]
    dt = m[x].dtype.to_numpy()
    return op.LayerNormalization(m[x], op.const(np.ones(shape, dt), name="ln_scale"),
                                 op.const(np.zeros(shape, dt), name="ln_bias"), axis=a[0] - r,
                                 epsilon=float(scalar(m.value(eps))), _name=m.div.name or "LayerNormalization")


fuse_layernorm = Rule("fuse_layernorm", ln_pattern, _ln_replacement, check=_ln_check)

# --------------------------------------------------------------------------- affine into gamma / beta
gamma, beta, g, c = Const("gamma"), Var("beta"), Const("g"), Const("c")
ln_node = op.LayerNormalization(x, gamma, op.optional(beta), name="ln")


def _normalized_shape(m) -> tuple | None:
    """Static dims of x over the axes LayerNormalization normalizes, or None."""
    r = rank(m[x])
    if r is None:
        return None
    axis = m.ln.attrs.get("axis", -1)
    dims = [static_dim(m[x], i) for i in range(axis + r if axis < 0 else axis, r)]
    return None if any(d is None for d in dims) else tuple(dims)


def _affine_check(m, const):
    ns = _normalized_shape(m)
    arr = m[const]
    if ns is None:
        return m.fail(f"the normalized dims of {m[x].name!r} are not static", m.ln)
    try:
        fits = np.broadcast_shapes(arr.shape, ns) == ns and np.broadcast_shapes(m[gamma].shape, ns) == ns
    except ValueError:
        fits = False
    if not fits:
        return m.fail(f"constant of shape {list(arr.shape)} does not broadcast within the normalized shape "
                      f"{list(ns)} (it would vary along other axes or widen the output)", m.ln)
    if m.value(beta) is not None and m[beta].constant() is None:
        return m.fail("LayerNormalization's bias is not a constant", m.ln)
    if arr.dtype != m[gamma].dtype:
        return m.fail(f"constant is {arr.dtype}, the scale {m[gamma].dtype}", m.ln)
    return None


def _beta_array(m, shape):
    bv = m.value(beta)
    return np.zeros(shape, m[gamma].dtype) if bv is None else np.broadcast_to(bv.constant(), shape)


def _scale_replacement(op, m):
    """Mul(LayerNormalization(x, γ, β), g) -> LayerNormalization(x, γ·g, β·g)."""
    ns = _normalized_shape(m)
    dt = m[gamma].dtype
    new_g = (np.broadcast_to(m[gamma], ns) * m[g]).astype(dt)
    new_b = (_beta_array(m, ns) * m[g]).astype(dt)
    return op.LayerNormalization(m[x], op.const(new_g, name="ln_scale"), op.const(new_b, name="ln_bias"),
                                 _name=m.ln.name, **m.ln.attrs)


def _shift_replacement(op, m):
    """Add(LayerNormalization(x, γ, β), c) -> LayerNormalization(x, γ, β + c)."""
    ns = _normalized_shape(m)
    dt = m[gamma].dtype
    new_b = (_beta_array(m, ns) + m[c]).astype(dt)
    return op.LayerNormalization(m[x], op.const(np.broadcast_to(m[gamma], ns), name="ln_scale"),
                                 op.const(new_b, name="ln_bias"), _name=m.ln.name, **m.ln.attrs)


absorb_scale_into_layernorm = Rule("absorb_scale_into_layernorm", op.Mul(ln_node, g, name="mul"), _scale_replacement,
                                   check=lambda m: _affine_check(m, g))
absorb_shift_into_layernorm = Rule("absorb_shift_into_layernorm", op.Add(ln_node, c, name="add"), _shift_replacement,
                                   check=lambda m: _affine_check(m, c))

# --------------------------------------------------------------------------- SkipLayerNormalization
a, s = Var("a"), Var("s")
skip_pattern = op.LayerNormalization(op.Add(a, s, name="add"), gamma, op.optional(beta), name="ln")


def _same_shape(u: Value, w: Value) -> bool:
    if rank(u) != 3 or rank(w) != 3:
        return False
    return all(dims_equal(u, i, w, i) for i in range(3))


def _skip_check(m):
    ln = m.ln
    if ln.attrs.get("axis", -1) not in (-1, 2):
        return m.fail(f"{_desc(ln)} normalizes from axis {ln.attrs.get('axis')}; SkipLayerNormalization normalizes "
                      f"the last axis", ln)
    if len(ln.outputs) > 1 and any(o.num_uses or o.is_graph_output() for o in ln.outputs[1:]):
        return m.fail(f"{_desc(ln)}'s mean / inv-std outputs are used", ln)
    if not _same_shape(m[a], m[s]):
        return m.fail(f"cannot prove {m[a].name!r} {m[a].shape} and {m[s].name!r} {m[s].shape} have the same 3-D "
                      f"shape; SkipLayerNormalization does not broadcast the skip input", m.add)
    if m[gamma].ndim != 1:
        return m.fail(f"scale of {_desc(ln)} is not 1-D", ln)
    if m.value(beta) is not None and m[beta].constant() is None:
        return m.fail(f"bias of {_desc(ln)} is not a constant", ln)
    return None


def _bias_of(value: Value) -> tuple[Value, Value] | None:
    """(t, b) when ``value = Add(t, b)`` with a 1-D constant b, read only once."""
    p = value.producer
    if p is None or p.op_type != "Add" or p.domain not in ("", "ai.onnx") or value.num_uses != 1:
        return None
    for t_, b_ in (tuple(p.inputs), tuple(reversed(p.inputs))):
        arr = b_.constant()
        if arr is not None and arr.ndim == 1 and t_.constant() is None and rank(t_) == 3:
            return t_, b_
    return None


def _skip_replacement(op, m):
    """LayerNormalization(Add(a, s), γ, β) -> com.microsoft SkipLayerNormalization(a, s, γ, β[, bias])."""
    ln = m.ln
    inp, skip, bias = m[a], m[s], None
    for first, second in ((m[a], m[s]), (m[s], m[a])):
        got = _bias_of(first)
        if got is not None:
            inp, skip, bias = got[0], second, got[1]
            break
    return op.domain(MS).SkipLayerNormalization(inp, skip, m.value(gamma), m.value(beta), bias,
                                                epsilon=float(ln.attrs.get("epsilon", 1e-5)),
                                                _name=ln.name or "SkipLayerNormalization")


fuse_skip_layernorm = Rule("fuse_skip_layernorm", skip_pattern, _skip_replacement, check=_skip_check)

LAYERNORM_RULES = [fuse_layernorm, absorb_scale_into_layernorm, absorb_shift_into_layernorm]
ORT_RULES = [fuse_skip_layernorm]
RULES = [*LAYERNORM_RULES, *ORT_RULES]
