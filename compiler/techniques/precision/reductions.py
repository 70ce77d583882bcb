"""Measured error of accumulation-heavy nodes run in the lower type.

Normalizations, reductions and softmax add up many values; in float16/bfloat16 the sum can lose
the small terms or overflow (TensorRT#2564, onnxruntime PR #28442: LayerNormalization in fp16).
Whether that matters depends on the data, so it is measured: the node alone, as a one-node ONNX
model, runs in the ONNX reference implementation (``onnx.reference``, numpy) once in float32 and
once with its float inputs and outputs in the target type, on the node's inputs captured from
the float32 model on the first feeds. The error is

    max |y_low - y_fp32| / max(max |y_fp32|, tiny)       (finite y_fp32 only)

where the float32 reference reads rounded to the target type the inputs that arrive in it anyway
(a converted producer's output, a constant): the error is what running this node in the lower
type adds, not the rounding its inputs already have.

and a node whose error exceeds the tolerance (default 16 units of roundoff of the target type:
float16 7.8e-3, bfloat16 6.3e-2) stays float32 with the reason ``reduction over N elements``.
The reference implementation computes in the array type it is given (numpy float16 or ml_dtypes
bfloat16, each operation rounded to it). An op the schema defines as a function (LayerNormalization,
Softmax-13, ...) runs as that function body, so its arithmetic is the spec's, casts included
(LayerNormalization's ``stash_type`` keeps its statistics in float32): the number is what the
specified op does in the lower type, not what one runtime's kernel does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from graft import ir
from graft.ir.dtypes import DataType

# Ops whose output at one position sums (or otherwise accumulates) many input elements.
REDUCTIONS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
    "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "Softmax", "LogSoftmax", "CumSum", "GlobalAveragePool", "GlobalLpPool", "LpNormalization",
})

ROUNDOFFS = 16  # default tolerance, in units of roundoff of the target type


@dataclass
class ReductionError:
    """The measured error of one node: ``elements`` reduced per output value, ``error`` (see module doc)."""

    node: str
    op_type: str
    elements: int
    error: float


def is_reduction(node: ir.Node) -> bool:
    return node.domain == "" and node.op_type in REDUCTIONS


def reduced_elements(node: ir.Node, opset: int, shape: tuple | None = None) -> int | None:
    """How many input elements each output value accumulates, from ``shape`` (default: the first
    input's static shape), or None when unknown."""
    x = node.inputs[0] if node.inputs else None
    if shape is None:
        shape = x.shape if x is not None else None
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    r = len(shape)
    op = node.op_type
    if r == 0:
        return 1
    if op in ("LayerNormalization", "RMSNormalization"):
        axis = node.attrs.get("axis", -1) % r
        return math.prod(shape[axis:])
    if op in ("Softmax", "LogSoftmax"):
        axis = node.attrs.get("axis", -1 if opset >= 13 else 1) % r
        return shape[axis] if opset >= 13 else math.prod(shape[axis:])
    if op in ("GroupNormalization", "InstanceNormalization", "GlobalAveragePool", "GlobalLpPool"):
        n = math.prod(shape[2:]) if r > 2 else 1
        if op == "GroupNormalization":
            groups = node.attrs.get("num_groups", 1)
            n *= shape[1] // max(groups, 1)
        return n
    if op in ("LpNormalization", "CumSum"):
        return shape[node.attrs.get("axis", -1) % r] if op == "LpNormalization" else None
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        c = node.inputs[1].constant()
        axes = None if c is None else [int(a) for a in np.asarray(c).ravel()]
        if c is None:
            return None
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return 1
        return math.prod(shape)
    return math.prod(shape[a % r] for a in axes)


def _single_node_model(node: ir.Node, in_types: list, out_types: list, opset: int) -> onnx.ModelProto:
    """A model running ``node`` alone on inputs ``in0..`` with the given element types.

    When the op's schema defines it as a function (LayerNormalization, Softmax-13, ...), the node
    calls that function body as a model-local function, so the reference evaluator follows the
    spec's arithmetic, casts included (LayerNormalization's ``stash_type``: statistics in float32);
    the evaluator's own kernel for such an op may compute everything in the input type.
    """
    from graft.ir.onnx_io import node_proto

    p = node_proto(node)
    del p.metadata_props[:]
    names_in = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    names_out = [f"out{i}" for i in range(len(node.outputs))]
    p.ClearField("input")
    p.ClearField("output")
    p.input.extend(names_in)
    p.output.extend(names_out)
    ins = [helper.make_tensor_value_info(n, int(t), None) for n, t in zip(names_in, in_types) if n]
    outs = [helper.make_tensor_value_info(n, int(t), None) for n, t in zip(names_out, out_types)]
    functions = []
    body = _function_body(node, p, in_types, opset)
    if body is not None:
        p.domain = body.domain
        functions.append(body)
    g = helper.make_graph([p], "node", ins, outs)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(SPEC_DOMAIN, 1)] if functions else [])
    return helper.make_model(g, opset_imports=imports, functions=functions)


SPEC_DOMAIN = "graft.spec"


def _function_body(node: ir.Node, p: onnx.NodeProto, in_types: list, opset: int) -> onnx.FunctionProto | None:
    """The schema's function body of ``node`` (plain or context-dependent) as a local function, or None."""
    try:
        sch = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None
    fp = onnx.FunctionProto()
    try:
        if sch.has_function:
            fp.CopyFrom(sch.function_body)
        elif sch.has_context_dependent_function:
            types = [helper.make_tensor_type_proto(int(t), None).SerializeToString() for t in in_types if t is not None]
            fp.ParseFromString(sch.get_context_dependent_function(p.SerializeToString(), types))
        else:
            return None
    except Exception:  # noqa: BLE001 — a body onnx cannot build for these types: use the kernel
        return None
    fp.name, fp.domain = node.op_type, SPEC_DOMAIN
    del fp.output[len(node.outputs):]  # the body lists every formal output; the node has fewer
    if not any(o.domain == "" for o in fp.opset_import):
        fp.opset_import.append(helper.make_opsetid("", opset))
    return fp


def measure_error(node: ir.Node, inputs: list[list[np.ndarray | None]], conversion, target: DataType,
                  opset: int, rounded: tuple[bool, ...] = ()) -> float | None:
    """The error (module doc) of ``node`` run in ``target``, over the captured input sets ``inputs``
    (one list per feed, None for an absent input); None when the reference cannot run it.

    ``rounded[i]``: input ``i`` reaches the node in ``target`` whatever this node's precision (its
    producer is converted, or it is a constant the node reads converted): the float32 reference
    then reads it rounded too, so the error counts only what running the node in ``target`` adds.
    """
    from onnx.reference import ReferenceEvaluator

    t_np = target.to_numpy()
    in32 = [v.dtype if v is not None else None for v in node.inputs]
    out32 = [v.dtype or DataType.FLOAT for v in node.outputs]
    in_lo = [target if conv and t is not None else t for t, conv in zip(in32, conversion.inputs)]
    out_lo = [target if conv else t for t, conv in zip(out32, conversion.outputs)]
    try:
        ref32 = ReferenceEvaluator(_single_node_model(node, in32, out32, opset))
        reflo = ReferenceEvaluator(_single_node_model(node, in_lo, out_lo, opset))
    except Exception:  # noqa: BLE001 — an op the reference implementation lacks
        return None
    worst = 0.0
    for feed in inputs:
        f32 = {f"in{i}": (a.astype(t_np).astype(a.dtype) if i < len(rounded) and rounded[i] else a)
               for i, a in enumerate(feed) if a is not None}
        flo = {f"in{i}": (a.astype(t_np) if conversion.inputs[i] else a)
               for i, a in enumerate(feed) if a is not None}
        try:
            with np.errstate(all="ignore"):
                y32 = ref32.run(None, f32)[0]
                ylo = reflo.run(None, flo)[0]
        except Exception:  # noqa: BLE001
            return None
        y32 = np.asarray(y32, np.float64)
        ylo = np.asarray(ylo.astype(np.float32), np.float64)
        fin = np.isfinite(y32)
        if not fin.any():
            continue
        if not np.isfinite(ylo[fin]).all():
            return float("inf")
        scale = max(float(np.abs(y32[fin]).max()), np.finfo(np.float32).tiny)
        worst = max(worst, float(np.abs(ylo[fin] - y32[fin]).max()) / scale)
    return worst
