"""Static shapes for the channel analysis and for MACs counting.

The dependency analysis needs every dim of every value it reasons about as a
number (a Reshape is read as "which input axes merge or split into which output
axes"), and MACs are counted per inference at a given input size. Symbolic input
dims are therefore fixed to concrete sizes on a copy of the model, and
``onnx.shape_inference.infer_shapes(data_prop=True)`` (ONNX spec per-operator
inference, with data propagation through ``Shape → Gather → Concat`` chains)
types every value. The model itself is not changed.

Default sizes: a symbolic dim at axis 0 of a graph input is the batch and gets 1
(MACs are reported per sample); any other symbolic dim gets :data:`OTHER_DIM`.
``dim_sizes`` (dim name → size) overrides both.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graft.ir.shapes import strip_large_initializers
from graft.ir import Model, Value
from graft.ir.onnx_io import to_onnx

BATCH_DIM = 1
OTHER_DIM = 32


class ShapeError(ValueError):
    """Static shapes cannot be determined (names the value and what to pass)."""


def input_sizes(model: Model, dim_sizes: dict[str, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every graph input (symbolic dims resolved as in the module doc).

    Raises:
        ShapeError: an input of unknown rank.
    """
    dim_sizes = dict(dim_sizes or {})
    out = {}
    for v in model.graph.inputs:
        if v.const is not None:
            continue
        if v.shape is None:
            raise ShapeError(f"graph input {v.name!r} has unknown rank; give the model a typed input")
        dims = []
        for axis, d in enumerate(v.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, str) and d in dim_sizes:
                dims.append(int(dim_sizes[d]))
            else:
                dims.append(BATCH_DIM if axis == 0 else OTHER_DIM)
        out[v.name] = tuple(dims)
    return out


def static_shapes(model: Model, dim_sizes: dict[str, int] | None = None) -> dict[Value, tuple[int, ...]]:
    """Concrete shape of every value of the main graph that inference can type.

    Args:
        model: the IR model (not modified).
        dim_sizes: sizes for named symbolic input dims.

    Returns:
        Value → shape (tuple of ints). Values inference leaves unknown are absent;
        initializers and Constant outputs are always present.
    """
    sizes = input_sizes(model, dim_sizes)
    proto = to_onnx(model)
    g = proto.graph
    _fix_input_shapes(g, sizes)
    strip_large_initializers(g, keep_integer=True)
    del g.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # data propagation fails on a few exporter graphs: plain inference still helps
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    types, elem = {}, {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is not None and tt.elem_type:
            elem[vi.name] = tt.elem_type
        if tt is None or not tt.HasField("shape"):
            continue
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value >= 0:
                dims.append(int(d.dim_value))
            else:
                dims = None
                break
        if dims is not None:
            types[vi.name] = tuple(dims)
    out: dict[Value, tuple[int, ...]] = {}
    graph = model.graph
    for v in graph.inputs:
        if v.name in sizes:
            out[v] = sizes[v.name]
    for v in graph.initializers.values():
        out[v] = tuple(v.const.shape)
    for n in graph:
        for o in n.outputs:
            if not o.name:
                continue
            arr = o.constant() if n.op_type == "Constant" else None
            if arr is not None:
                out[o] = tuple(arr.shape)
            elif o.name in types:
                out[o] = types[o.name]
    missing = [o for n in graph for o in n.outputs if o.name and o not in out and o.name in elem]
    if missing:
        out.update(_run_for_shapes(model, sizes, missing, elem))
    return out


def _run_for_shapes(model: Model, sizes: dict, values: list, elem: dict) -> dict:
    """Shapes inference could not give, read off one onnxruntime run on random inputs of the given sizes.

    Exporters compute reshape targets with ops data propagation does not follow (a Cast
    inside ``Shape → Slice → Concat``); running the graph is the reliable way.
    """
    from graft.compiler.techniques import numeric

    proto = to_onnx(model)
    g = proto.graph
    _fix_input_shapes(g, sizes)
    known = {o.name for o in g.output}
    for v in values:
        if v.name not in known:
            g.output.append(helper.make_tensor_value_info(v.name, elem[v.name], None))
    try:
        feeds = numeric.make_inputs(proto, seed=0)
        got = numeric.run(proto, feeds)
    except Exception:  # noqa: BLE001 - a model ORT cannot run keeps those shapes unknown
        return {}
    return {v: tuple(int(d) for d in np.shape(got[v.name])) for v in values if v.name in got}


def _fix_input_shapes(g: onnx.GraphProto, sizes: dict) -> None:
    """Give graph inputs the concrete ``sizes`` (name → dims) in place of their symbolic dims."""
    for vi in g.input:
        if vi.name in sizes:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in sizes[vi.name]:
                shape.dim.add().dim_value = int(d)
