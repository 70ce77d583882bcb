"""Preparing a float model for quantization: the float pipeline, then shape simplification.

:func:`symbolic_shapes` runs onnxruntime's symbolic shape inference (sympy-based, merges
dims that ops force equal) and returns each value's dims as ints and symbol names, for the
``constant_reshape_spec`` rule (:mod:`graft.rules.quantize_prepare`).
"""
from __future__ import annotations

from pathlib import Path

from graft import ir


def symbolic_shapes(model: ir.Model) -> dict[str, tuple]:
    """Value name → dims (int or symbol name) from onnxruntime's ``SymbolicShapeInference``.

    Returns an empty dict when the inference fails on this model (the reason goes to
    ``model.meta["graft.symbolic_shapes_error"]``); Reshape specs then stay computed.
    """
    SymbolicShapeInference = _symbolic_shape_inference()
    from graft.ir.shapes import STRIP_BYTES

    # weights become typed inputs without data: shapes need only their types, and a copy of every
    # weight is what made quantizing a large model hold it twice (issue 11)
    proto = ir.to_onnx(model, stub_initializers_over=STRIP_BYTES)
    try:
        out = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception as e:  # the tool raises bare Exceptions (even AssertionError) on graphs it cannot handle
        model.meta["graft.symbolic_shapes_error"] = f"{type(e).__name__}: {e}"
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


def _symbolic_shape_inference():
    """onnxruntime's ``SymbolicShapeInference`` class, loaded from its file: importing the
    ``onnxruntime.tools`` package would import torch (its ``__init__`` does when torch is
    installed), which an ONNX-only compile must not pay for."""
    import importlib.util
    import sys

    name = "_graft_ort_symbolic_shape_infer"
    mod = sys.modules.get(name)
    if mod is None:
        ort_spec = importlib.util.find_spec("onnxruntime")
        path = Path(ort_spec.origin).parent / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod.SymbolicShapeInference


def simplify_shapes(model: ir.Model) -> int:
    """Constant Reshape specs where symbolic shapes prove them, then dead-code removal; returns rewrites."""
    from graft.compiler.engine.rewriter import rewrite
    from graft.rules.dead_code import eliminate_dead_code
    from graft.rules.quantize_prepare import reshape_rules

    shapes = symbolic_shapes(model)
    n = rewrite(model, reshape_rules(shapes)).rewrites if shapes else 0
    if n:
        eliminate_dead_code(model)
    return n
