"""Fold inference-mode BatchNormalization into the linear op before it.

BatchNormalization (ONNX BatchNormalization-15; also -9/-14, and -7 with
``spatial=1``) in inference mode is a per-channel affine map over input axis 1:

    BN(y) = (y - mean) * s + beta = y * s + shift,   s = gamma / sqrt(var + epsilon),   shift = beta - mean * s

When ``y`` comes from a linear op whose output channel ``c`` is a linear function
of its own weight slice, ``s`` moves into the weights and ``shift`` into the bias
(Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", §3.2, batch-norm folding):

- Conv-11, weight ``W`` (C_out, C_in/group, k...), bias ``B`` (C_out)::

      BN(Conv(x, W, B)) = Conv(x, W * s[:, None, ...], B * s + shift)

  Output channel ``o`` is produced by ``W[o]`` alone whatever ``group`` is, so
  grouped, depthwise and 1-D/2-D/3-D convolutions fold the same way.

- Conv-11 whose weight is a uniform fill ``W = ConstantOfShape(shape, value=c)``
  (how the ONNX backend's ``light_*`` models, and exporters that write weights
  as fills, store them): ``W * s[:, None, ...]`` is ``c * s`` broadcast over
  ``shape``, so it stays a small constant under an Expand-8 instead of
  growing into a dense weight::

      BN(Conv(x, ConstantOfShape(shape, c), B)) = Conv(x, Expand(c * s[:, None, ...], shape), B * s + shift)

- ConvTranspose-11, weight ``W`` (C_in, C_out/group, k...). Output channel
  ``o = g * (C_out/group) + j`` is produced by ``W[g*C_in/group:(g+1)*C_in/group, j]``::

      BN(ConvTranspose(x, W, B)) = ConvTranspose(x, W', B * s + shift),
      W' = W.reshape(group, C_in/group, C_out/group, k...) * s.reshape(group, 1, C_out/group, 1...)

- Gemm-13, ``Y = alpha * A' @ B' + beta * C`` (A' = A^T if transA, B' = B^T if
  transB), Y (M, N), so BN's axis 1 is Gemm's feature axis N::

      BN(Gemm(A, B, C)) = Gemm(A, B' * s[None, :], beta * C * s + shift)   with beta := 1

  (``B * s[None, :]`` when transB = 0, ``B * s[:, None]`` when transB = 1; alpha,
  transA, transB unchanged; an absent C gives ``C' = shift``).

- MatMul-13 with a constant 2-D right operand ``W`` (K, N), optionally followed
  by Add-14 of a constant ``b`` (rank <= 2, broadcastable to (M, N))::

      BN(MatMul(x, W) [+ b]) = MatMul(x, W * s[None, :]) + (b * s + shift)

  MatMul's features are its *last* axis but BN normalizes axis 1; they are the
  same axis only for a 2-D activation ``x`` (M, K), so the check refuses any
  other rank, and a rank it does not know (give the model value_info or run
  shape inference first).

Every rule refuses (``m.fail``) a BN in training mode (``training_mode=1``,
BN-6 ``is_test=0``, extra running-statistics outputs), per-activation BN-7
(``spatial=0``), weights or statistics that are not constants, non-float
dtypes, statistics whose length is not the producer's channel count, and
``var + epsilon <= 0``. The arithmetic runs in float64 and is rounded once to
the weight's dtype; the folded weights are new initializers, so a weight shared
with another node is never changed.
"""
import numpy as np

from graft.compiler.engine import Rule, Var, op

# Weights and statistics are Vars, not Consts: a non-constant one then reaches the check,
# which refuses with a reason naming it instead of a bare pattern miss.
x, a = Var("x"), Var("a")
w, b = Var("w"), Var("b")
gamma, beta, mean, var = Var("gamma"), Var("beta"), Var("mean"), Var("var")

NOT_CONSTANT = "BatchNormalization folds only into constant weights and statistics"


# ---------------------------------------------------------------- the BN side, shared by every fold
def var_plus_eps(m):
    """``var + epsilon`` in float64 (epsilon: BatchNormalization's attribute, default 1e-5)."""
    return m.const(var).astype(np.float64) + m.bn.attrs.get("epsilon", 1e-5)


def scale_shift(m):
    """(s, shift) in float64, one entry per channel: BN(y) = y * s + shift."""
    s = m.const(gamma) / np.sqrt(m.memo(var_plus_eps))
    return s, m.const(beta) - m.const(mean) * s


def float_constants(m, node, *vars_):
    """Failure unless each of ``vars_`` (inputs of ``node``) is absent or a floating-point constant."""
    for v in vars_:
        if m.const(v) is None:
            if m.value(v) is not None:
                return m.need_constant(v, why=NOT_CONSTANT)
        elif not m.dtype(v).is_float:
            return m.fail(f"{v.name} {m.value(v).name!r} of {node.op_type} {node.name!r} has dtype "
                          f"{m.const(v).dtype}; folding needs floating-point tensors", node)
    return None


def bn_check(m, channels: int):
    """Refusals common to every fold: BN's mode, its outputs, and its statistics."""
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
    bad = float_constants(m, bn, gamma, beta, mean, var)
    if bad is not None:
        return bad
    for v in (gamma, beta, mean, var):
        shape = m.const(v).shape
        if shape != (channels,):
            return m.fail(f"BatchNormalization {bn.name!r} {v.name} has shape {list(shape)}, expected "
                          f"[{channels}] (one entry per output channel of the op it follows)", bn)
    bad_channels = np.count_nonzero(m.memo(var_plus_eps) <= 0)
    if bad_channels:
        return m.fail(f"BatchNormalization {bn.name!r} has var + epsilon <= 0 for {bad_channels} channel(s)", bn)
    return None


# ---------------------------------------------------------------- the linear op's side
def weight_check(m, node, min_rank: int):
    """Failure unless the weight (and the bias, when bound) are float constants, weight rank >= min_rank."""
    bad = float_constants(m, node, w, b)
    if bad is not None:
        return bad
    rank = m.const(w).ndim
    if rank < min_rank:
        return m.fail(f"weight of {node.op_type} {node.name!r} has rank {rank}, expected >= {min_rank}", node)
    return None


def channel_bias_check(m, node, c_out: int):
    """Failure unless the bias is absent or has shape (C_out,), as Conv-11 and ConvTranspose-11 require of B."""
    bias = m.const(b)
    if bias is not None and bias.shape != (c_out,):
        return m.fail(f"{node.op_type} {node.name!r} bias has shape {list(bias.shape)}, expected [{c_out}]", node)
    return None


def fits_rows(m, node, n: int):
    """Failure unless the bias is absent or broadcasts onto (M, n) without raising the output's rank:
    rank <= 2 and last dim 1 or n (ONNX unidirectional broadcasting, Gemm-13 input C)."""
    bias = m.const(b)
    if bias is None or (bias.ndim <= 2 and (bias.ndim == 0 or bias.shape[-1] in (1, n))):
        return None
    what = "C" if node.op_type == "Gemm" else "bias"
    return m.fail(f"{node.op_type} {node.name!r} {what} has shape {list(bias.shape)}, not broadcastable to "
                  f"(M, {n}) without changing the output's rank", node)


def new_bias(m, s, shift):
    """``B * s + shift`` in float64; ``shift`` when the op has no bias."""
    bias = m.const(b)
    return shift if bias is None else bias * s + shift


def folded(op, m, node, new_w, new_b):
    """The folded weight and bias as new initializers in the weight's dtype, named after the
    original parameters where they have names (``layer1.conv.weight`` -> ``layer1.conv.weight_folded``,
    so torch output state dicts still read like the user's model), else after ``node``."""
    dtype = m.const(w).dtype
    wname = m.value(w).name
    if m.value(b) is not None:
        bname = m.value(b).name
    elif wname.endswith("weight"):
        bname = wname[: -len("weight")] + "bias"
    else:
        bname = f"{label(node)}_bias"
    # the arrays are this fold's own: handed over without a copy
    return (op.const(new_w.astype(dtype), name=f"{wname}_folded", copy=False),
            op.const(new_b.astype(dtype), name=f"{bname}_folded", copy=False))


def label(node) -> str:
    """A name hint for what replaces ``node`` (imported nodes may be unnamed)."""
    return node.name or node.outputs[0].name


# ---------------------------------------------------------------- Conv
conv_pattern = op.BatchNormalization(op.Conv(x, w, op.optional(b), name="conv"),
                                     gamma, beta, mean, var, name="bn")


def conv_check(m):
    bad = weight_check(m, m.conv, 3)
    if bad is not None:
        return bad
    c_out = m.const(w).shape[0]
    return channel_bias_check(m, m.conv, c_out) or bn_check(m, c_out)


def conv_replacement(op, m):
    """BN(Conv(x, W, B)) -> Conv(x, W*s, B*s + shift)."""
    s, shift = scale_shift(m)
    weight = m.const(w)
    new_w, new_b = folded(op, m, m.conv, weight * s.reshape(-1, *[1] * (weight.ndim - 1)), new_bias(m, s, shift))
    return op.Conv(m[x], new_w, new_b, _name=label(m.conv), **m.conv.attrs)


# ---------------------------------------------------------------- Conv of a uniform fill
fill_shape = Var("fill_shape")
conv_fill_pattern = op.BatchNormalization(
    op.Conv(x, op.ConstantOfShape(fill_shape, name="fill"), op.optional(b), name="conv"),
    gamma, beta, mean, var, name="bn")


def fill_value(m) -> np.ndarray:
    """ConstantOfShape's ``value`` (a one-element tensor; absent means float32 0.0, ConstantOfShape-9)."""
    value = m.fill.attrs.get("value")
    return np.zeros(1, np.float32) if value is None else value.array.reshape(-1)


def conv_fill_check(m):
    shape = m.const(fill_shape)
    if shape is None:
        return m.need_constant(fill_shape, why="the weight's shape must be known to fold BatchNormalization")
    if shape.ndim != 1 or shape.size < 3 or np.any(shape <= 0):
        return m.fail(f"ConstantOfShape {m.fill.name!r} makes a weight of shape {shape.tolist()}; a Conv weight "
                      f"has rank >= 3 and positive dims", m.fill)
    if fill_value(m).dtype.kind != "f":
        return m.fail(f"ConstantOfShape {m.fill.name!r} fills with dtype {fill_value(m).dtype}; folding needs "
                      f"a floating-point weight", m.fill)
    c_out = int(shape[0])
    return channel_bias_check(m, m.conv, c_out) or float_constants(m, m.conv, b) or bn_check(m, c_out)


def conv_fill_replacement(op, m):
    """BN(Conv(x, ConstantOfShape(shape, c), B)) -> Conv(x, Expand(c * s[:, None, ...], shape), B*s + shift)."""
    s, shift = scale_shift(m)
    c = fill_value(m)
    shape = m.const(fill_shape)
    scaled = (c.astype(np.float64) * s).reshape(-1, *[1] * (len(shape) - 1)).astype(c.dtype)
    bias = new_bias(m, s, shift).astype(c.dtype)
    name = label(m.conv)
    weight = op.Expand(op.const(scaled, name=f"{name}_weight_scale_folded", copy=False), m[fill_shape],
                       _name=f"{name}_weight_folded")
    return op.Conv(m[x], weight, op.const(bias, name=f"{name}_bias_folded", copy=False), _name=name,
                   **m.conv.attrs)


# ---------------------------------------------------------------- ConvTranspose
conv_transpose_pattern = op.BatchNormalization(op.ConvTranspose(x, w, op.optional(b), name="convt"),
                                               gamma, beta, mean, var, name="bn")


def conv_transpose_check(m):
    bad = weight_check(m, m.convt, 3)
    if bad is not None:
        return bad
    c_in, c_out_g = m.const(w).shape[:2]
    group = int(m.convt.attrs.get("group", 1))
    if group < 1 or c_in % group:
        return m.fail(f"ConvTranspose {m.convt.name!r}: weight dim 0 ({c_in}) is not divisible by "
                      f"group={group}", m.convt)
    c_out = c_out_g * group
    return channel_bias_check(m, m.convt, c_out) or bn_check(m, c_out)


def conv_transpose_replacement(op, m):
    """BN(ConvTranspose(x, W, B)) -> ConvTranspose(x, W scaled per (group, C_out/group), B*s + shift)."""
    s, shift = scale_shift(m)
    weight = m.const(w)
    group = int(m.convt.attrs.get("group", 1))
    c_in, c_out_g, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    grouped = weight.reshape(group, c_in // group, c_out_g, *kernel)
    new_w = (grouped * s.reshape(group, 1, c_out_g, *[1] * len(kernel))).reshape(weight.shape)
    new_w, new_b = folded(op, m, m.convt, new_w, new_bias(m, s, shift))
    return op.ConvTranspose(m[x], new_w, new_b, _name=label(m.convt), **m.convt.attrs)


# ---------------------------------------------------------------- Gemm
gemm_pattern = op.BatchNormalization(op.Gemm(a, w, op.optional(b), name="gemm"),
                                     gamma, beta, mean, var, name="bn")


def gemm_check(m):
    bad = weight_check(m, m.gemm, 2)
    if bad is not None:
        return bad
    weight = m.const(w)
    if weight.ndim != 2:
        return m.fail(f"Gemm {m.gemm.name!r} B has rank {weight.ndim}, expected 2", m.gemm)
    n = weight.shape[0] if m.gemm.attrs.get("transB", 0) else weight.shape[1]
    return fits_rows(m, m.gemm, n) or bn_check(m, n)


def gemm_replacement(op, m):
    """BN(Gemm(A, B, C)) -> Gemm(A, B' scaled per column, beta*C*s + shift) with beta = 1."""
    s, shift = scale_shift(m)
    attrs = dict(m.gemm.attrs)
    new_w = m.const(w) * (s[:, None] if attrs.get("transB", 0) else s[None, :])
    bias = m.const(b)
    # C in float64 first: a Python float times a float32 array would stay float32
    new_c = shift if bias is None else float(attrs.get("beta", 1.0)) * bias.astype(np.float64) * s + shift
    attrs["beta"] = 1.0
    new_w, new_c = folded(op, m, m.gemm, new_w, new_c)
    return op.Gemm(m[a], new_w, new_c, _name=label(m.gemm), **attrs)


# ---------------------------------------------------------------- MatMul (+ Add)
matmul_pattern = op.BatchNormalization(op.MatMul(x, w, name="matmul"), gamma, beta, mean, var, name="bn")
matmul_add_pattern = op.BatchNormalization(op.Add(op.MatMul(x, w, name="matmul"), b, name="add"),
                                           gamma, beta, mean, var, name="bn")


def matmul_check(m):
    bad = weight_check(m, m.matmul, 2)
    if bad is not None:
        return bad
    weight = m.const(w)
    if weight.ndim != 2:
        return m.fail(f"MatMul {m.matmul.name!r} weight has rank {weight.ndim}; only a 2-D (K, N) weight folds",
                      m.matmul)
    # x, the MatMul output, the Add output and BN's output all have the activation's rank
    add = next((n for n in m.nodes if n.op_type == "Add"), None)
    values = [m[x], m.matmul.output, m.bn.outputs[0], add and add.output]
    ranks = {len(v.shape) for v in values if v is not None and v.shape is not None}
    if not ranks:
        return m.fail(f"rank of MatMul {m.matmul.name!r}'s input {m[x].name!r} is unknown; BN normalizes "
                      f"axis 1, which is MatMul's feature axis only for 2-D inputs (add value_info or run "
                      f"graft.ir.shapes.infer_shapes(model) first)", m.matmul)
    if ranks != {2}:
        return m.fail(f"MatMul {m.matmul.name!r} activation has rank {sorted(ranks)}, not 2: BN normalizes "
                      f"axis 1 but MatMul's features are on the last axis", m.matmul)
    n = weight.shape[1]
    return (fits_rows(m, add, n) if add is not None else None) or bn_check(m, n)


def matmul_replacement(op, m):
    """BN(MatMul(x, W) [+ b]) -> MatMul(x, W*s) + (b*s + shift)."""
    s, shift = scale_shift(m)
    new_w, new_b = folded(op, m, m.matmul, m.const(w) * s[None, :], new_bias(m, s, shift))
    return op.Add(op.MatMul(m[x], new_w, _name=label(m.matmul)), new_b)


fold_batchnorm_into_conv = Rule("fold_batchnorm_into_conv", conv_pattern, conv_replacement, check=conv_check)
fold_batchnorm_into_conv_of_fill = Rule("fold_batchnorm_into_conv_of_fill", conv_fill_pattern, conv_fill_replacement,
                                        check=conv_fill_check)
fold_batchnorm_into_conv_transpose = Rule("fold_batchnorm_into_conv_transpose", conv_transpose_pattern,
                                          conv_transpose_replacement, check=conv_transpose_check)
fold_batchnorm_into_gemm = Rule("fold_batchnorm_into_gemm", gemm_pattern, gemm_replacement, check=gemm_check)
fold_batchnorm_into_matmul_add = Rule("fold_batchnorm_into_matmul_add", matmul_add_pattern, matmul_replacement,
                                      check=matmul_check)
fold_batchnorm_into_matmul = Rule("fold_batchnorm_into_matmul", matmul_pattern, matmul_replacement,
                                  check=matmul_check)

RULES = [fold_batchnorm_into_conv, fold_batchnorm_into_conv_of_fill, fold_batchnorm_into_conv_transpose,
         fold_batchnorm_into_gemm, fold_batchnorm_into_matmul_add, fold_batchnorm_into_matmul]
