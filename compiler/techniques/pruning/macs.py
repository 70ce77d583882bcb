"""Parameters and multiply-accumulates (MACs) per layer.

MACs per inference at the given input sizes (batch 1 unless ``dim_sizes`` says
otherwise; see :mod:`graft.compiler.techniques.pruning.shapes`), counted for the ops that dominate
compute, from the ONNX operator definitions:

- Conv:          ``N * C_out * prod(out spatial) * (C_in / group) * prod(kernel)``
- ConvTranspose: ``N * C_in * prod(in spatial) * (C_out / group) * prod(kernel)``
- Gemm:          ``M * N * K``
- MatMul:        ``prod(output dims) * K`` (batched, broadcast; activation × activation too)

Elementwise ops, normalizations and pooling are not counted as MACs (the usual
convention of thop / fvcore / Torch-Pruning's counter). Parameters of a layer are
the elements of its constant inputs; the model total counts every initializer and
``Constant`` tensor once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.compiler.techniques.pruning.shapes import static_shapes
from graft.ir import Model, Tensor


@dataclass
class LayerCost:
    """One node's parameters (elements of its constant inputs) and MACs."""

    name: str
    op: str
    params: int
    macs: int


def _prod(xs) -> int:
    return int(np.prod(xs, dtype=np.int64)) if len(xs) else 1


def node_macs(node, shapes: dict) -> int:
    """MACs of one node (0 for ops not counted or shapes unknown)."""
    op = node.op_type
    ins = node.inputs
    out = shapes.get(node.outputs[0]) if node.outputs else None
    if out is None:
        return 0
    if op == "Conv" and len(ins) > 1 and ins[1] in shapes:
        w = shapes[ins[1]]
        return _prod(out) * w[1] * _prod(w[2:])
    if op == "ConvTranspose" and ins[0] in shapes and ins[1] in shapes:
        w, x = shapes[ins[1]], shapes[ins[0]]
        return _prod(x) * w[1] * _prod(w[2:])
    if op == "Gemm" and ins[0] in shapes:
        a = shapes[ins[0]]
        k = a[0] if node.attrs.get("transA", 0) else a[1]
        return _prod(out) * k
    if op == "MatMul" and ins[0] in shapes:
        a = shapes[ins[0]]
        return _prod(out) * (a[-1] if a else 1)
    return 0


def layer_costs(model: Model, shapes: dict | None = None, dim_sizes: dict | None = None) -> list[LayerCost]:
    """Per node with parameters or MACs, in graph order (main graph)."""
    shapes = shapes if shapes is not None else static_shapes(model, dim_sizes)
    rows = []
    for node in model.graph:
        if node.op_type == "Constant":
            continue
        params = 0
        for v in node.inputs:
            if v is None:
                continue
            arr = v.const.array if v.const is not None else None
            if arr is None and v.producer is not None and v.producer.op_type == "Constant":
                t = v.producer.attrs.get("value")
                params += t.size if isinstance(t, Tensor) else 0
            elif arr is not None:
                params += int(v.const.size)
        macs = node_macs(node, shapes)
        if params or macs:
            rows.append(LayerCost(node.name or node.outputs[0].name, node.op_type, params, macs))
    return rows


def total_params(model: Model) -> int:
    """Elements of every initializer and Constant tensor (all graphs)."""
    n = 0
    for g in model.all_graphs():
        n += sum(v.const.size for v in g.initializers.values())
        for node in g:
            t = node.attrs.get("value") if node.op_type == "Constant" else None
            if isinstance(t, Tensor):
                n += t.size
    return n
