"""Constant folding: replace a node whose inputs are all known at compile time by its result.

- fold_constants: any ai.onnx node whose inputs are all constants (initializers
  or ``Constant`` outputs) is evaluated with ``onnx.reference.ReferenceEvaluator``
  (the ONNX reference implementation, at the model's opset) and replaced by
  initializers holding its outputs. The output element types are those ONNX
  shape inference defines for the node (``onnx.shape_inference.infer_node_outputs``
  on the op's schema), so a fold never changes a dtype.
- fold_shape: Shape(x)[start:end] (Shape-1/13/15/19/21/23/24: int64, ``start``/``end``
  clamped to [0, rank] after adding rank to negatives) is a constant when those dims
  of x are static.
- fold_size: Size(x) = prod(shape(x)) (Size-1/13/19/21/23/24: int64 scalar) when x's
  shape is fully static.
- fold_gather_of_shape: Gather(Shape(x), k) = shape(x)[k] (Gather-13 on 1-D data,
  negative k counts from the end) when the gathered dims are static, even if
  other dims are symbolic — the ``Shape → Gather`` chains exported transformers
  use to read batch/sequence/hidden sizes.

The Shape rules read ``Value.shape``, so run :func:`graft.ir.shapes.infer_shapes` first.

Not folded, with the reason as the refusal:
- non-deterministic ops (RandomNormal*, RandomUniform*, Multinomial, Bernoulli,
  Dropout) and ops with subgraphs (If, Loop, Scan);
- DequantizeLinear, so quantized weights stay quantized (QDQ format);
- results over :data:`MAX_ELEMENTS` elements, or over :data:`GROWTH_MIN_BYTES` and
  more than :data:`GROWTH_FACTOR` times the bytes of the node's inputs (an Expand,
  Tile or ConstantOfShape must not blow a small constant up into a large weight).
  The size is predicted by shape inference before evaluating; ops that can grow
  their input (:data:`MAY_GROW`) are not evaluated when it cannot be predicted.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx.defs
import onnx.shape_inference
from onnx import helper, numpy_helper

from graft.compiler.engine import Const, Rule, Var, op
from graft.ir.shapes import is_static
from graft.ir.dtypes import DataType
from graft.ir.onnx_io import node_proto

MAX_ELEMENTS = 1 << 20
GROWTH_MIN_BYTES = 64 * 1024
GROWTH_FACTOR = 2

NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                              "Multinomial", "Bernoulli", "Dropout"})
KEEP = {"DequantizeLinear": "DequantizeLinear is kept so quantized weights stay quantized (QDQ format)"}
MAY_GROW = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Pad", "Resize", "Upsample", "OneHot",
                      "EyeLike", "MatMul", "Gemm", "Einsum", "Conv", "ConvTranspose", "Concat", "Col2Im",
                      "CenterCropPad", "Mul", "Add", "Sub", "Div", "Pow", "Where", "And", "Or", "Xor",
                      "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Max", "Min", "Sum",
                      "Mean", "BitShift", "Mod", "PRelu", "Trilu", "DFT", "STFT", "MelWeightMatrix",
                      "BlackmanWindow", "HannWindow", "HammingWindow"})
# Inputs up to this many elements are given to shape inference as data (shape tensors, scalars).
_DATA_ELEMENTS = 4096


# ---------------------------------------------------------------- fold_constants
def _foldable(node) -> bool:
    """ai.onnx node with at least one input, each an initializer or a Constant output (or absent).

    Tried at every node of every pass, so it rejects in a few attribute reads, before a match
    is built. It is looser than :meth:`ir.Value.constant` (a graph input with an initializer
    passes), so ``_evaluate`` still checks each input and says which one is not constant.
    """
    if node.domain != "":
        return False
    seen = False
    for v in node.inputs:
        if v is None:
            continue
        if v.const is None:
            p = v.producer
            if p is None or p.op_type != "Constant":
                return False
        seen = True
    return seen


def _evaluate(m):
    """Fold ``m.node``: its outputs as arrays of the ONNX-defined dtypes, or a Failure."""
    node = m.node
    if node.op_type in NONDETERMINISTIC:
        return m.fail(f"{node.op_type} is non-deterministic", node)
    if node.op_type in KEEP:
        return m.fail(KEEP[node.op_type], node)
    if any(True for _ in node.subgraphs()):
        return m.fail(f"{node.op_type} has subgraphs", node)
    arrays = {}
    for i, v in enumerate(node.inputs):
        if v is None:
            continue
        a = v.constant()
        if a is None:
            return m.fail(f"input {i} ({v.name!r}) of {node.op_type} is not a constant", node)
        arrays[v.name] = (v, a)
    for o in node.outputs:
        if not o.name:
            return m.fail(f"{node.op_type} has an absent optional output", node)
        if o.is_graph_output():
            return m.fail(f"output {o.name!r} is a graph output (it would become an initializer)", node)
    proto = node_proto(node)
    predicted = _predict(node, proto, arrays, m.opset)
    if isinstance(predicted, str):
        return m.fail(predicted, node)
    in_bytes = sum(a.nbytes for _, a in arrays.values())
    sizes = [_size(shape) for _, shape in predicted]
    if all(s is not None for s in sizes):
        refusal = _over_cap(node, sizes, [dt for dt, _ in predicted], in_bytes)
        if refusal:
            return m.fail(refusal, node)
    elif node.op_type in MAY_GROW:
        return m.fail(f"the size of {node.op_type}'s result cannot be predicted, so it is not evaluated "
                      f"(it may be large)", node)
    from onnx.reference import ReferenceEvaluator

    # onnx.reference runs a bare NodeProto at the newest opset whatever `opsets` says; where the op
    # changed since the model's opset (Unsqueeze-1's axes attribute, say), wrap it in a graph,
    # for which the model's opset is honoured
    if _changed_since(node.op_type, m.opset):
        proto = helper.make_graph([proto], "fold", [onnx.ValueInfoProto(name=k) for k in arrays],
                                  [onnx.ValueInfoProto(name=o) for o in proto.output])
    try:
        got = ReferenceEvaluator(proto, opsets={"": m.opset}).run(None, {k: a for k, (_, a) in arrays.items()})
    except Exception as e:  # the reference implementation lacks the op/version or rejects the inputs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return m.fail(f"onnx.reference cannot evaluate {node.op_type} (opset {m.opset}): {first}", node)
    if len(got) != len(node.outputs):
        return m.fail(f"onnx.reference returned {len(got)} outputs for {node.op_type}, the node has "
                      f"{len(node.outputs)}", node)
    out = []
    for (dtype, shape), res, o in zip(predicted, got, node.outputs):
        res = np.asarray(res)
        want = dtype.to_numpy()
        if res.dtype != want:
            res = res.astype(want)
        if _size(shape) is not None and tuple(res.shape) != tuple(shape):
            return m.fail(f"onnx.reference returned shape {list(res.shape)} for {o.name!r}, ONNX shape "
                          f"inference says {list(shape)}", node)
        out.append((res, dtype))
    refusal = _over_cap(node, [r.size for r, _ in out], [dt for _, dt in out], in_bytes)
    if refusal:
        return m.fail(refusal, node)
    return out


@functools.cache
def _changed_since(op_type: str, opset: int) -> bool:
    """True when ``op_type``'s newest ai.onnx version is not the one in force at ``opset``."""
    return onnx.defs.get_schema(op_type, opset, "").since_version != onnx.defs.get_schema(op_type, "").since_version


def _predict(node, proto, arrays, opset):
    """[(DataType, shape or None)] per output from the op's ONNX inference function, or a refusal."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:
        return f"no ONNX schema for {node.op_type} at opset {opset}"
    types, data = {}, {}
    for name, (v, a) in arrays.items():
        dtype = v.dtype if v.dtype is not None else _dtype_of(v, a)
        if dtype is None:
            return f"dtype of input {name!r} is unknown"
        types[name] = helper.make_tensor_type_proto(int(dtype), list(a.shape))
        if a.size <= _DATA_ELEMENTS and a.dtype.kind in "biuf" and a.dtype.isbuiltin:
            data[name] = numpy_helper.from_array(a, name)
    try:
        inferred = onnx.shape_inference.infer_node_outputs(
            schema, proto, types, input_data=data, opset_imports=[helper.make_opsetid("", opset)])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"ONNX shape inference rejects {node.op_type} on these constants: {first}"
    out = []
    for o in node.outputs:
        tp = inferred.get(o.name)
        if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.elem_type:
            if tp is not None and not tp.HasField("tensor_type"):
                return f"output {o.name!r} is not a tensor (sequence/optional/map)"
            if o.dtype is None:
                return f"ONNX shape inference gives no dtype for output {o.name!r}"
            out.append((o.dtype, None))
            continue
        tt = tp.tensor_type
        shape = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shape = tuple(int(d.dim_value) for d in tt.shape.dim)
        out.append((DataType(tt.elem_type), shape))
    return out


def _dtype_of(v, a):
    p = v.producer
    t = p.attrs.get("value") if p is not None else None
    if t is not None and hasattr(t, "dtype"):
        return t.dtype
    try:
        return DataType.from_numpy(a.dtype)
    except Exception:
        return None


def _size(shape) -> int | None:
    return None if shape is None else int(np.prod(shape, dtype=np.int64))


def _over_cap(node, sizes, dtypes, in_bytes) -> str | None:
    n = sum(sizes)
    if n > MAX_ELEMENTS:
        return (f"result of {node.op_type} would have {n} elements, over the folding cap of "
                f"{MAX_ELEMENTS} (MAX_ELEMENTS)")
    nbytes = sum((s * dt.bitwidth + 7) // 8 for s, dt in zip(sizes, dtypes))
    if nbytes > GROWTH_MIN_BYTES and nbytes > GROWTH_FACTOR * in_bytes:
        return (f"result of {node.op_type} would take {nbytes} bytes, more than {GROWTH_FACTOR}x its "
                f"inputs' {in_bytes} bytes (folding would grow the weights)")
    return None


def _fold_check(m):
    got = m.memo(_evaluate)  # evaluated once: the replacement reads the same result
    return None if isinstance(got, list) else got


def _fold_replacement(op, m):
    """Node with constant inputs -> initializers with its outputs (onnx.reference)."""
    got = m.memo(_evaluate)
    if not isinstance(got, list):
        return got
    outs = tuple(op.const(arr, dtype=dtype, name=o.name) for (arr, dtype), o in zip(got, m.node.outputs))
    return outs if len(outs) > 1 else outs[0]


def fold_constants_rule(name: str = "fold_constants", *, also=None) -> Rule:
    """The constant-folding rule, optionally narrowed: ``also(node) -> bool`` must hold too.

    A technique that must keep some constant subgraphs (pruning keeps views of torch
    parameters so they stay trainable) builds its own variant here instead of reaching
    into this module's helpers.
    """
    where = _foldable if also is None else (lambda node: _foldable(node) and also(node))
    return Rule(name, op.any_op(name="node", where=where), _fold_replacement, check=_fold_check)


fold_constants = fold_constants_rule()


# ---------------------------------------------------------------- Shape / Size
x = Var("x")
indices = Const("indices")
dims = Var("dims", where=lambda v: v.producer is not None and v.producer.op_type == "Shape"
           and v.producer.domain == "")


def _shape_slice(node, shape) -> list | None:
    """Shape-15 semantics: the dims [start:end] of ``shape`` (None when the rank is unknown)."""
    if shape is None:
        return None
    r = len(shape)
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    end = r if end is None else int(end)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return list(shape[start:end])


def _static_dims_check(m, node, dims_):
    if dims_ is None:
        return m.fail(f"rank of {node.inputs[0].name!r} is unknown (run infer_shapes first)", node)
    if not is_static(dims_):
        return m.fail(f"shape {dims_} of {node.inputs[0].name!r} is not static", node)
    if node.output.is_graph_output():
        return m.fail(f"output {node.output.name!r} is a graph output (it would become an initializer)", node)
    return None


def _shape_check(m):
    return _static_dims_check(m, m.shape_op, _shape_slice(m.shape_op, m.value(x).shape))


def _shape_replacement(op, m):
    """Shape(x) with static dims -> int64 constant."""
    return op.const(np.array(_shape_slice(m.shape_op, m.value(x).shape), dtype=np.int64),
                    name=m.shape_op.output.name)


fold_shape = Rule("fold_shape", op.Shape(x, name="shape_op"), _shape_replacement, check=_shape_check)


def _size_check(m):
    s = m.value(x).shape
    return _static_dims_check(m, m.size_op, None if s is None else list(s))


def _size_replacement(op, m):
    """Size(x) with static shape -> int64 scalar constant."""
    return op.const(np.array(np.prod(m.value(x).shape, dtype=np.int64), dtype=np.int64),
                    name=m.size_op.output.name)


fold_size = Rule("fold_size", op.Size(x, name="size_op"), _size_replacement, check=_size_check)


def _gathered(m):
    """The dims Gather picks from Shape's output, or None when the shape is unknown."""
    shape_node = m.value(dims).producer
    full = _shape_slice(shape_node, shape_node.inputs[0].shape)
    if full is None:
        return None
    idx = np.asarray(m[indices]).astype(np.int64)
    if ((idx < -len(full)) | (idx >= len(full))).any():
        return None
    return np.asarray(np.array(full, dtype=object)[idx], dtype=object)


def _gather_check(m):
    if int(m.gather.attrs.get("axis", 0)) not in (0, -1):
        return m.fail("Gather on Shape's output must use axis 0", m.gather)
    got = m.memo(_gathered)
    if got is None:
        return m.fail("the input shape is unknown or the indices are out of range", m.gather)
    if not is_static(got.ravel()):
        return m.fail(f"gathered dims {got.tolist()} are not all static", m.gather)
    if m.gather.output.is_graph_output():
        return m.fail("Gather's output is a graph output (it would become an initializer)", m.gather)
    return None


def _gather_replacement(op, m):
    """Gather(Shape(x), k) with static dims k -> int64 constant."""
    return op.const(m.memo(_gathered).astype(np.int64), name=m.gather.output.name)


fold_gather_of_shape = Rule("fold_gather_of_shape", op.Gather(dims, indices, name="gather"),
                            _gather_replacement, check=_gather_check)

RULES = [fold_constants, fold_shape, fold_size, fold_gather_of_shape]
