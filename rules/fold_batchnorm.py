"""Fold inference-mode BatchNormalization into the linear op before it.

BatchNormalization (ONNX BatchNormalization-15; also -9/-14) in inference mode
computes, per channel ``c`` of input axis 1,

    y = (x - mean) * s + beta_bn,   s = gamma / sqrt(var + epsilon),  shift = beta_bn - mean * s

i.e. a per-channel affine map ``y = x * s + shift``. When ``x`` comes from a
linear op whose output channel ``c`` is a linear function of its own weight
slice, the scale moves into the weights and the shift into the bias
(Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", §3.2, batch-norm folding):

- Conv-11, weight ``W`` (C_out, C_in/group, k...), bias ``B`` (C_out)::

      BN(Conv(x, W, B)) = Conv(x, W * s[:, None, ...], B * s + shift)

  Output channel ``o`` is produced by ``W[o]`` alone whatever ``group`` is, so
  grouped, depthwise and 1-D/2-D/3-D convolutions fold the same way.

- ConvTranspose-11, weight ``W`` (C_in, C_out/group, k...). Output channel
  ``o = g * (C_out/group) + j`` is produced by ``W[g*C_in/group:(g+1)*C_in/group, j]``::

      W' = (W.reshape(group, C_in/group, C_out/group, k...) * s.reshape(group, 1, C_out/group, 1...))
      BN(ConvTranspose(x, W, B)) = ConvTranspose(x, W'.reshape(W.shape), B * s + shift)

- Gemm-13, ``Y = alpha * A' @ B' + beta * C`` (A' = A^T if transA, B' = B^T if
  transB), Y (M, N), so BN's axis 1 is Gemm's feature axis N::

      BN(Gemm(A, B, C)) = Gemm(A, B' * s[None, :], beta * C * s + shift)   with beta := 1

  (``B * s[None, :]`` when transB = 0, ``B * s[:, None]`` when transB = 1; alpha,
  transA, transB unchanged; an absent C gives ``C' = shift``).

- MatMul-13 with a constant 2-D right operand ``W`` (K, N), optionally followed
  by Add-14 of a constant ``b`` (rank <= 2, broadcastable to (M, N))::

      BN(MatMul(x, W) [+ b]) = MatMul(x, W * s[None, :]) + (b * s + shift)

  MatMul's features are its *last* axis but BN normalizes axis 1; they are the
  same axis only for a 2-D activation ``x`` (M, K). For rank 3 (B, T, K) BN would
  normalize T, so the check refuses any rank but 2, and refuses when the rank
  is not known (give the model value_info or run shape inference first).

Every rule refuses (``m.fail``) a BN in training mode (``training_mode=1``,
BN-6 ``is_test=0``, extra running-statistics outputs), per-activation BN-7
(``spatial=0``), weights or statistics that are not constants, non-float
dtypes, and statistics whose length is not the producer's channel count.
The arithmetic runs in float64 and is cast back to the weight's dtype; the
folded weights are new initializers, so a weight shared with another node is
never changed.
"""
import numpy as np

from graft.compiler.engine import Rule, Var, op
from graft.ir.dtypes import DataType

# Weights and statistics are Vars, not Consts: a non-constant one then reaches the check,
# which refuses with a reason naming it instead of a bare pattern miss.
x, a = Var("x"), Var("a")
w, b = Var("w"), Var("b")
gamma, beta, mean, var = Var("gamma"), Var("beta"), Var("mean"), Var("var")
_STATS = (("scale (gamma)", gamma), ("bias (beta)", beta), ("mean", mean), ("var", var))
_STATS_LABELED = tuple((label, v, f"BatchNormalization {label}") for label, v in _STATS)  # no f-string per fold


_OPERANDS = (w, b, gamma, beta, mean, var)


def _const(m, v):
    """The constant array bound to ``v``, None when absent or not a compile-time constant."""
    # check and replacement ask for each of the six tensors several times: read all of them once
    # per match (a plain attribute of the Match after the first call)
    consts = m.__dict__.get("_consts")
    if consts is not None:
        return consts[v]
    consts = {}
    for u in _OPERANDS:
        value = m.value(u)
        consts[u] = None if value is None else value.constant()
    m.__dict__["_consts"] = consts
    return consts[v]


_FLOAT_DTYPES: dict = {}


def _is_float(arr) -> bool:
    dt = arr.dtype
    got = _FLOAT_DTYPES.get(dt)
    if got is None:
        try:
            got = DataType.from_numpy(dt).is_float
        except Exception:  # a dtype ONNX has no element type for
            got = False
        _FLOAT_DTYPES[dt] = got
    return got


# numpy casts these inside the ufunc loop (ml_dtypes' bfloat16/float8 go through astype)
_NATIVE_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


def _f64(arr):
    """``arr`` where numpy promotes it to float64 by itself in arithmetic with float64, else a float64 copy."""
    return arr if arr.dtype in _NATIVE_FLOATS else arr.astype(np.float64)


def _scaled(wt, factor):
    """``wt * factor`` computed in float64 and rounded once to ``wt.dtype``.

    Same result as ``(wt.astype(float64) * factor).astype(wt.dtype)``, without the two
    full-size temporaries for the numpy float dtypes.
    """
    if wt.dtype in _NATIVE_FLOATS:
        return np.multiply(wt, factor, out=np.empty(wt.shape, wt.dtype), casting="unsafe")
    return (wt.astype(np.float64) * factor).astype(wt.dtype)


def _need_const(m, v, label, node):
    """A Failure unless ``v`` is absent or a float constant."""
    arr = _const(m, v)
    if arr is not None and _FLOAT_DTYPES.get(arr.dtype):  # the usual case, decided in one lookup
        return None
    if arr is None:
        value = m.value(v)
        if value is None:
            return None
        how = "a graph input callers may override" if value.is_graph_input() else "computed at run time"
        return m.fail(f"{label} {value.name!r} of {node.op_type} {node.name!r} is not a constant ({how}); "
                      f"BatchNormalization can only be folded into constant weights", node)
    if not _is_float(arr):
        return m.fail(f"{label} {m.value(v).name!r} of {node.op_type} {node.name!r} has dtype {arr.dtype}; "
                      f"folding needs floating-point tensors", node)
    return None


def _bn_check(m, channels: int):
    """Refusals common to every fold: BN mode, its outputs, and its statistics."""
    bn = m.bn
    if bn.attrs.get("training_mode", 0):
        return m.fail(f"BatchNormalization {bn.name!r} is in training mode (training_mode=1): it normalizes "
                      f"with batch statistics, which cannot be folded into weights", bn)
    if len(bn.outputs) > 1:
        used = [o.name for o in bn.outputs[1:] if o.name and (o.num_uses or o.is_graph_output())]
        if used:
            return m.fail(f"BatchNormalization {bn.name!r}'s running-statistics outputs {used} are used; "
                          f"folding would remove them", bn)
        return m.fail(f"BatchNormalization {bn.name!r} declares running-statistics outputs, which ONNX "
                      f"defines only in training mode; drop them from the node to fold it", bn)
    if m.opset < 7 and not bn.attrs.get("is_test", 0):
        return m.fail(f"BatchNormalization {bn.name!r} (opset {m.opset}) has is_test=0, i.e. training mode", bn)
    if not bn.attrs.get("spatial", 1):
        return m.fail(f"BatchNormalization {bn.name!r} has spatial=0 (per-activation statistics); only "
                      f"per-channel statistics fold into weights", bn)
    want = (channels,)
    for label, v, long_label in _STATS_LABELED:
        bad = _need_const(m, v, long_label, bn)
        if bad is not None:
            return bad
        arr = _const(m, v)
        if arr.shape != want:
            return m.fail(f"BatchNormalization {bn.name!r} {label} has shape {list(arr.shape)}, expected "
                          f"[{channels}] (one entry per output channel of the op it follows)", bn)
    denom = _var_plus_eps(m)
    if denom.size and np.minimum.reduce(denom) <= 0:  # half the cost of (denom <= 0).any(); NaN passes in both
        return m.fail(f"BatchNormalization {bn.name!r} has var + epsilon <= 0 for some channel", bn)
    m.__dict__["_denom"] = denom  # the replacement's _scale reuses it
    return None


def _var_plus_eps(m):
    """``var + epsilon`` in float64 (one op: numpy promotes the statistics itself)."""
    return np.add(_f64(_const(m, var)), np.float64(m.bn.attrs.get("epsilon", 1e-5)))


def _scale(m):
    """(s, shift) in float64: y = x * s + shift per channel."""
    denom = m.__dict__.pop("_denom", None)  # the check's var + epsilon, ours to change
    if denom is None:
        denom = _var_plus_eps(m)
    s = np.divide(_f64(_const(m, gamma)), np.sqrt(denom, out=denom))  # float64: gamma / sqrt(var + eps)
    shift = _f64(_const(m, mean)) * s
    np.subtract(_f64(_const(m, beta)), shift, out=shift)
    return s, shift


def _check_weight(m, node, ndim_min: int, label: str = "weight", bias_label: str = "bias", bias_node=None):
    """Failure unless the weight ``w`` (and bias ``b`` if bound) are float constants; weight rank >= ndim_min."""
    bad = _need_const(m, w, label, node) or _need_const(m, b, bias_label, bias_node or node)
    if bad is not None:
        return bad
    wt = _const(m, w)
    if wt.ndim < ndim_min:
        return m.fail(f"{label} of {node.op_type} {node.name!r} has rank {wt.ndim}, expected >= {ndim_min}", node)
    return None


def _check_channel_bias(m, node, c_out: int):
    """Failure unless the bias ``b`` is absent or has shape (C_out,), as Conv and ConvTranspose
    require of input B (ONNX Conv-11, ConvTranspose-11)."""
    bias = _const(m, b)
    if bias is not None and bias.shape != (c_out,):
        return m.fail(f"{node.op_type} {node.name!r} bias has shape {list(bias.shape)}, expected [{c_out}]", node)
    return None


def _fits_rows(bias, n: int) -> bool:
    """True when ``bias`` is absent or broadcasts onto (M, n) without raising the output's rank:
    rank <= 2 and last dim 1 or n (ONNX unidirectional broadcasting, Gemm-13 input C)."""
    return bias is None or (bias.ndim <= 2 and (bias.ndim == 0 or bias.shape[-1] in (1, n)))


def _label(node) -> str:
    """A name hint for what replaces ``node`` (imported nodes may be unnamed)."""
    return node.name or node.outputs[0].name


def _param_names(m, weight, bias, node) -> tuple[str, str]:
    """Names for the folded weight and bias: after the original parameters where they have
    names (``layer1.conv.weight`` -> ``layer1.conv.weight_folded``, so torch output state dicts
    still read like the user's model), else after the node."""
    wname = m.value(weight).name
    bval = m.value(bias)
    if bval is not None:
        bname = bval.name
    elif wname.endswith("weight"):
        bname = wname[: -len("weight")] + "bias"
    else:
        bname = f"{_label(node)}_bias"
    return f"{wname}_folded", f"{bname}_folded"


def _new_bias(m, s, shift, dtype):
    """``bias * s + shift`` (float64) in ``dtype``; ``shift`` when the op has no bias."""
    bias = _const(m, b)
    if bias is None:
        return shift.astype(dtype)
    out = _f64(bias) * s
    out += shift
    return out.astype(dtype)


# ---------------------------------------------------------------- Conv
conv_pattern = op.BatchNormalization(op.Conv(x, w, op.optional(b), name="conv"),
                                     gamma, beta, mean, var, name="bn")


def conv_check(m):
    bad = _check_weight(m, m.conv, 3)
    if bad is not None:
        return bad
    c_out = _const(m, w).shape[0]
    return _check_channel_bias(m, m.conv, c_out) or _bn_check(m, c_out)


def conv_replacement(op, m):
    """BN(Conv(x, W, B)) -> Conv(x, W*s, B*s + shift)."""
    s, shift = _scale(m)
    wt = _const(m, w)
    new_w = _scaled(wt, s.reshape((-1,) + (1,) * (wt.ndim - 1)))
    wname, bname = _param_names(m, w, b, m.conv)
    return op.Conv(m[x], op.const(new_w, name=wname, copy=False),
                   op.const(_new_bias(m, s, shift, wt.dtype), name=bname, copy=False),
                   _name=_label(m.conv), **m.conv.attrs)


# ---------------------------------------------------------------- ConvTranspose
conv_transpose_pattern = op.BatchNormalization(op.ConvTranspose(x, w, op.optional(b), name="convt"),
                                               gamma, beta, mean, var, name="bn")


def conv_transpose_check(m):
    bad = _check_weight(m, m.convt, 3)
    if bad is not None:
        return bad
    wt = _const(m, w)
    group = int(m.convt.attrs.get("group", 1))
    if group < 1 or wt.shape[0] % group:
        return m.fail(f"ConvTranspose {m.convt.name!r}: weight dim 0 ({wt.shape[0]}) is not divisible by "
                      f"group={group}", m.convt)
    c_out = wt.shape[1] * group
    return _check_channel_bias(m, m.convt, c_out) or _bn_check(m, c_out)


def conv_transpose_replacement(op, m):
    """BN(ConvTranspose(x, W, B)) -> ConvTranspose(x, W scaled per (group, C_out/group), B*s + shift)."""
    s, shift = _scale(m)
    wt = _const(m, w)
    group = int(m.convt.attrs.get("group", 1))
    c_in, c_out_g, kernel = wt.shape[0], wt.shape[1], wt.shape[2:]
    grouped = wt.astype(np.float64).reshape(group, c_in // group, c_out_g, *kernel)
    new_w = (grouped * s.reshape(group, 1, c_out_g, *(1,) * len(kernel))).reshape(wt.shape)
    wname, bname = _param_names(m, w, b, m.convt)
    return op.ConvTranspose(m[x], op.const(new_w.astype(wt.dtype), name=wname),
                            op.const(_new_bias(m, s, shift, wt.dtype), name=bname),
                            _name=_label(m.convt), **m.convt.attrs)


# ---------------------------------------------------------------- Gemm
gemm_pattern = op.BatchNormalization(op.Gemm(a, w, op.optional(b), name="gemm"),
                                     gamma, beta, mean, var, name="bn")


def gemm_check(m):
    bad = _check_weight(m, m.gemm, 2, "B", "C")
    if bad is not None:
        return bad
    wt = _const(m, w)
    if wt.ndim != 2:
        return m.fail(f"Gemm {m.gemm.name!r} B has rank {wt.ndim}, expected 2", m.gemm)
    n = wt.shape[0] if m.gemm.attrs.get("transB", 0) else wt.shape[1]
    bias = _const(m, b)
    if not _fits_rows(bias, n):
        return m.fail(f"Gemm {m.gemm.name!r} C has shape {list(bias.shape)}, not broadcastable to (M, {n})",
                      m.gemm)
    return _bn_check(m, n)


def gemm_replacement(op, m):
    """BN(Gemm(A, B, C)) -> Gemm(A, B' scaled per column, beta*C*s + shift) with beta = 1."""
    s, shift = _scale(m)
    wt = _const(m, w)
    attrs = dict(m.gemm.attrs)
    scale = s[:, None] if attrs.get("transB", 0) else s[None, :]
    new_w = wt.astype(np.float64) * scale
    bias = _const(m, b)
    new_c = shift if bias is None else float(attrs.get("beta", 1.0)) * bias.astype(np.float64) * s + shift
    attrs["beta"] = 1.0
    wname, bname = _param_names(m, w, b, m.gemm)
    return op.Gemm(m[a], op.const(new_w.astype(wt.dtype), name=wname),
                   op.const(new_c.astype(wt.dtype), name=bname),
                   _name=_label(m.gemm), **attrs)


# ---------------------------------------------------------------- MatMul (+ Add)
matmul_pattern = op.BatchNormalization(op.MatMul(x, w, name="matmul"), gamma, beta, mean, var, name="bn")
matmul_add_pattern = op.BatchNormalization(op.Add(op.MatMul(x, w, name="matmul"), b, name="add"),
                                           gamma, beta, mean, var, name="bn")


def _rank(values) -> set:
    return {len(v.shape) for v in values if v is not None and v.shape is not None}


def matmul_check(m):
    add = next((n for n in m.nodes if n.op_type == "Add"), None)
    bad = _check_weight(m, m.matmul, 2, bias_node=add)
    if bad is not None:
        return bad
    wt = _const(m, w)
    if wt.ndim != 2:
        return m.fail(f"MatMul {m.matmul.name!r} weight has rank {wt.ndim}; only a 2-D (K, N) weight folds",
                      m.matmul)
    # x, MatMul output, (Add output,) BN input/output all share the activation's rank.
    ranks = _rank([m[x], m.matmul.output, m.bn.outputs[0], add and add.output])
    if not ranks:
        return m.fail(f"rank of MatMul {m.matmul.name!r}'s input {m[x].name!r} is unknown; BN normalizes "
                      f"axis 1, which is MatMul's feature axis only for 2-D inputs (add value_info or run "
                      f"graft.ir.shapes.infer_shapes(model) first)", m.matmul)
    if ranks != {2}:
        return m.fail(f"MatMul {m.matmul.name!r} activation has rank {sorted(ranks)}, not 2: BN normalizes "
                      f"axis 1 but MatMul's features are on the last axis", m.matmul)
    n = wt.shape[1]
    bias = _const(m, b)
    if not _fits_rows(bias, n):
        return m.fail(f"Add {add.name!r} bias has shape {list(bias.shape)}, not broadcastable to (M, {n}) "
                      f"without changing the output's rank", add)
    return _bn_check(m, n)


def matmul_replacement(op, m):
    """BN(MatMul(x, W) [+ b]) -> MatMul(x, W*s) + (b*s + shift)."""
    s, shift = _scale(m)
    wt = _const(m, w)
    bias = _const(m, b)
    new_w = wt.astype(np.float64) * s[None, :]
    new_b = shift if bias is None else bias.astype(np.float64) * s + shift
    wname, bname = _param_names(m, w, b, m.matmul)
    y = op.MatMul(m[x], op.const(new_w.astype(wt.dtype), name=wname), _name=_label(m.matmul))
    return op.Add(y, op.const(new_b.astype(wt.dtype), name=bname))


fold_batchnorm_into_conv = Rule("fold_batchnorm_into_conv", conv_pattern, conv_replacement, check=conv_check)
fold_batchnorm_into_conv_transpose = Rule("fold_batchnorm_into_conv_transpose", conv_transpose_pattern,
                                          conv_transpose_replacement, check=conv_transpose_check)
fold_batchnorm_into_gemm = Rule("fold_batchnorm_into_gemm", gemm_pattern, gemm_replacement, check=gemm_check)
fold_batchnorm_into_matmul_add = Rule("fold_batchnorm_into_matmul_add", matmul_add_pattern, matmul_replacement,
                                      check=matmul_check)
fold_batchnorm_into_matmul = Rule("fold_batchnorm_into_matmul", matmul_pattern, matmul_replacement,
                                  check=matmul_check)

RULES = [fold_batchnorm_into_conv, fold_batchnorm_into_conv_transpose, fold_batchnorm_into_gemm,
         fold_batchnorm_into_matmul_add, fold_batchnorm_into_matmul]
