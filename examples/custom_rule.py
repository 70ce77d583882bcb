"""A user rule: Div(x, c) = Mul(x, 1/c). Use: graft compile m.onnx -o out.onnx --rules examples/custom_rule.py"""
import numpy as np

from graft.compiler import Const, Rule, Var, op

x, c = Var("x"), Const("c", where=lambda a: a.dtype.kind == "f" and bool(np.all(a != 0)))


def replacement(op, m):
    """Div(x, c) -> Mul(x, 1/c) for a non-zero floating-point constant c."""
    return op.Mul(m[x], op.const((1 / m[c]).astype(m[c].dtype)))


div_to_mul = Rule("div_to_mul", op.Div(x, c), replacement)
