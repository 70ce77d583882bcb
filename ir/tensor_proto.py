"""ONNX ``TensorProto`` ⇄ numpy, for :class:`graft.ir.Tensor` (decoded lazily, encoded on save).

Below the IR core: a :class:`~graft.ir.Tensor` decodes its proto on first use and builds one when
:mod:`graft.ir.onnx_io` writes it, so the core does not import the ONNX converter. Semantics are
``onnx.numpy_helper``'s (https://onnx.ai/onnx/api/numpy_helper.html); the common raw little-endian
types skip its per-call dispatch.
"""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graft.ir import external_data
from graft.ir.dtypes import DataType

# Element types whose raw_data is one little-endian numpy scalar per element: read with
# np.frombuffer directly (what numpy_helper.to_array ends up doing, without its dispatch).
_RAW_NUMPY = {int(k): np.dtype(v) for k, v in (
    (onnx.TensorProto.FLOAT, np.float32), (onnx.TensorProto.DOUBLE, np.float64),
    (onnx.TensorProto.FLOAT16, np.float16), (onnx.TensorProto.BOOL, np.bool_),
    (onnx.TensorProto.INT8, np.int8), (onnx.TensorProto.INT16, np.int16),
    (onnx.TensorProto.INT32, np.int32), (onnx.TensorProto.INT64, np.int64),
    (onnx.TensorProto.UINT8, np.uint8), (onnx.TensorProto.UINT16, np.uint16),
    (onnx.TensorProto.UINT32, np.uint32), (onnx.TensorProto.UINT64, np.uint64))}
_LITTLE_ENDIAN = sys.byteorder == "little"


def _narrow_numpy() -> dict[int, np.dtype]:
    """Two-byte and one-byte float types with one ml_dtypes scalar per element (memory-mappable)."""
    import ml_dtypes

    T = onnx.TensorProto
    return {int(k): np.dtype(v) for k, v in (
        (T.BFLOAT16, ml_dtypes.bfloat16), (T.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn),
        (T.FLOAT8E4M3FNUZ, ml_dtypes.float8_e4m3fnuz), (T.FLOAT8E5M2, ml_dtypes.float8_e5m2),
        (T.FLOAT8E5M2FNUZ, ml_dtypes.float8_e5m2fnuz))}


_NARROW_NUMPY = _narrow_numpy()
_EXTERNAL = onnx.TensorProto.EXTERNAL


def tensor_proto_to_array(proto, shape: tuple | None = None) -> np.ndarray:
    """The tensor's data as a read-only array (``onnx.numpy_helper.to_array`` semantics).

    ``shape``: the proto's dims when the caller already has them as a tuple.
    """
    dt = _RAW_NUMPY.get(proto.data_type)
    if dt is not None and _LITTLE_ENDIAN:
        raw = proto.raw_data  # b"" when unset: an empty raw_data goes through numpy_helper as before
        if raw and proto.data_location != _EXTERNAL and not proto.HasField("segment"):
            arr = np.frombuffer(raw, dtype=dt)
            if shape is None:
                shape = tuple(proto.dims)
            # a 1-D tensor of the right length needs no reshape (a third of the decode of a small tensor)
            # (read-only already: a view of immutable bytes)
            return arr if len(shape) == 1 and arr.shape == shape else arr.reshape(shape)
    if proto.data_location == _EXTERNAL and external_data.is_lazy(proto):
        return _lazy_array(proto, shape)
    arr = numpy_helper.to_array(proto)
    arr.setflags(write=False)
    return arr


def _lazy_array(proto, shape: tuple | None) -> np.ndarray:
    """A tensor still in its external data file (:mod:`graft.ir.external_data`): a read-only memory map
    for the one-element-per-scalar types, else its bytes decoded as an in-memory tensor would be."""
    shape = tuple(proto.dims) if shape is None else shape
    dt = _RAW_NUMPY.get(proto.data_type) or _NARROW_NUMPY.get(proto.data_type)
    if dt is not None and _LITTLE_ENDIAN:
        return external_data.array(proto, shape, dt)
    inline = onnx.TensorProto()
    inline.CopyFrom(proto)
    inline.raw_data = external_data.read_bytes(proto)
    inline.data_location = onnx.TensorProto.DEFAULT
    del inline.external_data[:]
    arr = numpy_helper.to_array(inline)
    arr.setflags(write=False)
    return arr


def raw_numpy_dtype(dtype: DataType) -> np.dtype | None:
    """The numpy dtype whose little-endian bytes are ``dtype``'s ONNX raw_data, one element per
    scalar (float, ints, bool, float16), or None (packed, ml_dtypes or string types)."""
    return _RAW_NUMPY.get(int(dtype))


def array_to_proto(arr: np.ndarray, dtype: DataType, name: str) -> onnx.TensorProto:
    """A new ``TensorProto`` named ``name`` holding ``arr`` as element type ``dtype``.

    The raw little-endian types are written as ``numpy_helper.from_array`` writes them, without its
    dispatch; strings as a list of bytes; a numpy type that is not ``dtype`` itself (bf16, fp8, int4
    through ml_dtypes) as raw bytes tagged ``dtype``.
    """
    raw_dt = _RAW_NUMPY.get(int(dtype))
    if raw_dt is not None and raw_dt == arr.dtype and _LITTLE_ENDIAN:
        p = onnx.TensorProto()
        p.name = name
        p.data_type = int(dtype)
        p.dims.extend(arr.shape)
        p.raw_data = arr.tobytes()
    elif dtype == DataType.STRING:
        p = numpy_helper.from_array(np.asarray(arr, dtype=object), name)
    else:
        p = numpy_helper.from_array(arr, name)
        if p.data_type != int(dtype):
            p = helper.make_tensor(name, int(dtype), arr.shape, arr.tobytes(), raw=True)
    return p


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every ``TensorProto`` in ``model`` that can hold data, in place (edits reach the model).

    First the initializers (main graph, then each subgraph's, depth first), then the
    tensor-valued attributes (``Constant`` values and the like) of the main graph with its
    subgraphs, then of each function: the tensors and the order ``onnx.external_data_helper``
    walks when it saves external data.
    """
    yield from _initializers(model.graph)
    yield from _attribute_tensors(model.graph)
    for f in model.functions:
        yield from _attribute_tensors(f)


def initializer_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The initializers of the main graph and of every subgraph, depth first, in place."""
    return _initializers(model.graph)


def _subgraphs(attr: onnx.AttributeProto) -> Iterator[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                yield from _initializers(sub)


def _attribute_tensors(graph) -> Iterator[onnx.TensorProto]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in _subgraphs(attr):
                yield from _attribute_tensors(sub)
