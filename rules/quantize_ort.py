"""Graph forms that run faster in onnxruntime CPU after dynamic int8 quantization (measured, not assumed).

``residual_add_as_sum``: ``LayerNormalization(Add(a, b))`` with a, b both activations becomes
``LayerNormalization(Sum(a, b))``. ONNX Sum-13 of two inputs is elementwise a + b, bit-exact with
Add-14 (one IEEE float addition per element, same broadcasting). Why: onnxruntime's
``SkipLayerNormFusion`` (onnxruntime/core/optimizer/skip_layer_norm_fusion.cc) fuses only
``Add → LayerNormalization`` into the ``com.microsoft`` SkipLayerNormalization kernel, and with
onnxruntime 1.32 on CPU at 1 thread that kernel is about 5× slower than the Add + Add +
LayerNormalization it replaces on all-MiniLM-L6-v2's (1, ~15, 384) residual stream
(measured: 27 µs vs 5 µs per block, bench/quantize_results.md). The float export usually escapes
the fusion by accident (its Add inputs carry different unknown dims), but a quantized graph whose
shapes were simplified (:mod:`graft.rules.quantize_prepare`) has provably equal shapes and gets fused.

Rules: :data:`RULES` (no context needed).
"""
from __future__ import annotations

from graft.compiler.engine import Rule, Var, op

_a = Var("a", where=lambda v: v.constant() is None)
_b = Var("b", where=lambda v: v.constant() is None)
_scale, _bias = Var("scale"), Var("bias")


def _check(m):
    add = m.add
    if add.domain != "" or len(add.outputs[0].users()) != 1 or add.outputs[0].is_graph_output():
        return m.fail("the Add has readers besides the LayerNormalization", add)
    sa, sb = m[_a].shape, m[_b].shape
    if sa is None or sb is None or len(sa) != len(sb):
        # Sum and Add broadcast alike; only same-rank residual adds are what SkipLayerNormFusion takes
        return m.fail("the Add's inputs are not of known equal rank (not a residual add)", add)


def _replacement(op, m):
    """LayerNormalization(Add(a, b)) -> LayerNormalization(Sum(a, b))."""
    ln = m.ln
    s = op.Sum(m[_a], m[_b], _name=m.add.name)
    ins = [s, m[_scale]] + ([m[_bias]] if m.get(_bias) is not None else [])
    return op.LayerNormalization(*ins, _name=ln.name, **ln.attrs)


residual_add_as_sum = Rule("residual_add_as_sum",
                           op.LayerNormalization(op.Add(_a, _b, name="add"), _scale, op.optional(_bias), name="ln"),
                           _replacement, check=_check)

RULES: list[Rule] = [residual_add_as_sum]
