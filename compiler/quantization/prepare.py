"""Preparing a float model for quantization: the float pipeline, then shape simplification.

:func:`symbolic_shapes` runs onnxruntime's symbolic shape inference (sympy-based, merges
dims that ops force equal) and returns each value's dims as ints and symbol names, for the
``constant_reshape_spec`` rule (:mod:`rules.quantize_prepare`).
"""
from __future__ import annotations

import warnings

import ir


def symbolic_shapes(model: ir.Model) -> dict[str, tuple]:
    """Value name → dims (int or symbol name) from onnxruntime's ``SymbolicShapeInference``.

    Returns an empty dict (with a warning) when the inference fails on this model.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    proto = ir.to_onnx(model)
    try:
        out = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception as e:  # the tool raises bare Exceptions on unsupported graphs
        warnings.warn(f"symbolic shape inference failed ({type(e).__name__}: {e}); Reshape specs stay computed",
                      stacklevel=2)
        return {}
    if out is None:
        return {}
    shapes = {}
    for vi in [*out.graph.value_info, *out.graph.input, *out.graph.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[vi.name] = tuple(dims)
    return shapes


def simplify_shapes(model: ir.Model) -> int:
    """Constant Reshape specs where symbolic shapes prove them, then dead-code removal; returns rewrites."""
    from compiler.rewriter import rewrite
    from rules.dead_code import eliminate_dead_code
    from rules.quantize_prepare import reshape_rules

    shapes = symbolic_shapes(model)
    if not shapes:
        return 0
    res = rewrite(model, reshape_rules(shapes))
    if res.rewrites:
        eliminate_dead_code(model)
    return res.rewrites
