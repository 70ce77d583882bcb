"""Fuse the GELU activations exporters decompose into onnxruntime's ``com.microsoft`` ops.

GELU (Hendrycks & Gimpel 2016, "Gaussian Error Linear Units", §2) and its approximations::

    Gelu(x)      = x · Φ(x) = ½ · x · (1 + erf(x / √2))                         -> com.microsoft Gelu
    FastGelu(x)  = ½ · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))              -> com.microsoft FastGelu
    QuickGelu(x) = x · sigmoid(α · x)     (α = 1.702 in CLIP's quick_gelu)      -> com.microsoft QuickGelu(alpha=α)

TorchScript writes ``(x · (1 + erf(x/√2))) · ½``, the dynamo exporter ``x · (½ · (1 + erf(x/√2)))``
and hand-written code often ``(½ · x) · (1 + erf(x/√2))``: one rule per association
(``fuse_gelu_erf``, ``fuse_gelu_erf_half_e``, ``fuse_gelu_erf_half_x``, and the same three for
tanh). ``x/√2`` may be a Div by √2 or a Mul by 1/√2; ``x³`` a Pow(x, 3) or x·(x·x). Constants
compare up to broadcasting and float32 rounding (:func:`graft.rules.fuse_facts.is_scalar`).

BiasGelu: a Gelu of ``Add(t, b)`` with a 1-D constant ``b`` over the last axis becomes
``com.microsoft BiasGelu(t, b)``, and FastGelu takes the bias as its second input (the same sum,
done inside the kernel).

Sources: onnxruntime docs/ContribOperators.md (com.microsoft Gelu, FastGelu, BiasGelu, QuickGelu,
version 1); Hendrycks & Gimpel 2016 eq. for the tanh approximation; ONNX Erf-13, Tanh-13,
Sigmoid-13.
"""
from __future__ import annotations

import math

from graft.compiler.engine import Const, Rule, Var, op
from graft.ir import Node, Value
from graft.rules.fuse_facts import is_scalar, rank, scalar

MS = "com.microsoft"
SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715

x, z = Var("x"), Var("z")
half, one = Const("half"), Const("one")


def _desc(node: Node | None) -> str:
    if node is None:
        return "a graph input"
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} (output {node.outputs[0].name!r})"


def _scaled(value: Value, xv: Value, factor: float) -> bool:
    """True when ``value`` is ``xv · factor`` (Mul by the factor or Div by its inverse)."""
    p = value.producer
    if p is None or p.domain not in ("", "ai.onnx") or len(p.inputs) != 2:
        return False
    a, b = p.inputs
    if p.op_type == "Mul":
        return (a is xv and is_scalar(b, factor)) or (b is xv and is_scalar(a, factor))
    if p.op_type == "Div":
        return a is xv and is_scalar(b, 1.0 / factor)
    return False


def _is_cube(value: Value, xv: Value) -> bool:
    """``xv³`` as Pow(x, 3) or x·(x·x) in either order."""
    p = value.producer
    if p is None or p.domain not in ("", "ai.onnx"):
        return False
    if p.op_type == "Pow":
        return p.inputs[0] is xv and is_scalar(p.inputs[1], 3.0)
    if p.op_type == "Mul" and len(p.inputs) == 2:
        a, b = p.inputs
        for lone, sq in ((a, b), (b, a)):
            s = sq.producer
            if lone is xv and s is not None and s.op_type == "Mul" and list(s.inputs) == [xv, xv]:
                return True
    return False


def _erf_arg_check(m):
    """z = x / √2."""
    if not _scaled(m[z], m[x], 1.0 / SQRT2):
        return m.fail(f"Erf input {m[z].name!r} ({_desc(m[z].producer)}) is not x/√2 of {m[x].name!r}", m.inner)
    return _common_check(m)


def _tanh_arg_check(m):
    """z = √(2/π) · (x + 0.044715 · x³)."""
    p = m[z].producer
    inner = None
    if p is not None and p.op_type == "Mul" and len(p.inputs) == 2:
        a, b = p.inputs
        for c, t in ((a, b), (b, a)):
            if is_scalar(c, SQRT_2_OVER_PI, rtol=1e-5):
                inner = t
    if inner is None:
        return m.fail(f"Tanh input {m[z].name!r} ({_desc(p)}) is not √(2/π)·(..)", m.inner)
    s = inner.producer
    ok = False
    if s is not None and s.op_type == "Add" and len(s.inputs) == 2:
        for lone, cubic in (tuple(s.inputs), tuple(reversed(s.inputs))):
            cp = cubic.producer
            if lone is m[x] and cp is not None and cp.op_type == "Mul" and len(cp.inputs) == 2:
                for c, t in (tuple(cp.inputs), tuple(reversed(cp.inputs))):
                    if is_scalar(c, TANH_CUBIC, rtol=1e-5) and _is_cube(t, m[x]):
                        ok = True
    if not ok:
        return m.fail(f"Tanh argument {inner.name!r} ({_desc(s)}) is not x + 0.044715·x³ of {m[x].name!r}",
                      m.inner)
    return _common_check(m)


def _common_check(m):
    r = rank(m[x])
    for c, want, label in ((half, 0.5, "½"), (one, 1.0, "1")):
        if not is_scalar(m.value(c), want, max_rank=r):
            got = m[c]
            return m.fail(f"constant {m.value(c).name!r} {got.reshape(-1)[:4].tolist()} (shape {list(got.shape)}) "
                          f"is not the scalar {label} of GELU", m.outer)
    if m[x].dtype is not None and m[x].dtype.name not in ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"):
        return m.fail(f"{m[x].name!r} is {m[x].dtype.name}; GELU fusion needs a floating-point tensor", m.outer)
    return None


def _rules(kind: str, inner_op: str, check, target: str) -> list[Rule]:
    inner = getattr(op, inner_op)(z, name="inner")
    e = op.Add(inner, one, name="plus_one")
    forms = {
        "": op.Mul(op.Mul(x, e, name="x_e"), half, name="outer"),              # (x·E)·½   TorchScript
        "_half_e": op.Mul(x, op.Mul(half, e, name="half_e"), name="outer"),    # x·(½·E)   dynamo
        "_half_x": op.Mul(op.Mul(x, half, name="half_x"), e, name="outer"),    # (½·x)·E
    }

    def replacement(op, m):
        return getattr(op.domain(MS), target)(m[x], _name=m.outer.name or target)

    replacement.__doc__ = f"½·x·(1 + {inner_op.lower()}(..)) -> com.microsoft {target}(x)."
    return [Rule(f"fuse_{kind}{suffix}", pattern, replacement, check=check) for suffix, pattern in forms.items()]


GELU_RULES = [*_rules("gelu_erf", "Erf", _erf_arg_check, "Gelu"), *_rules("gelu_tanh", "Tanh", _tanh_arg_check,
                                                                            "FastGelu")]

# --------------------------------------------------------------------------- QuickGelu
alpha = Const("alpha")
quick_pattern = op.Mul(x, op.Sigmoid(op.Mul(x, alpha, name="scale"), name="sigmoid"), name="outer")


def _quick_check(m):
    a = scalar(m.value(alpha), max_rank=rank(m[x]))
    if a is None:
        return m.fail(f"{_desc(m.scale)} scales by a constant of shape {list(m[alpha].shape)}, not a scalar", m.scale)
    if m[x].dtype is not None and m[x].dtype.name not in ("FLOAT", "FLOAT16", "BFLOAT16"):
        return m.fail(f"{m[x].name!r} is {m[x].dtype.name}; QuickGelu takes float tensors", m.outer)
    return None


def _quick_replacement(op, m):
    """x·sigmoid(α·x) -> com.microsoft QuickGelu(x, alpha=α)."""
    return op.domain(MS).QuickGelu(m[x], alpha=float(scalar(m.value(alpha))), _name=m.outer.name or "QuickGelu")


fuse_quick_gelu = Rule("fuse_quick_gelu", quick_pattern, _quick_replacement, check=_quick_check)

# --------------------------------------------------------------------------- bias
t, b = Var("t"), Const("b")


def _bias_check(m):
    bias, tv = m[b], m[t]
    if bias.ndim != 1:
        return m.fail(f"bias {m.value(b).name!r} has shape {list(bias.shape)}; BiasGelu adds a 1-D bias over "
                      f"the last axis", m.add)
    last = tv.shape[-1] if tv.shape else None
    if not isinstance(last, int) or last != bias.shape[0]:
        return m.fail(f"bias of length {bias.shape[0]} does not match the last dim {last!r} of {tv.name!r}", m.add)
    if tv.constant() is not None:
        return m.fail(f"{tv.name!r} is a constant; constant folding handles it", m.add)
    return None


def _bias_gelu_replacement(op, m):
    """com.microsoft Gelu(Add(t, b)) -> com.microsoft BiasGelu(t, b)."""
    return op.domain(MS).BiasGelu(m[t], m.value(b), _name=m.gelu.name or "BiasGelu")


def _bias_fast_gelu_replacement(op, m):
    """com.microsoft FastGelu(Add(t, b)) -> com.microsoft FastGelu(t, b)."""
    return op.domain(MS).FastGelu(m[t], m.value(b), _name=m.gelu.name or "FastGelu")


ms = op.domain(MS)
fuse_bias_gelu = Rule("fuse_bias_gelu", ms.Gelu(op.Add(t, b, name="add"), name="gelu"), _bias_gelu_replacement,
                      check=_bias_check)
fuse_bias_fast_gelu = Rule("fuse_bias_fast_gelu", ms.FastGelu(op.Add(t, b, name="add"), name="gelu"),
                           _bias_fast_gelu_replacement, check=_bias_check)

RULES = [*GELU_RULES, fuse_quick_gelu, fuse_bias_gelu, fuse_bias_fast_gelu]
