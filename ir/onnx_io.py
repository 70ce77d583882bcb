"""ONNX ⇄ IR conversion, loading and atomic saving.

Parsing, serialization, external data and checking are the ``onnx`` package's;
this module only maps protos onto IR objects and back. Everything the IR does not
model (functions, training info, sparse initializers, non-tensor types) is kept
verbatim, and unmodified tensors are written from their original protos, so a
load→save round trip is lossless.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graft.ir._core import Graph, IRError, Model, Node, Tensor, Value
from graft.ir._gc import gc_paused
from graft.ir.dtypes import DataType, dtype_of

# ONNX protobuf cannot serialize more than 2 GiB in one message.
PROTOBUF_LIMIT = 2**31 - 1


class ModelLoadError(ValueError):
    """A file that is missing, unreadable or not a valid ONNX model."""


# --------------------------------------------------------------------------- tensors
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
    arr = numpy_helper.to_array(proto)
    arr.setflags(write=False)
    return arr


def constant_node_array(node: Node) -> np.ndarray | None:
    """The value of a ``Constant`` node given by any of its ``value_*`` attributes."""
    a = node.attrs
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    if "value_string" in a:
        return np.array(a["value_string"], dtype=object)
    if "value_strings" in a:
        return np.array(a["value_strings"], dtype=object)
    return None


def _tensor_to_proto(t: Tensor, name: str):
    if t.proto is not None:
        p = t.proto
        if p.name != name:
            p.name = name
        return p
    arr = t.array
    raw_dt = _RAW_NUMPY.get(int(t.dtype))
    if raw_dt is not None and raw_dt == arr.dtype and _LITTLE_ENDIAN:
        # what numpy_helper.from_array writes for these types, without its dispatch
        p = onnx.TensorProto()
        p.name = name
        p.data_type = int(t.dtype)
        p.dims.extend(arr.shape)
        p.raw_data = arr.tobytes()
    elif t.dtype == DataType.STRING:
        p = numpy_helper.from_array(np.asarray(arr, dtype=object), name)
    else:
        p = numpy_helper.from_array(arr, name)
        if p.data_type != int(t.dtype):
            p = helper.make_tensor(name, int(t.dtype), arr.shape, arr.tobytes(), raw=True)
    if t.doc_string:
        p.doc_string = t.doc_string
    t._proto = p
    return p


def _initializer_proto(v: Value, name: str):
    """The initializer's TensorProto with the value's ``graft.*`` metadata (rule provenance)."""
    p = _tensor_to_proto(v.const, name)
    if not v.meta:
        return p
    have = {e.key for e in p.metadata_props}
    for k, val in v.meta.items():
        if isinstance(val, str) and k.startswith("graft.") and k not in have:
            e = p.metadata_props.add()
            e.key, e.value = k, val
    return p


# --------------------------------------------------------------------------- types
def _read_type(tp) -> tuple[DataType | None, tuple | None]:
    if not tp.HasField("tensor_type"):
        return None, None
    tt = tp.tensor_type
    dtype = dtype_of(tt.elem_type) if tt.elem_type else None
    if not tt.HasField("shape"):
        return dtype, None
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dtype, tuple(dims)


def _set_type(v: Value, tp) -> None:
    v.dtype, v.shape = _read_type(tp)
    v.type_proto = tp
    v.meta["_typed_as"] = (v.dtype, v.shape)


def _value_info(v: Value):
    """A ValueInfoProto for ``v``: the original TypeProto when unchanged."""
    return _fill_value_info(onnx.ValueInfoProto(), v)


def _fill_value_info(vi, v: Value):
    """Write ``v``'s name, doc and type into ``vi`` (a message already inside its graph: no copy)."""
    vi.name = v.name
    if v.doc_string:
        vi.doc_string = v.doc_string
    if v.type_proto is not None and v.meta.get("_typed_as") == (v.dtype, v.shape):
        vi.type.CopyFrom(v.type_proto)
    elif v.dtype is not None:
        # what helper.make_tensor_type_proto builds, written in place
        tt = vi.type.tensor_type
        tt.elem_type = int(v.dtype)
        if v.shape is not None:
            shape = tt.shape
            shape.SetInParent()  # a scalar still has a (rank-0) shape
            for d in v.shape:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif isinstance(d, str):
                    dim.dim_param = d
                elif d is not None:
                    raise IRError(f"value {v.name!r} has dim {d!r} of type {type(d).__name__} in its shape; "
                                  f"dims are int, str (symbolic) or None")
    return vi


# --------------------------------------------------------------------------- import
class _Scope:
    def __init__(self, parent: "_Scope | None" = None):
        self.parent = parent
        self.values: dict[str, Value] = {}

    def lookup(self, name: str) -> Value | None:
        s = self
        while s is not None:
            v = s.values.get(name)
            if v is not None:
                return v
            s = s.parent
        return None


def _read_attr(a, scope: _Scope, parent_graph: Graph, where: str):
    t = a.type
    A = onnx.AttributeProto
    if t == A.FLOAT:
        return a.f
    if t == A.INT:
        return a.i
    if t == A.STRING:
        return a.s.decode("utf-8", errors="surrogateescape")
    if t == A.TENSOR:
        return Tensor(proto=a.t)
    if t == A.GRAPH:
        return _read_graph(a.g, _Scope(scope), parent=parent_graph)
    if t == A.FLOATS:
        return list(a.floats)
    if t == A.INTS:
        return list(a.ints)
    if t == A.STRINGS:
        return [s.decode("utf-8", errors="surrogateescape") for s in a.strings]
    if t == A.TENSORS:
        return [Tensor(proto=x) for x in a.tensors]
    if t == A.GRAPHS:
        return [_read_graph(g, _Scope(scope), parent=parent_graph) for g in a.graphs]
    # SPARSE_TENSOR(S), TYPE_PROTO(S): kept as protos.
    return helper.get_attribute_value(a)


def _read_graph(gp, scope: _Scope, *, parent: Graph | None = None, model: Model | None = None) -> Graph:
    g = Graph(gp.name, parent=parent, model=model)
    g.doc_string = gp.doc_string
    g._importing = True
    for vi in gp.input:
        v = Value(vi.name)
        _set_type(v, vi.type)
        v.doc_string = vi.doc_string
        g.add_input(v)
        scope.values[vi.name] = v
    for tp in gp.initializer:
        existing = scope.values.get(tp.name)
        t = Tensor(proto=tp)
        if existing is not None and existing.graph is g:
            # An input with a default value: keep it an input that carries the tensor.
            existing.const = t
            g.initializers[tp.name] = existing
            continue
        v = Value(tp.name, const=t)
        g.add_initializer(v)
        scope.values[tp.name] = v
    g.sparse_initializers = list(gp.sparse_initializer)
    infos = {vi.name: vi for vi in gp.value_info}
    local = scope.values  # most reads resolve in this graph: try its dict before the scope chain
    for np_ in gp.node:
        ins = []
        for name in np_.input:
            if name == "":
                ins.append(None)
                continue
            v = local.get(name)
            if v is None:
                v = scope.lookup(name)
            if v is None:
                where = f"node {np_.name or np_.op_type!r} ({np_.op_type})"
                raise ModelLoadError(
                    f"{where} in graph {gp.name!r} reads {name!r}, which no earlier node, input or "
                    f"initializer defines (the graph is not in topological order, has a cycle, or "
                    f"the value is dangling)")
            ins.append(v)
        outs = []
        for name in np_.output:
            v = Value(name)
            if name and name in infos:
                _set_type(v, infos[name].type)
                v.doc_string = infos[name].doc_string
            outs.append(v)
        node = Node(np_.op_type, ins, outs, domain=np_.domain, name=np_.name, overload=np_.overload)
        node.doc_string = np_.doc_string
        for a in np_.attribute:
            node.attrs[a.name] = _read_attr(a, scope, g, np_.name)
            node.attr_types[a.name] = a.type
            if a.ref_attr_name:
                node.meta.setdefault("_ref_attrs", {})[a.name] = a.ref_attr_name
        for e in np_.metadata_props:
            node.meta[e.key] = e.value
        g.append(node)
        for v in outs:
            if v.name:
                local[v.name] = v
    outs = []
    for vi in gp.output:
        v = scope.lookup(vi.name)
        if v is None:
            raise ModelLoadError(f"graph {gp.name!r} output {vi.name!r} is not produced by any node, "
                                 f"input or initializer")
        if v.type_proto is None or v.graph is not g:
            _set_type(v, vi.type)
        v.meta["_output_type"] = vi.type
        if vi.doc_string:
            v.doc_string = vi.doc_string
        outs.append(v)
    g.set_outputs(outs)
    g.value_info = {k: None for k in infos}
    for e in gp.metadata_props:
        g.meta[e.key] = e.value
    del g._importing
    return g


def from_onnx(proto: onnx.ModelProto) -> Model:
    """Convert a ``ModelProto`` into an IR :class:`Model`.

    Raises:
        ModelLoadError: a node reads a value that is not defined before it.
    """
    with gc_paused():  # bulk allocation: see ir/_gc.py
        return _from_onnx(proto)


def _from_onnx(proto: onnx.ModelProto) -> Model:
    m = Model(opset_imports={o.domain: o.version for o in proto.opset_import}, ir_version=proto.ir_version)
    m.graph = _read_graph(proto.graph, _Scope(), model=m)
    m.producer_name = proto.producer_name
    m.producer_version = proto.producer_version
    m.domain = proto.domain
    m.model_version = proto.model_version
    m.doc_string = proto.doc_string
    m.metadata_props = {e.key: e.value for e in proto.metadata_props}
    m.functions = list(proto.functions)
    m.training_info = list(proto.training_info)
    m.meta["_opset_order"] = [o.domain for o in proto.opset_import]
    # proto2 keeps field presence: an opset import written without `domain` must go out without it
    m.meta["_opset_domain_unset"] = {o.domain for o in proto.opset_import if not o.HasField("domain")}
    return m


# --------------------------------------------------------------------------- export
def _write_attr(name: str, value, atype: int | None):
    A = onnx.AttributeProto
    if isinstance(value, Tensor):
        a = A(name=name, type=A.TENSOR)
        a.t.CopyFrom(_tensor_to_proto(value, value.proto.name if value.proto is not None else ""))
        return a
    if isinstance(value, Graph):
        a = A(name=name, type=A.GRAPH)
        a.g.CopyFrom(_write_graph(value))
        return a
    if isinstance(value, list) and value and isinstance(value[0], Graph):
        a = A(name=name, type=A.GRAPHS)
        a.graphs.extend(_write_graph(g) for g in value)
        return a
    if isinstance(value, list) and value and isinstance(value[0], Tensor):
        a = A(name=name, type=A.TENSORS)
        a.tensors.extend(_tensor_to_proto(t, "") for t in value)
        return a
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (np.integer,)):
        value = int(value)
    if isinstance(value, (np.floating,)):
        value = float(value)
    if isinstance(value, (list, tuple)):
        value = [v.item() if isinstance(v, np.generic) else v for v in value]
    return helper.make_attribute(name, value, attr_type=atype)


_A = onnx.AttributeProto


def _fill_plain_attr(a, name: str, value, atype: int | None) -> bool:
    """Write an int/float/str or a non-empty list of ints/floats into ``a`` as
    ``helper.make_attribute`` would; False (``a`` untouched) for anything else."""
    t = type(value)
    if t is int and atype in (None, _A.INT):
        a.name, a.type, a.i = name, _A.INT, value
    elif t is float and atype in (None, _A.FLOAT):
        a.name, a.type, a.f = name, _A.FLOAT, value
    elif t is str and atype in (None, _A.STRING):
        # surrogateescape: the inverse of how strings were read, so any bytes round-trip
        a.name, a.type, a.s = name, _A.STRING, value.encode("utf-8", errors="surrogateescape")
    elif t is list and value and atype in (None, _A.INTS) and all(type(x) is int for x in value):
        a.name, a.type = name, _A.INTS
        a.ints.extend(value)
    elif t is list and value and atype in (None, _A.FLOATS) and all(type(x) is float for x in value):
        a.name, a.type = name, _A.FLOATS
        a.floats.extend(value)
    else:
        return False
    return True


def node_proto(n: Node) -> onnx.NodeProto:
    """A fresh ``NodeProto`` of ``n`` (op, attributes, input and output names; subgraphs included)."""
    return _fillnode_proto(onnx.NodeProto(), n)


def _fillnode_proto(p, n: Node) -> onnx.NodeProto:
    """Write node ``n`` into ``p`` (a message already inside its graph: no copy)."""
    p.op_type = n.op_type
    if n.domain:
        p.domain = n.domain
    if n.name:
        p.name = n.name
    if n.overload:
        p.overload = n.overload
    if n.doc_string:
        p.doc_string = n.doc_string
    p.input.extend(["" if v is None else v.name for v in n._inputs])
    p.output.extend([v.name for v in n.outputs])
    refs = n.meta.get("_ref_attrs", {})
    for k, v in n.attrs.items():
        a = p.attribute.add()
        atype = n.attr_types.get(k)
        if not _fill_plain_attr(a, k, v, atype):
            a.CopyFrom(_write_attr(k, v, atype))
        if k in refs:
            a.ref_attr_name = refs[k]
    for k, v in n.meta.items():
        if isinstance(v, str) and not k.startswith("_"):
            e = p.metadata_props.add()
            e.key, e.value = k, v
    return p


def _write_graph(g: Graph, gp: onnx.GraphProto | None = None, stub_over: int | None = None) -> onnx.GraphProto:
    # writing into the caller's message (to_onnx) avoids one full copy of every tensor
    gp = onnx.GraphProto() if gp is None else gp
    gp.name = g.name
    if g.doc_string:
        gp.doc_string = g.doc_string
    for v in g.inputs:
        _fill_value_info(gp.input.add(), v)
    stubs = []
    for name, v in g.initializers.items():
        # the element count alone clears most tensors (no element type is wider than 16 bytes)
        if stub_over is not None and math.prod(v.const.shape) > stub_over // 16 and \
                v.const.nbytes > stub_over and v.dtype != DataType.STRING:
            stubs.append(v)
            continue
        # add().CopyFrom, not extend: upb's extend serializes, which fails for a tensor over 2 GiB
        gp.initializer.add().CopyFrom(_initializer_proto(v, name))
    input_set = g._input_set
    for v in stubs:
        if v not in input_set:
            _fill_value_info(gp.input.add(), v)
    gp.sparse_initializer.extend(g.sparse_initializers)
    add_node = gp.node.add
    for n in g:
        _fillnode_proto(add_node(), n)
    for v in g.outputs:
        vi = _fill_value_info(gp.output.add(), v)
        ot = v.meta.get("_output_type")
        if ot is not None and v.meta.get("_typed_as") == (v.dtype, v.shape):
            vi.type.CopyFrom(ot)
    # value_info: the original entries still present, then values typed since.
    io = {v.name for v in g.inputs} | {v.name for v in g.outputs} | set(g.initializers)
    emitted = set()
    by_name = {}
    for n in g:
        for o in n.outputs:
            if o.name and o.dtype is not None and o.name not in io:
                by_name[o.name] = o
    for name in list(g.value_info) + list(by_name):
        if name in by_name and name not in emitted:
            _fill_value_info(gp.value_info.add(), by_name[name])
            emitted.add(name)
    for k, v in g.meta.items():
        if isinstance(v, str) and not k.startswith("_"):
            e = gp.metadata_props.add()
            e.key, e.value = k, v
    return gp


def to_onnx(model: Model, *, stub_initializers_over: int | None = None) -> onnx.ModelProto:
    """Convert an IR :class:`Model` back to a ``ModelProto`` (no checking).

    ``stub_initializers_over``: main-graph initializers larger than this many bytes are
    written as typed graph inputs without their data (a model for shape inference, which
    needs only their types: the bytes are never copied).
    """
    with gc_paused():  # bulk allocation: see ir/_gc.py
        return _to_onnx(model, stub_initializers_over)


def _to_onnx(model: Model, stub_over: int | None = None) -> onnx.ModelProto:
    mp = onnx.ModelProto()
    mp.ir_version = model.ir_version
    order = model.meta.get("_opset_order", [])
    domains = [d for d in order if d in model.opset_imports] + \
        [d for d in model.opset_imports if d not in order]
    unset = model.meta.get("_opset_domain_unset", ())
    for d in domains:
        o = mp.opset_import.add()
        if d or d not in unset:
            o.domain = d
        o.version = model.opset_imports[d]
    for attr in ("producer_name", "producer_version", "domain", "doc_string"):
        val = getattr(model, attr)
        if val:
            setattr(mp, attr, val)
    if model.model_version:
        mp.model_version = model.model_version
    props = dict(model.metadata_props)
    log = model.meta.get("graft.reconnected")
    if log:
        import json

        # rewrites that created nothing (see graft.compiler.engine.rewriter.RECONNECTED_LOG), appended to any earlier log
        earlier = json.loads(props.get("graft.reconnected", "[]"))
        props["graft.reconnected"] = json.dumps(earlier + [list(x) for x in log])
    for k, v in props.items():
        e = mp.metadata_props.add()
        e.key, e.value = k, v
    mp.functions.extend(model.functions)
    mp.training_info.extend(model.training_info)
    _write_graph(model.graph, mp.graph, stub_over)
    return mp


# --------------------------------------------------------------------------- files
def load_proto(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX file (with its external data) and optionally run ``onnx.checker``.

    Raises:
        ModelLoadError: missing file, not a protobuf ModelProto, truncated, or
            rejected by ``onnx.checker`` (the message names the file and the reason).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    try:
        data = path.read_bytes()
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError, ... by version
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e}). "
                             f"Is the file truncated or of another format?") from None
    # Every external tensor names its file under the key "location" (ONNX external data spec):
    # bytes without that word have none, and onnx.load's walk over every tensor and attribute
    # (~30 ms at 10k nodes) is skipped
    if b"location" in data:
        del data
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as e:  # ValidationError, OSError, ... by onnx version
            why = " ".join(str(e).split())[:400] or type(e).__name__
            raise ModelLoadError(f"{path}: cannot read its external data ({why}); the data files must "
                                 f"stay where the model's tensors say, relative to the model's folder") from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise ModelLoadError(f"{path}: parsed, but holds no ONNX graph (is it an ONNX model file?)")
    if check:
        check_proto(proto, where=str(path), path=path)
    return proto


def exceeds_protobuf_limit(proto: onnx.ModelProto) -> bool:
    """True when ``proto`` cannot be serialized as one protobuf message (over 2 GiB).

    In-proto tensor bytes are summed first from dims × element size (no copies),
    because upb's ``ByteSize`` serializes the whole message and raises past the limit.
    """
    est = 0
    for t in _all_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        est += _tensor_nbytes(t)
        if est > PROTOBUF_LIMIT:
            return True
    try:
        return proto.ByteSize() > PROTOBUF_LIMIT
    except Exception:  # google.protobuf.message.EncodeError: past the limit
        return True


def check_proto(proto: onnx.ModelProto, *, where: str = "model", full: bool = False,
                path: str | os.PathLike | None = None) -> None:
    """Run ``onnx.checker`` (by path for models over 2 GiB).

    Args:
        path: the file ``proto`` was loaded from, if any: a model over 2 GiB is
            then checked from that file (it must hold its tensors as external data).
            Without it, a copy of ``proto`` is written to a temporary directory;
            ``proto`` itself is never modified.

    Raises:
        ModelLoadError: naming ``where`` and the checker's first line.
    """
    try:
        if exceeds_protobuf_limit(proto):
            if path is not None:
                onnx.checker.check_model(str(path), full_check=full)
                return
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)  # save_model(save_as_external_data=True) empties the tensors it moves out
            with tempfile.TemporaryDirectory() as d:
                p = os.path.join(d, "m.onnx")
                onnx.save_model(copy, p, save_as_external_data=True, location="m.onnx.data")
                del copy
                onnx.checker.check_model(p, full_check=full)
        else:
            onnx.checker.check_model(proto, full_check=full)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ModelLoadError(f"{where}: fails onnx.checker: {first}") from None
    except onnx.shape_inference.InferenceError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelLoadError(f"{where}: fails onnx shape inference: {first}") from None


def load(path: str | os.PathLike, *, check: bool = True) -> Model:
    """Load an ONNX file into the IR. See :func:`load_proto` for errors."""
    proto = load_proto(path, check=check)
    try:
        return from_onnx(proto)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to query it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
               data: bytes | None = None) -> None:
    """Write ``proto`` to ``path`` atomically: to a temporary file, then rename.

    Models over 2 GiB (or with ``external_data=True``) go out with their tensors
    in ``<name>.data`` beside the file (tensors under 1 KiB stay inline; no data
    file when none is larger). Nothing is left at ``path`` if writing fails.
    With external data, ``proto`` itself is changed: the moved tensors point at
    the data file and hold no bytes (as with ``onnx.save_model``); :func:`save`
    passes a fresh proto, so IR models are unaffected.

    ``data``: ``proto.SerializeToString()`` when the caller already has it (a model under
    2 GiB written as one file); written as is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        external_data = False
    elif external_data is None:
        external_data = exceeds_protobuf_limit(proto)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file 0600; the model gets the permissions a plain open() would give it
    os.chmod(tmp, 0o666 & ~_umask())
    data_name = path.name + ".data"
    tmp_data = None
    try:
        if external_data:
            tmp_data = Path(tmp + ".data")
            moved = _move_tensors_out(proto, tmp_data, data_name)
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString())
            if moved:
                os.replace(tmp_data, path.parent / data_name)
            else:  # every tensor is under the threshold: one self-contained file
                os.unlink(tmp_data)
            tmp_data = None
        else:
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString() if data is None else data)
        os.replace(tmp, path)
    except BaseException:
        for p in (tmp, tmp_data):
            if p is not None and os.path.exists(p):
                os.unlink(p)
        raise


# Tensors smaller than this stay inside the .onnx file (onnx.save_model's default threshold).
EXTERNAL_DATA_THRESHOLD = 1024
# Data offsets are page-aligned so onnxruntime can memory-map each tensor.
_EXTERNAL_ALIGN = 4096


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from dims × element width (reads no data; 0 for strings/unknown types)."""
    try:
        bits = DataType(t.data_type).bitwidth
    except (TypeError, ValueError, KeyError):
        bits = 0
    return (math.prod(t.dims) * bits) // 8  # exact ints; np.prod costs microseconds per tensor


def _move_tensors_out(proto: onnx.ModelProto, data_file: Path, location: str) -> int:
    """Write each raw tensor of ``EXTERNAL_DATA_THRESHOLD`` bytes or more to ``data_file`` and point
    ``proto`` at it under ``location`` (ONNX external data: location/offset/length). Returns the count.

    Each tensor's bytes are read once: upb copies ``raw_data`` on every access, which for a
    multi-GB tensor costs seconds (onnx.save_model reads it several times).
    """
    from onnx.external_data_helper import set_external_data

    moved = 0
    with open(data_file, "wb") as f:
        for t in _all_tensors(proto):
            if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data") \
                    or _tensor_nbytes(t) < EXTERNAL_DATA_THRESHOLD:
                continue
            offset = f.tell()
            if offset % _EXTERNAL_ALIGN:
                f.write(b"\0" * (_EXTERNAL_ALIGN - offset % _EXTERNAL_ALIGN))
                offset = f.tell()
            data = t.raw_data
            f.write(data)
            set_external_data(t, location, offset=offset, length=len(data))
            del data
            t.ClearField("raw_data")
            moved += 1
    return moved


def _all_tensors(m: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(m)


def save(model: Model, path: str | os.PathLike, **kw) -> None:
    """Export ``model`` and write it atomically (see :func:`save_proto`)."""
    save_proto(to_onnx(model), path, **kw)
