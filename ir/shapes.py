"""Shape and dtype inference: fill ``Value.dtype`` / ``Value.shape`` from ``onnx.shape_inference``.

The IR is exported with :func:`ir.to_onnx`, run through
``onnx.shape_inference.infer_shapes(strict_mode=False, data_prop=True)`` (the ONNX
spec's per-operator inference functions, with data propagation so that
``Shape → Gather → Concat → Reshape`` chains give static shapes where the data
allows), and the inferred types are copied back by name, graph by graph
(subgraph bodies of If/Loop/Scan included, matched node by node).

Large weights are not needed for inference (they are never shape data), so
initializers over :data:`STRIP_BYTES` are handed to inference as typed graph
inputs without their data. That keeps the call fast (it runs in every pipeline)
and keeps models whose weights exceed protobuf's 2 GiB limit inferable; if the
stripped graph itself is still over 2 GiB, inference goes through
``onnx.shape_inference.infer_shapes_path`` on a temporary file.

Models inference cannot fully handle (ops of custom domains, unknown ops) are
typed as far as inference gets: it never raises. If inference fails outright,
nothing is typed, a :class:`ShapeInferenceWarning` says why, and the reason is
kept in ``model.meta["graft.shape_inference_error"]``.
"""
from __future__ import annotations

import functools
import os
import tempfile
import warnings

import onnx
from onnx import helper

from graft.ir import Graph, Model
from graft.ir.dtypes import DataType, dtype_of
from graft.ir.onnx_io import PROTOBUF_LIMIT, to_onnx

# Initializers larger than this (bytes) go to inference as typed inputs without data.
STRIP_BYTES = 4096


class ShapeInferenceWarning(UserWarning):
    """onnx.shape_inference failed on a model; values were left as they were."""


def static_dim(d) -> bool:
    """True for a known size: an int >= 0.

    Symbolic names, None, and the negative ``dim_value`` some exporters write for
    "unknown" (PaddlePaddle's -1; invalid per the ONNX IR spec) are not static.
    """
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def is_static(shape) -> bool:
    """True when the rank and every dim of ``shape`` are known (see :func:`static_dim`)."""
    return shape is not None and all(static_dim(d) for d in shape)


def infer_shapes(model: Model) -> int:
    """Infer dtype and shape of every value and store them on the IR in place.

    A value's existing shape is refined, never made less precise: an unknown rank
    or dim from inference keeps what the IR already knew.

    Args:
        model: the IR model (main graph and subgraphs are updated).

    Returns:
        The number of values (node outputs and graph inputs/outputs, all graphs)
        for which inference produced a tensor type.

    Raises:
        Nothing for models inference cannot handle; see the module docstring.
    """
    proto = to_onnx(model, stub_initializers_over=STRIP_BYTES)
    inferred = _run_inference(proto, model)
    if inferred is None:
        return 0
    return _copy_back(model.graph, inferred.graph)


def fully_typed(model: Model) -> bool:
    """True when inference has nothing left to add: every graph input and node output of the
    main graph has a dtype and a fully static shape, and no node has a subgraph.

    ``_merge`` keeps a static dim over whatever inference says, so on such a model
    :func:`infer_shapes` changes no dtype or shape (a model whose stored types contradict
    the ONNX inference functions is the exception: inference is what would notice).
    """
    g = model.graph
    for v in g.inputs:
        if v.dtype is None or not is_static(v.shape):
            return False
    for n in g:
        for o in n.outputs:
            if o.name and (o.dtype is None or not is_static(o.shape)):
                return False
        for a in n.attrs.values():
            if isinstance(a, Graph) or (isinstance(a, list) and a and isinstance(a[0], Graph)):
                return False
    return True


def infer_missing_shapes(model: Model) -> int:
    """:func:`infer_shapes`, skipped when :func:`fully_typed` says it would change nothing.

    For a pipeline's later inference runs: a rewrite pass types the values it creates
    (a rule's replacement keeps the replaced value's type), so after the first run a
    static-shaped model usually needs no second one (0.2 s at 10k nodes).

    Returns:
        What :func:`infer_shapes` would return on such a model (the number of distinct
        graph inputs, named node outputs and graph outputs), or its own return value.
    """
    if not fully_typed(model):
        return infer_shapes(model)
    g = model.graph
    seen = set(g.inputs)
    for n in g:
        seen.update(o for o in n.outputs if o.name)
    seen.update(g.outputs)
    return len(seen)


def strip_large_initializers(gp: onnx.GraphProto, *, keep_integer: bool = False) -> None:
    """Hand initializers over :data:`STRIP_BYTES` to inference as typed graph inputs without data.

    Inference only needs their types; dropping the bytes keeps it fast and under 2 GiB.
    ``keep_integer`` keeps int32/int64 tensors whatever their size (shape data to propagate).
    """
    inputs = {vi.name for vi in gp.input}
    keep = []
    for t in gp.initializer:
        n = 1
        for d in t.dims:
            n *= d
        itemsize = _itemsize(t.data_type)
        if itemsize is None or n * itemsize <= STRIP_BYTES or \
                (keep_integer and t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)):
            keep.append(t)
            continue
        if t.name not in inputs:
            gp.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if len(keep) != len(gp.initializer):
        del gp.initializer[:]
        gp.initializer.extend(keep)


@functools.cache  # asked once per initializer
def _itemsize(data_type: int) -> int | None:
    try:
        dt = DataType(data_type)
        if dt == DataType.STRING:
            return None
        return max(1, dt.bitwidth // 8)
    except Exception:  # a type this onnx does not know: keep the tensor
        return None


def _run_inference(proto: onnx.ModelProto, model: Model) -> onnx.ModelProto | None:
    errors = []
    # data_prop can fail on some exporter graphs where plain inference works: try both
    for data_prop in (True, False):
        try:
            if proto.ByteSize() > PROTOBUF_LIMIT:
                return _infer_by_path(proto, data_prop)
            return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                                     data_prop=data_prop)
        except Exception as e:  # InferenceError, ValidationError, RuntimeError by onnx version
            errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}")
    reason = "; ".join(errors)
    model.meta["graft.shape_inference_error"] = reason
    warnings.warn(f"onnx shape inference failed, values keep their previous types ({reason})",
                  ShapeInferenceWarning, stacklevel=3)
    return None


def _infer_by_path(proto: onnx.ModelProto, data_prop: bool) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.onnx"), os.path.join(d, "out.onnx")
        onnx.save_model(proto, src, save_as_external_data=True, location="in.onnx.data")
        onnx.shape_inference.infer_shapes_path(src, dst, check_type=False, strict_mode=False,
                                               data_prop=data_prop)
        return onnx.load(dst, load_external_data=False)


def _copy_back(graph: Graph, gp: onnx.GraphProto) -> int:
    """Copy types from ``gp`` (exported from ``graph``, same node order) into ``graph``."""
    types = {}
    for vi in (*gp.input, *gp.value_info, *gp.output):
        t = vi.type
        if t.HasField("tensor_type"):
            types[vi.name] = t.tensor_type
    typed = 0
    seen = set()
    values = [*graph.inputs]
    for n in graph:
        values.extend(o for o in n.outputs if o.name)
    values.extend(graph.outputs)
    decoded: dict[bytes, tuple] = {}  # most values share a few types: decode each type once
    for v in values:
        if v in seen:
            continue
        seen.add(v)
        tt = types.get(v.name)
        if tt is None:
            continue
        key = tt.SerializeToString()
        got = decoded.get(key)
        if got is None:
            got = decoded[key] = _decode(tt)
        _merge(v, *got)
        typed += 1
    # subgraphs: node i of the IR graph was exported as node i of gp (gp.node[i] is read only for
    # nodes with a subgraph: wrapping every NodeProto costs more than the types themselves)
    for i, node in enumerate(graph):
        if not node.attrs or next(node.subgraphs(), None) is None:
            continue
        np_ = gp.node[i]
        by_name = {a.name: a for a in np_.attribute}
        for name, value in node.attrs.items():
            a = by_name.get(name)
            if a is None:
                continue
            if isinstance(value, Graph) and a.HasField("g"):
                typed += _copy_back(value, a.g)
            elif isinstance(value, list) and value and isinstance(value[0], Graph):
                for sg, sgp in zip(value, a.graphs):
                    typed += _copy_back(sg, sgp)
    return typed


def _decode(tt) -> tuple[DataType | None, tuple | None]:
    """(dtype, dims) of a ``TypeProto.Tensor``: dims are ints, symbolic names or None (unknown)."""
    et = tt.elem_type
    dtype = dtype_of(et) if et else None
    if not tt.HasField("shape"):
        return dtype, None
    new = []
    for d in tt.shape.dim:
        which = d.WhichOneof("value")  # one call instead of two HasField per dim
        if which == "dim_value":
            n = d.dim_value
            new.append(n if n >= 0 else None)
        elif which == "dim_param":
            new.append(d.dim_param)
        else:
            new.append(None)
    return dtype, tuple(new)


def _merge(v, dtype: DataType | None, new: tuple | None) -> None:
    if dtype is not None:
        v.dtype = dtype
    if new is None:
        return
    old = v.shape
    if old is not None and len(old) == len(new):
        # keep what the IR knew where inference is less precise (static beats symbolic beats unknown)
        new = tuple(o if (n is None or (isinstance(n, str) and static_dim(o))) and o is not None else n
                    for o, n in zip(old, new))
    v.shape = new
