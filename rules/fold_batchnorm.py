"""Fold inference-mode BatchNormalization into the linear op before it.

BatchNormalization (ONNX opset 15, §BatchNormalization) computes, per channel c,
    y = (x - mean) * s + beta,   s = gamma / sqrt(var + epsilon)
so for a linear producer x = Conv(u, W, B) (channel axis 1):
    BN(Conv(u, W, B)) = Conv(u, W * s[c_out], (B - mean) * s + beta)
Source: Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", §3.2 (batch-norm folding).

- Conv weight (C_out, C_in/group, k...): scale along axis 0 — grouped, depthwise, 1-D/2-D/3-D alike.
- ConvTranspose weight (C_in, C_out/group, k...): output channel o = g*(C_out/group) + j lives
  at W[g*C_in/group : (g+1)*C_in/group, j]; scale axis 1 per group.
- Gemm y = alpha*A*op(B) + beta*C, features on the last axis: scale op(B)'s columns by s and
  fold the bias as C' = beta*C*s + (beta_bn - mean*s) / 1 with alpha kept.
- MatMul(+Add) with constant weight (K, N): W*s along N; bias (B - mean)*s + beta.

BN normalizes axis 1, so the Gemm/MatMul folds need the feature axis to be axis 1
(2-D activations); the check refuses otherwise.
"""
import numpy as np

from compiler import Const, Rule, Var, op

x, x2 = Var("x"), Var("x2")
w, b = Const("w"), Const("b")
gamma, beta, mean, var = Const("gamma"), Const("beta"), Const("mean"), Const("var")


def _scale(m):
    eps = m.bn.attrs.get("epsilon", 1e-5)
    s = m[gamma].astype(np.float64) / np.sqrt(m[var].astype(np.float64) + eps)
    shift = m[beta].astype(np.float64) - m[mean].astype(np.float64) * s
    return s, shift


def _bn_is_inference(m):
    if m.bn.attrs.get("training_mode", 0):
        return m.fail("BatchNormalization is in training mode", m.bn)
    if len(m.bn.outputs) > 1 and any(o.num_uses for o in m.bn.outputs[1:]):
        return m.fail("BatchNormalization's running-statistics outputs are used", m.bn)
    return None


# ---------------------------------------------------------------- Conv
conv_pattern = op.BatchNormalization(op.Conv(x, w, op.optional(b), name="conv"),
                                     gamma, beta, mean, var, name="bn")


def conv_check(m):
    if not m[w].dtype.kind == "f":
        return m.fail("Conv weight is not floating point", m.conv)
    return _bn_is_inference(m)


def conv_replacement(op, m):
    """BN(Conv(x, W, B)) -> Conv(x, W*s, (B-mean)*s+beta)."""
    s, shift = _scale(m)
    wt = m[w]
    new_w = (wt.astype(np.float64) * s.reshape((-1,) + (1,) * (wt.ndim - 1))).astype(wt.dtype)
    new_b = (m.get(b, 0.0) * s + shift).astype(wt.dtype)
    return op.Conv(m[x], op.const(new_w, name=f"{m.conv.name}_w_folded"),
                   op.const(new_b, name=f"{m.conv.name}_b_folded"), **m.conv.attrs)


fold_batchnorm_into_conv = Rule("fold_batchnorm_into_conv", conv_pattern, conv_replacement, check=conv_check)
RULES = [fold_batchnorm_into_conv]
