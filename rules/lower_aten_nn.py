"""Lower ATen neural-network ops to ONNX (opset 18): convolution, normalization, linear
algebra, attention, pooling, dropout and activations.

Each rule replaces one ``aten`` node by ONNX ops computing the same values:

- ``conv{1,2,3}d`` / ``convolution`` / ``conv_transpose*``: Conv / ConvTranspose; torch's
  symmetric ``padding=p`` is ONNX ``pads=[p..., p...]``; ``padding="same"`` pads
  ``total = d*(k-1)``, ``total//2`` at the start (torch puts the odd element at the end).
  An unbatched ``[C, *spatial]`` input (torch takes it, ONNX does not) runs as a batch of one
  (Unsqueeze / Squeeze), for pooling too.
- ``batch_norm`` (inference) / ``_native_batch_norm_legit_no_training``: BatchNormalization
  (``weight``/``bias`` default to 1/0), so ``fold_batchnorm_into_conv`` applies afterwards.
- ``linear(x, W, b) = x @ W^T + b``: Gemm(transB=1) for 2-D x, else MatMul(x, W^T) + b, W^T a
  transposed initializer that the torch backend turns back into W (see ``lower_aten_util.permuted``);
  ``addmm(C, A, B, beta, alpha) = beta*C + alpha*A@B``: Gemm; ``mm``/``bmm``/``matmul``: MatMul.
- ``layer_norm``: LayerNormalization(axis = -len(normalized_shape)); ``group_norm``:
  InstanceNormalization over ``[N, G, C/G*spatial]`` (per-group mean/variance), then the
  per-channel affine; ``embedding``: Gather(weight, indices, axis=0).
- ``scaled_dot_product_attention(q, k, v) = softmax(q k^T * scale + mask) v``,
  ``scale = 1/sqrt(E)`` by default; a bool mask keeps positions where it is True
  (others get -inf); ``is_causal`` keeps the lower triangle, key position <= query position
  (Vaswani et al. 2017, §3.2.1); with run-time sequence lengths the mask is built with Range.
- pooling: MaxPool / AveragePool (``stride=[]`` means stride = kernel); adaptive average/max
  pooling to 1 is GlobalAveragePool/GlobalMaxPool, to a divisor of the input size an
  AveragePool/MaxPool, otherwise each output reduces the window ``[floor(i*D/s), ceil((i+1)*D/s))``
  (PyTorch's adaptive pooling windows), one axis at a time since the windows are separable.
- ``gelu(x) = x/2 * (1 + erf(x/sqrt 2))``; ``approximate="tanh"``:
  ``x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`` (Hendrycks & Gimpel 2016, §2);
  ``silu(x) = x * sigmoid(x)``; ``hardswish`` = HardSwish, ``hardsigmoid`` = HardSigmoid(1/6, 1/2),
  ``hardtanh``/``relu6``: Clip; ``dropout`` (eval): the input itself.
"""
from __future__ import annotations

import math

import numpy as np

from graft.ir import DataType
from graft.rules.lower_aten_util import cast, const, ints, lowering, out_dtype, permuted, rank, refuse, static_dim


def _expand(v, n: int) -> list[int]:
    if v is None:
        return [0] * n
    if hasattr(v, "shape") and not isinstance(v, (list, tuple, int)):
        refuse("a run-time (symbolic) value where a static list is needed")
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


def _inputs(*vals):
    """Positional inputs without trailing absent ones."""
    vals = list(vals)
    while vals and vals[-1] is None:
        vals.pop()
    return vals


def passthrough(op, x, node):
    """``x`` itself (the lowering wrapper adds an Identity when the node's output is a graph output)."""
    return x


def _batched(op, x, k: int, build):
    """``build(x)`` on a batched input: torch's conv/pool layers also take an unbatched ``[C, *spatial]``
    input (rank k+1), which ONNX's Conv/pool ops cannot; it is run as a batch of one."""
    r = rank(x)
    if r == k + 2:
        return build(x)
    if r != k + 1:
        refuse(f"input of rank {r} for a {k}-D op")
    zero = ints(op, [0])
    return op.Squeeze(build(op.Unsqueeze(x, zero)), zero)


def _only_first_output(node, what: str) -> None:
    if len(node.outputs) > 1 and any(o.num_uses or o.is_graph_output() for o in node.outputs[1:]):
        refuse(f"{what} is used")


# --------------------------------------------------------------------------- convolution
def _conv_pads(padding, w, dilation, k: int) -> list[int]:
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * (2 * k)
        begin, end = [], []
        for i in range(k):
            total = dilation[i] * (static_dim(w, 2 + i) - 1)
            begin.append(total // 2)
            end.append(total - total // 2)
        return begin + end
    p = _expand(padding, k)
    return p + p


def conv(op, a, n):
    """conv{1,2,3}d(x, W, b, stride, padding, dilation, groups) -> Conv."""
    x, w, b = a["input"], a["weight"], a["bias"]
    k = rank(w) - 2
    dil = _expand(a["dilation"], k)
    return _batched(op, x, k, lambda x: op.Conv(*_inputs(x, w, b), strides=_expand(a["stride"], k),
                                                pads=_conv_pads(a["padding"], w, dil, k), dilations=dil,
                                                group=a["groups"]))


def conv_transpose(op, a, n):
    """conv_transpose{1,2,3}d(x, W, b, stride, padding, output_padding, groups, dilation) -> ConvTranspose."""
    x, w, b = a["input"], a["weight"], a["bias"]
    k = rank(w) - 2
    p = _expand(a["padding"], k)
    return _batched(op, x, k, lambda x: op.ConvTranspose(*_inputs(x, w, b), strides=_expand(a["stride"], k),
                                                         pads=p + p, dilations=_expand(a["dilation"], k),
                                                         group=a["groups"],
                                                         output_padding=_expand(a["output_padding"], k)))


def convolution(op, a, n):
    """convolution(x, W, b, stride, padding, dilation, transposed, output_padding, groups) -> Conv/ConvTranspose."""
    if a["transposed"]:
        return conv_transpose(op, a, n)
    return conv(op, a, n)


# --------------------------------------------------------------------------- normalization
def _affine_defaults(op, x, c_or_shape, weight, bias):
    dt = x.dtype or DataType.FLOAT
    shape = c_or_shape if isinstance(c_or_shape, (list, tuple)) else [c_or_shape]
    w = weight if weight is not None else const(op, np.ones(shape), dt)
    b = bias if bias is not None else const(op, np.zeros(shape), dt)
    return w, b


def batch_norm(op, a, n):
    """batch_norm(x, weight, bias, running_mean, running_var, training=False, eps) -> BatchNormalization."""
    if a.get("training"):
        refuse("BatchNorm in training mode (capture the model in eval mode)")
    _only_first_output(n, "the saved mean/invstd output")
    x, mean, var = a["input"], a["running_mean"], a["running_var"]
    if mean is None or var is None:
        refuse("BatchNorm without running statistics")
    w, b = _affine_defaults(op, x, static_dim(mean, 0), a["weight"], a["bias"])
    return op.BatchNormalization(x, w, b, mean, var, epsilon=float(a["eps"]))


def layer_norm(op, a, n):
    """layer_norm(x, normalized_shape, weight, bias, eps) -> LayerNormalization(axis=-len(shape))."""
    x, shape = a["input"], a["normalized_shape"]
    if not isinstance(shape, list):
        refuse("normalized_shape known only at run time")
    w = a["weight"] if a["weight"] is not None else const(op, np.ones(shape), x.dtype or DataType.FLOAT)
    return op.LayerNormalization(*_inputs(x, w, a["bias"]), axis=-len(shape), epsilon=float(a["eps"]),
                                 _outputs=len(n.outputs))


def group_norm(op, a, n):
    """group_norm(x, G, weight, bias, eps): per-group InstanceNormalization, then weight * y + bias per channel."""
    _only_first_output(n, "the mean/rstd output")
    x = a["input"]
    g = a["num_groups"] if "num_groups" in a else a["group"]
    dt = x.dtype or DataType.FLOAT
    r = rank(x)
    y = op.Reshape(x, ints(op, [0, g, -1]))
    y = op.InstanceNormalization(y, const(op, np.ones(g), dt), const(op, np.zeros(g), dt), epsilon=float(a["eps"]))
    y = op.Reshape(y, op.Shape(x))
    spatial = ints(op, list(range(1, r - 1)))
    if a["weight"] is not None:
        y = op.Mul(y, op.Unsqueeze(a["weight"], spatial) if r > 2 else a["weight"])
    if a["bias"] is not None:
        y = op.Add(y, op.Unsqueeze(a["bias"], spatial) if r > 2 else a["bias"])
    return y


def embedding(op, a, n):
    """embedding(weight, indices) -> Gather(weight, indices, axis=0)."""
    return op.Gather(a["weight"], a["indices"], axis=0)


# --------------------------------------------------------------------------- linear algebra
def linear(op, a, n):
    """linear(x, W, b) = x @ W^T + b."""
    x, w, b = a["input"], a["weight"], a["bias"]
    if rank(x) == 2 and rank(w) == 2:
        return op.Gemm(*_inputs(x, w, b), transB=1)
    y = op.MatMul(x, permuted(op, w, [1, 0]) if rank(w) == 2 else w)
    return op.Add(y, b) if b is not None else y


def addmm(op, a, n):
    """addmm(C, A, B, beta, alpha) = beta*C + alpha*(A @ B) -> Gemm."""
    return op.Gemm(a["mat1"], a["mat2"], a["self"], alpha=float(a["alpha"]), beta=float(a["beta"]))


def matmul(op, a, n):
    """mm / bmm / matmul -> MatMul."""
    other = a.get("other", a.get("mat2"))
    return op.MatMul(a["self"], other)


def sdpa(op, a, n):
    """scaled_dot_product_attention(q, k, v, mask, dropout_p=0, is_causal, scale) -> MatMul/Softmax/MatMul."""
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if a["dropout_p"]:
        refuse("attention dropout_p > 0")
    if a.get("enable_gqa"):
        refuse("grouped-query attention (enable_gqa=True)")
    dt = q.dtype or DataType.FLOAT
    r = rank(k)
    perm = list(range(r - 2)) + [r - 1, r - 2]
    if a["scale"] is not None or _is_static(q, -1):
        s = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(static_dim(q, -1))
        scale = const(op, np.array(s), dt)
    else:  # head size known only at run time: 1/sqrt(E) from the shape
        scale = op.Reciprocal(op.Sqrt(op.Cast(_dim_of(op, q, -1), to=int(dt))))
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=perm)), scale)
    neg_inf = const(op, np.array(-np.inf), dt)
    if a["is_causal"]:
        if _is_static(q, -2) and _is_static(k, -2):
            keep = const(op, np.tril(np.ones((static_dim(q, -2), static_dim(k, -2)), dtype=bool)))
        else:  # torch's causal mask is tril(ones(L, S)): key position <= query position
            zero, one = const(op, np.array(0), DataType.INT64), const(op, np.array(1), DataType.INT64)
            rows = op.Range(zero, _dim_of(op, q, -2), one)
            cols = op.Range(zero, _dim_of(op, k, -2), one)
            keep = op.LessOrEqual(op.Unsqueeze(cols, ints(op, [0])), op.Unsqueeze(rows, ints(op, [1])))
        scores = op.Where(keep, scores, neg_inf)
    if mask is not None:
        if mask.dtype == DataType.BOOL:
            scores = op.Where(mask, scores, neg_inf)
        else:
            scores = op.Add(scores, cast(op, mask, dt))
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def _is_static(v, i: int) -> bool:
    return v.shape is not None and -len(v.shape) <= i < len(v.shape) and isinstance(v.shape[i], int)


def _dim_of(op, v, i: int):
    """Dim ``i`` of ``v`` at run time, a 0-d int64."""
    return op.Gather(op.Shape(v), const(op, np.array(i), DataType.INT64), axis=0)


# --------------------------------------------------------------------------- pooling
def max_pool(op, a, n):
    """max_pool{1,2,3}d(x, kernel, stride, padding, dilation, ceil_mode) -> MaxPool."""
    _only_first_output(n, "the indices output")
    x = a["self"]
    kern = list(a["kernel_size"])
    k = len(kern)
    stride = _expand(a["stride"], k) if a["stride"] else kern
    p = _expand(a["padding"], k)
    return _batched(op, x, k, lambda x: op.MaxPool(x, kernel_shape=kern, strides=stride, pads=p + p,
                                                   dilations=_expand(a["dilation"], k),
                                                   ceil_mode=int(bool(a["ceil_mode"]))))


def avg_pool(op, a, n):
    """avg_pool{1,2,3}d(x, kernel, stride, padding, ceil_mode, count_include_pad) -> AveragePool."""
    if a.get("divisor_override") is not None:
        refuse("divisor_override")
    x = a["self"]
    kern = _expand(a["kernel_size"], 1) if not isinstance(a["kernel_size"], list) else list(a["kernel_size"])
    k = len(kern)
    stride = _expand(a["stride"], k) if a["stride"] else kern
    p = _expand(a["padding"], k)
    return _batched(op, x, k, lambda x: op.AveragePool(x, kernel_shape=kern, strides=stride, pads=p + p,
                                                       ceil_mode=int(bool(a["ceil_mode"])),
                                                       count_include_pad=int(bool(a["count_include_pad"]))))


def _adaptive(op, a, n, kind: str):
    x, size = a["self"], list(a["output_size"])
    k = len(size)
    r = rank(x)
    reduce_op, global_op, pool_op = (op.ReduceMean, op.GlobalAveragePool, op.AveragePool) if kind == "avg" else \
        (op.ReduceMax, op.GlobalMaxPool, op.MaxPool)
    if all(s == 1 for s in size):
        if r == k + 2:
            return global_op(x)
        return reduce_op(x, ints(op, list(range(r - k, r))), keepdims=1)
    dims = [static_dim(x, r - k + i) for i in range(k)]
    if all(d % s == 0 for d, s in zip(dims, size)):
        kern = [d // s for d, s in zip(dims, size)]
        return _batched(op, x, k, lambda x: pool_op(x, kernel_shape=kern, strides=kern))
    # windows [floor(i*D/s), ceil((i+1)*D/s)) are a product of per-axis ranges, so the pooling is
    # separable: reduce each window along one axis at a time
    y = x
    for i, (d, s) in enumerate(zip(dims, size)):
        ax = r - k + i
        if d == s:
            continue
        pieces = [reduce_op(op.Slice(y, ints(op, [j * d // s]), ints(op, [-(-(j + 1) * d // s)]), ints(op, [ax])),
                            ints(op, [ax]), keepdims=1) for j in range(s)]
        y = op.Concat(*pieces, axis=ax)
    return y


def adaptive_avg_pool(op, a, n):
    """adaptive_avg_pool{1,2,3}d(x, output_size): GlobalAveragePool for 1, AveragePool for exact divisors,
    else the mean of each window [floor(i*D/s), ceil((i+1)*D/s)) (Slice + ReduceMean, axis by axis)."""
    return _adaptive(op, a, n, "avg")


def adaptive_max_pool(op, a, n):
    """adaptive_max_pool{1,2,3}d(x, output_size) (indices unused): GlobalMaxPool / MaxPool / per-window ReduceMax."""
    _only_first_output(n, "the indices output")
    return _adaptive(op, a, n, "max")


# --------------------------------------------------------------------------- activations
def dropout(op, a, n):
    """dropout(x, p, train=False) -> x (inference)."""
    if a.get("train"):
        refuse("dropout in training mode (capture the model in eval mode)")
    _only_first_output(n, "the dropout mask output")
    return passthrough(op, a["input"], n)


def _c(op, x, value):
    return const(op, np.array(value), x.dtype or DataType.FLOAT)


def gelu(op, a, n):
    """gelu(x, approximate): erf form or tanh approximation."""
    x = a["self"]
    if a.get("approximate", "none") == "tanh":
        inner = op.Mul(_c(op, x, math.sqrt(2.0 / math.pi)),
                       op.Add(x, op.Mul(_c(op, x, 0.044715), op.Mul(op.Mul(x, x), x))))
        return op.Mul(op.Mul(_c(op, x, 0.5), x), op.Add(_c(op, x, 1.0), op.Tanh(inner)))
    # the erf form in torch.onnx's order, so graft's Gelu fusions recognize it
    e = op.Erf(op.Div(x, _c(op, x, math.sqrt(2.0))))
    return op.Mul(op.Mul(x, op.Add(e, _c(op, x, 1.0))), _c(op, x, 0.5))


def silu(op, a, n):
    """silu(x) = x * sigmoid(x)."""
    x = a["self"]
    return op.Mul(x, op.Sigmoid(x))


def hardtanh(op, a, n):
    """hardtanh(x, min, max) / relu6 -> Clip."""
    x = a["self"]
    lo, hi = a.get("min_val", 0.0), a.get("max_val", 6.0)
    return op.Clip(x, _c(op, x, lo), _c(op, x, hi))


def hardsigmoid(op, a, n):
    """hardsigmoid(x) = clip(x/6 + 1/2, 0, 1)."""
    return op.HardSigmoid(a["self"], alpha=1.0 / 6.0, beta=0.5)


def softmax(op, a, n):
    """softmax(x, dim[, dtype]) -> Softmax(axis=dim) (LogSoftmax for log_softmax)."""
    x = a["self"]
    dt = out_dtype(n)
    x = cast(op, x, dt)
    if "log" in n.op_type:
        return op.LogSoftmax(x, axis=a["dim"])
    return op.Softmax(x, axis=a["dim"])


def leaky_relu(op, a, n):
    """leaky_relu(x, slope) -> LeakyRelu(alpha=slope)."""
    return op.LeakyRelu(a["self"], alpha=float(a["negative_slope"]))


def elu(op, a, n):
    """elu(x, alpha, scale=1, input_scale=1) -> Elu."""
    if a["scale"] != 1 or a["input_scale"] != 1:
        refuse("elu with scale/input_scale != 1")
    return op.Elu(a["self"], alpha=float(a["alpha"]))


def softplus(op, a, n):
    """softplus(x, beta=1) -> Softplus (torch's linear region above `threshold` agrees in float)."""
    if a["beta"] != 1:
        refuse("softplus with beta != 1")
    return op.Softplus(a["self"])


def _simple(onnx_op: str, **attrs):
    def lower(op, a, n):
        return getattr(op, onnx_op)(a["self"], **attrs)
    lower.__name__ = onnx_op.lower()
    lower.__doc__ = f"{onnx_op}(x)"
    return lower


RULES = [
    *lowering(["conv1d.default", "conv2d.default", "conv3d.default",
               "conv1d.padding", "conv2d.padding", "conv3d.padding"], conv),
    *lowering("convolution.default", convolution),
    *lowering(["conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input"], conv_transpose),
    *lowering(["batch_norm.default", "_native_batch_norm_legit_no_training.default"], batch_norm),
    *lowering(["layer_norm.default", "native_layer_norm.default"], layer_norm),
    *lowering(["group_norm.default", "native_group_norm.default"], group_norm),
    *lowering("embedding.default", embedding),
    *lowering("linear.default", linear),
    *lowering("addmm.default", addmm),
    *lowering(["mm.default", "bmm.default", "matmul.default"], matmul),
    *lowering("scaled_dot_product_attention.default", sdpa),
    *lowering(["max_pool1d.default", "max_pool2d.default", "max_pool3d.default",
               "max_pool2d_with_indices.default", "max_pool3d_with_indices.default"], max_pool),
    *lowering(["avg_pool1d.default", "avg_pool2d.default", "avg_pool3d.default"], avg_pool),
    *lowering(["adaptive_avg_pool1d.default", "adaptive_avg_pool2d.default", "adaptive_avg_pool3d.default",
               "_adaptive_avg_pool2d.default", "_adaptive_avg_pool3d.default"], adaptive_avg_pool),
    *lowering(["adaptive_max_pool1d.default", "adaptive_max_pool2d.default", "adaptive_max_pool3d.default"],
              adaptive_max_pool),
    *lowering(["dropout.default", "native_dropout.default", "feature_dropout.default",
               "alpha_dropout.default"], dropout),
    *lowering("gelu.default", gelu),
    *lowering("silu.default", silu),
    *lowering(["hardtanh.default", "relu6.default"], hardtanh),
    *lowering("hardsigmoid.default", hardsigmoid),
    *lowering(["softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default"], softmax),
    *lowering("leaky_relu.default", leaky_relu),
    *lowering("elu.default", elu),
    *lowering("softplus.default", softplus),
    *lowering("relu.default", _simple("Relu")),
    *lowering("sigmoid.default", _simple("Sigmoid")),
    *lowering("tanh.default", _simple("Tanh")),
    *lowering("hardswish.default", _simple("HardSwish")),
    *lowering("mish.default", _simple("Mish")),
]
