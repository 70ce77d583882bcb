"""Constant-channel arithmetic: what a per-position op does to a channel that is a known constant.

The analysis tracks, for every carried position, whether its value is the same
for every input (a channel whose producing weights are all zero is its bias; a
BatchNormalization turns that into ``bias * s + shift``). A removed channel that
is a known constant can be compensated exactly in the consumer's bias, and a
known zero needs nothing, which is what makes zero-channel removal exact.
Unknown is NaN; NaN propagates, except that a product with 0 is 0 (activations
are assumed finite).

Formulas follow the ONNX operator definitions (https://onnx.ai/onnx/operators/),
attribute defaults included (HardSigmoid alpha=0.2 beta=0.5, LeakyRelu alpha=0.01,
Elu alpha=1, Selu alpha≈1.6733 gamma≈1.0507).
"""
from __future__ import annotations

import math

import numpy as np

from graft.ir import Node

_erf = np.vectorize(lambda v: math.erf(v) if np.isfinite(v) else (np.nan if np.isnan(v) else math.copysign(1, v)),
                    otypes=[np.float64])


def _attr(node: Node, name: str, default: float) -> float:
    return float(node.attrs.get(name, default))


def _clip(x, node: Node):
    lo, hi = -np.inf, np.inf
    ins = node.inputs
    if len(ins) > 1 or "min" in node.attrs or "max" in node.attrs:
        lo = _attr(node, "min", -np.inf)
        hi = _attr(node, "max", np.inf)
        for i, which in ((1, "lo"), (2, "hi")):
            if len(ins) > i and ins[i] is not None:
                c = ins[i].constant()
                if c is None:
                    return np.full(x.shape, np.nan)
                if which == "lo":
                    lo = float(np.asarray(c).ravel()[0])
                else:
                    hi = float(np.asarray(c).ravel()[0])
    return np.clip(x, lo, hi)


def _gelu(x, node: Node):
    if node.attrs.get("approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


UNARY = {
    "Identity": lambda x, n: x,
    "Dropout": lambda x, n: x,
    "Relu": lambda x, n: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, n: np.where(x < 0, _attr(n, "alpha", 0.01) * x, x),
    "Sigmoid": lambda x, n: 1.0 / (1.0 + np.exp(-x)),
    "HardSigmoid": lambda x, n: np.clip(_attr(n, "alpha", 0.2) * x + _attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / 6.0 + 0.5, 0, 1),
    "Tanh": lambda x, n: np.tanh(x),
    "Erf": lambda x, n: _erf(x),
    "Gelu": _gelu,
    "Abs": lambda x, n: np.abs(x),
    "Neg": lambda x, n: -x,
    "Exp": lambda x, n: np.exp(x),
    "Sqrt": lambda x, n: np.sqrt(np.where(x >= 0, x, np.nan)),
    "Softplus": lambda x, n: np.log1p(np.exp(x)),
    "Softsign": lambda x, n: x / (1 + np.abs(x)),
    "Elu": lambda x, n: np.where(x < 0, _attr(n, "alpha", 1.0) * (np.exp(x) - 1), x),
    "Selu": lambda x, n: _attr(n, "gamma", 1.0507009873554805) * np.where(
        x <= 0, _attr(n, "alpha", 1.6732632423543772) * (np.exp(x) - 1), x),
    "Clip": _clip,
    "Floor": lambda x, n: np.floor(x),
    "Ceil": lambda x, n: np.ceil(x),
    "Round": lambda x, n: np.round(x),
    "Sign": lambda x, n: np.sign(x),
    "Sin": lambda x, n: np.sin(x),
    "Cos": lambda x, n: np.cos(x),
    "Mish": lambda x, n: x * np.tanh(np.log1p(np.exp(x))),
    "Cast": lambda x, n: x,
    "Reciprocal": lambda x, n: np.where(x != 0, 1.0 / np.where(x != 0, x, 1.0), np.nan),
}
# per-position ops whose value the analysis does not compute (bool results, ...): layout passes, cval unknown
UNARY_OPAQUE = {"IsNaN", "IsInf", "Not", "ThresholdedRelu", "Shrink", "Celu", "Log", "Tan", "Asin", "Acos",
                "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "BitwiseNot", "CastLike"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal",
               "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
               "BitwiseAnd", "BitwiseOr", "BitwiseXor"}


def unary(node: Node, x: np.ndarray) -> np.ndarray:
    """``node``'s output for constant input ``x`` (NaN where unknown)."""
    fn = UNARY.get(node.op_type)
    if fn is None:
        return np.full(x.shape, np.nan)
    with np.errstate(all="ignore"):
        if node.op_type == "Cast":
            from graft.ir.dtypes import DataType
            if not DataType(int(node.attrs.get("to", 1))).is_float:
                return np.full(x.shape, np.nan)
        return np.asarray(fn(x, node), dtype=np.float64)


def combine_static(node: Node, vals: list[np.ndarray], statics: list[np.ndarray]) -> np.ndarray:
    """Where the output of n-ary elementwise ``node`` does not depend on the model's input."""
    every = np.logical_and.reduce(statics)
    if node.op_type == "Mul":
        return every | np.logical_or.reduce([v == 0 for v in vals])
    if node.op_type == "Div":
        return every | (vals[0] == 0)
    return every


def combine(node: Node, vals: list[np.ndarray]) -> np.ndarray:
    """Output of n-ary elementwise ``node`` from its operands' constant values (NaN unknown)."""
    op = node.op_type
    with np.errstate(all="ignore"):
        if op in ("Add", "Sum"):
            return np.sum(vals, axis=0)
        if op == "Mean":
            return np.mean(vals, axis=0)
        if op == "Sub":
            return vals[0] - vals[1]
        if op == "Mul":
            out = vals[0] * vals[1]
            return np.where((vals[0] == 0) | (vals[1] == 0), 0.0, out)
        if op == "Div":
            return np.where(vals[0] == 0, 0.0, vals[0] / vals[1])
        if op == "Max":
            return np.max(vals, axis=0)
        if op == "Min":
            return np.min(vals, axis=0)
        if op == "Pow":
            return np.power(vals[0], vals[1])
        if op == "PRelu":
            return np.where(vals[0] < 0, vals[1] * vals[0], vals[0])
        if op == "Where":
            c = vals[0]
            return np.where(np.isnan(c), np.nan, np.where(c != 0, vals[1], vals[2]))
    return np.full(vals[0].shape, np.nan)
