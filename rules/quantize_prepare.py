"""Float simplifications run before quantization: constant Reshape specs from symbolic shapes.

Exported transformers compute every Reshape's target shape at run time
(``Shape → Gather → Unsqueeze → Concat``, four to six small ops per Reshape). In an int8
model, where the MatMuls got ~3× cheaper, those ops become a large share of the latency.
When symbolic shape inference proves the output shape in terms of the input's dims, the
spec is a constant (ONNX Reshape-5/13/14/19/21 with ``allowzero`` = 0):

- output dim j equal to input dim j (same symbol or the same number) → 0 ("copy dim j");
- a known number → that number;
- at most one remaining dim → -1 (inferred from the element count).

``constant_reshape_spec`` replaces the computed spec by that constant; the shape arithmetic
then has no reader left and dead-code elimination removes it. The symbolic shapes are
onnxruntime's ``SymbolicShapeInference`` (onnxruntime/tools/symbolic_shape_infer.py), run
by :func:`graft.compiler.techniques.quantization.prepare.symbolic_shapes` and handed to the rule as context.
"""
from __future__ import annotations

import numpy as np

from graft.compiler.engine import Rule, Var, op


def _spec(in_shape, out_shape):
    if in_shape is None or out_shape is None or any(d is None for d in out_shape):
        return None
    spec, unknown = [], 0
    for j, d in enumerate(out_shape):
        if j < len(in_shape) and in_shape[j] == d and in_shape[j] is not None:
            spec.append(0)
        elif isinstance(d, int):
            spec.append(d)
        else:
            spec.append(-1)
            unknown += 1
    return spec if unknown <= 1 else None


def reshape_rules(shapes: dict[str, tuple]) -> list[Rule]:
    """``constant_reshape_spec`` bound to ``shapes`` (value name → symbolic dims: int or str)."""
    x, spec = Var("x"), Var("spec", where=lambda v: v.constant() is None)

    def check(m):
        if m.reshape.attrs.get("allowzero", 0):
            return m.fail("allowzero=1: a 0 in the spec would mean a zero-sized dim", m.reshape)
        if _spec(shapes.get(m[x].name), shapes.get(m.reshape.outputs[0].name)) is None:
            return m.fail("symbolic shapes do not determine the output shape from the input's dims", m.reshape)

    def replacement(op, m):
        """Reshape(x, computed spec) -> Reshape(x, constant spec)."""
        s = _spec(shapes[m[x].name], shapes[m.reshape.outputs[0].name])
        return op.Reshape(m[x], op.const(np.array(s, dtype=np.int64), name=f"{m.reshape.name}_spec"),
                          _name=m.reshape.name)

    return [Rule("constant_reshape_spec", op.Reshape(x, spec, name="reshape"), replacement, check=check)]


RULES: list[Rule] = []  # needs symbolic shapes: see reshape_rules(shapes)

