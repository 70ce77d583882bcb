"""ONNX ⇄ IR conversion, loading and atomic saving.

Parsing, serialization, external data and checking are the ``onnx`` package's;
this module only maps protos onto IR objects and back. Everything the IR does not
model (functions, training info, sparse initializers, non-tensor types) is kept
verbatim, and unmodified tensors are written from their original protos, so a
load→save round trip is lossless.

Large models: :func:`load` leaves weights in their external data files (memory-mapped when
read, :mod:`graft.ir.external_data`), and :func:`save` streams them to the output's data file
one tensor at a time, file to file where they were never changed (issue 11).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from graft.ir import external_data as extdata
from graft.ir._core import Graph, IRError, Model, Node, Tensor, Value
from graft.ir._gc import gc_paused
from graft.ir.dtypes import DataType, dtype_of
from graft.ir.tensor_proto import model_tensors

# ONNX protobuf cannot serialize more than 2 GiB in one message.
PROTOBUF_LIMIT = 2**31 - 1


class ModelLoadError(ValueError):
    """A file that is missing, unreadable or not a valid ONNX model."""


# --------------------------------------------------------------------------- tensors
# How to_onnx writes tensors still in an external data file (graft.ir.external_data): None (read the
# bytes in: a self-contained proto), "keep" (leave the reference: a proto for graft's own round
# trips, not valid ONNX), or a _DataSink (write large initializers to the output's data file).
_EXPORT: contextvars.ContextVar = contextvars.ContextVar("graft_export_external", default=None)


def _initializer_proto(v: Value, name: str):
    """The initializer's TensorProto with the value's ``graft.*`` metadata (rule provenance)."""
    mode = _EXPORT.get()
    if isinstance(mode, _DataSink) and mode.wants(v.const):
        p = mode.write(v.const, name)
    else:
        p = v.const.to_proto(name)
        if mode != "keep" and p.data_location == onnx.TensorProto.EXTERNAL and extdata.is_lazy(p):
            p = _inlined(p, v.const.nbytes)
    if not v.meta:
        return p
    have = {e.key for e in p.metadata_props}
    for k, val in v.meta.items():
        if isinstance(val, str) and k.startswith("graft.") and k not in have:
            e = p.metadata_props.add()
            e.key, e.value = k, val
    return p


def _inlined(p: onnx.TensorProto, nbytes: int) -> onnx.TensorProto:
    """A copy of lazy external tensor ``p`` holding its bytes (what a self-contained proto needs)."""
    q = onnx.TensorProto()
    q.CopyFrom(p)
    del q.external_data[:]
    q.data_location = onnx.TensorProto.DEFAULT
    q.raw_data = extdata.read_bytes(p, nbytes if p.data_type != onnx.TensorProto.STRING else None)
    return q


class _DataSink:
    """Writes initializers of ``threshold`` bytes or more to an open external data file, each at a
    4 KiB-aligned offset, and returns the stub TensorProto pointing at them (ONNX external data).

    Bytes go file to file when the tensor is still in its input's data file, else straight from
    the array's buffer: no TensorProto copy of a large tensor is ever built."""

    def __init__(self, f, location: str, threshold: int):
        self.f, self.location, self.threshold = f, location, threshold
        self.count = 0
        self.copied: list[tuple[onnx.TensorProto, int, int]] = []  # lazy sources: (proto, new offset, length)

    def wants(self, t: Tensor) -> bool:
        return t.dtype != DataType.STRING and t.nbytes >= self.threshold

    def write(self, t: Tensor, name: str) -> onnx.TensorProto:
        f = self.f
        offset = f.tell()
        if offset % _EXTERNAL_ALIGN:
            f.write(b"\0" * (_EXTERNAL_ALIGN - offset % _EXTERNAL_ALIGN))
            offset = f.tell()
        p = t.proto
        n = t.nbytes
        # a tensor with a proto was loaded, never changed (arrays are read-only): the proto's bytes are its data
        if p is not None and p.data_location == onnx.TensorProto.EXTERNAL and extdata.is_lazy(p):
            extdata.copy_range(p, f, n)
            self.copied.append((p, offset, n))
        elif p is not None and p.HasField("raw_data"):
            f.write(p.raw_data)
        else:
            _write_array(f, t.array, t.dtype, name)
        written = f.tell() - offset
        if written != n:
            raise IRError(f"initializer {name!r} ({t.dtype.name.lower()} {list(t.shape)}) wrote {written} bytes of "
                          f"external data, {n} expected")
        stub = onnx.TensorProto(name=name, data_type=int(t.dtype), dims=list(t.shape))
        if p is not None:
            if p.doc_string:
                stub.doc_string = p.doc_string
            stub.metadata_props.extend(p.metadata_props)
        elif t.doc_string:
            stub.doc_string = t.doc_string
        extdata.point_at(stub, self.location, offset, n)
        self.count += 1
        return stub


def _write_array(f, arr: np.ndarray, dtype: DataType, name: str) -> None:
    """Write ``arr``'s ONNX raw bytes (little-endian; 4-bit types packed two per byte) to ``f``."""
    from graft.ir.tensor_proto import array_to_proto, raw_numpy_dtype

    raw = raw_numpy_dtype(dtype)
    if raw is not None and arr.dtype == raw and sys.byteorder == "little":
        f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        return
    p = array_to_proto(arr, dtype, name)  # packing (int4, ...) is onnx's: one tensor's copy at a time
    f.write(p.raw_data)


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


def _read_graph(gp, scope: _Scope, *, parent: Graph | None = None, model: Model | None = None,
                constant_inits: frozenset = frozenset()) -> Graph:
    """``constant_inits``: names of initializers also listed as graph inputs that become plain
    initializers (constants), not inputs (:func:`from_onnx`'s ``fold_initializer_inputs``)."""
    g = Graph(gp.name, parent=parent, model=model)
    g.doc_string = gp.doc_string
    g._importing = True
    for vi in gp.input:
        if vi.name in constant_inits:
            continue
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


# The first IR version in which an initializer need not be a graph input (ONNX IR spec,
# "Graphs": "IR version 3 and earlier required all initializers to be graph inputs").
IR_VERSION_INITIALIZERS_NOT_INPUTS = 4
# Model.meta key: names of the initializers from_onnx(fold_initializer_inputs=True) took out of the inputs.
FOLDED_INITIALIZER_INPUTS = "_folded_initializer_inputs"


def initializer_inputs(proto: onnx.ModelProto) -> list[str]:
    """Names of the main graph's initializers that are also listed as graph inputs.

    In IR version 3 and earlier every initializer had to be listed so; from IR version 4 on,
    such an input is an input with a default value that a caller may override.
    """
    listed = {vi.name for vi in proto.graph.input}
    return [t.name for t in proto.graph.initializer if t.name in listed]


def from_onnx(proto: onnx.ModelProto, *, fold_initializer_inputs: bool = False) -> Model:
    """Convert a ``ModelProto`` into an IR :class:`Model`.

    Args:
        fold_initializer_inputs: initializers of the main graph that are also graph inputs
            become constants (plain initializers), no longer inputs, so rules can fold them;
            what onnxsim and onnxruntime offer for models of IR version < 4, where every
            initializer is listed as an input. The model's ``ir_version`` is raised to 4 when
            lower (IR 4 is the first that allows an initializer which is not an input), and
            ``model.meta[FOLDED_INITIALIZER_INPUTS]`` lists the names taken out of the inputs.
            False (the default) keeps them inputs with default values: a lossless import.

    Raises:
        ModelLoadError: a node reads a value that is not defined before it.
    """
    with gc_paused():  # bulk allocation: see ir/_gc.py
        return _from_onnx(proto, fold_initializer_inputs)


def _from_onnx(proto: onnx.ModelProto, fold_initializer_inputs: bool = False) -> Model:
    m = Model(opset_imports={o.domain: o.version for o in proto.opset_import}, ir_version=proto.ir_version)
    folded = initializer_inputs(proto) if fold_initializer_inputs else []
    m.graph = _read_graph(proto.graph, _Scope(), model=m, constant_inits=frozenset(folded))
    if folded:
        m.ir_version = max(m.ir_version, IR_VERSION_INITIALIZERS_NOT_INPUTS)
        m.meta[FOLDED_INITIALIZER_INPUTS] = folded
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
        a.t.CopyFrom(value.to_proto(value.proto.name if value.proto is not None else ""))
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
        a.tensors.extend(t.to_proto("") for t in value)
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


def to_onnx(model: Model, *, stub_initializers_over: int | None = None,
            keep_external: bool = False) -> onnx.ModelProto:
    """Convert an IR :class:`Model` back to a ``ModelProto`` (no checking).

    ``stub_initializers_over``: main-graph initializers larger than this many bytes are
    written as typed graph inputs without their data (a model for shape inference, which
    needs only their types: the bytes are never copied).

    ``keep_external``: initializers still in their input's external data file
    (:func:`load` with ``lazy=True``) stay references to it, marked with
    :data:`graft.ir.extdata.BASE_KEY`: no bytes are read, and :func:`from_onnx` of the
    result reads them lazily again, but the proto is not valid ONNX until :func:`save_proto`
    writes it. False (the default): their bytes are read in, a self-contained proto.
    """
    token = _EXPORT.set("keep" if keep_external else None)
    try:
        with gc_paused():  # bulk allocation: see ir/_gc.py
            return _to_onnx(model, stub_initializers_over)
    finally:
        _EXPORT.reset(token)


def _to_onnx(model: Model, stub_over: int | None = None) -> onnx.ModelProto:
    mp = onnx.ModelProto()
    mp.ir_version = model.ir_version
    if model.ir_version < IR_VERSION_INITIALIZERS_NOT_INPUTS and _has_initializer_not_input(model):
        # a rule made a new constant (constant_to_initializer, a fold): IR 3 would need it listed
        # as an input, which would make it overridable; IR 4 holds it as it is
        mp.ir_version = IR_VERSION_INITIALIZERS_NOT_INPUTS
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


def _has_initializer_not_input(model: Model) -> bool:
    for g in model.all_graphs():
        inputs = g._input_set
        if any(v not in inputs for v in g.initializers.values()):
            return True
    return False


# --------------------------------------------------------------------------- files
def load_proto(path: str | os.PathLike, *, check: bool = True, lazy: bool = False) -> onnx.ModelProto:
    """Read an ONNX file (with its external data) and optionally run ``onnx.checker``.

    ``lazy``: initializers kept in external data files stay there: each is checked (its file is
    a regular file inside the model's folder and holds the bytes its dims need) and marked with
    :data:`graft.ir.extdata.BASE_KEY`; its bytes are memory-mapped when first read
    (:func:`from_onnx` → ``Tensor.array``). The proto is then for graft (``from_onnx``,
    ``save_proto``), not valid ONNX for other tools. Tensor attributes are always read in.

    Raises:
        ModelLoadError: missing file, not a protobuf ModelProto, truncated, external data
            missing or short (naming the tensor and its file), or rejected by ``onnx.checker``
            (the message names the file and the reason).
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
        # (tensor, its external_data entries): loading clears the entries, the message needs them
        external = [(t, {e.key: e.value for e in t.external_data}) for t in model_tensors(proto)
                    if t.data_location == onnx.TensorProto.EXTERNAL]
        if lazy:
            _attach_lazy(path, proto, external)
            external = []
        try:
            if external:
                onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as e:  # ValidationError, OSError, ... by onnx version
            why = " ".join(str(e).split())[:400] or type(e).__name__
            raise ModelLoadError(f"{path}: cannot read its external data from {_data_files(path, external, why)} "
                                 f"({why}); the data files must stay where the model's tensors say, relative to "
                                 f"the model's folder, and whole") from None
        _check_external_sizes(path, external)
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise ModelLoadError(f"{path}: parsed, but holds no ONNX graph (is it an ONNX model file?)")
    if check:
        check_proto(proto, where=str(path), path=path)
    return proto


def _initializer_ids(proto: onnx.ModelProto) -> set[int]:
    """``id`` of every initializer message of the main graph and its subgraphs (valid while ``proto`` lives)."""
    from graft.ir.tensor_proto import initializer_tensors

    return {id(t) for t in initializer_tensors(proto)}


def _attach_lazy(path: Path, proto: onnx.ModelProto, external) -> None:
    """:func:`load_proto` ``lazy=True``: check each external tensor's file and size, mark initializers
    lazy (:func:`graft.ir.extdata.attach`), read the rest (tensor attributes) in.

    Raises:
        ModelLoadError: the messages of the eager path (the data file at fault, the tensor, the sizes).
    """
    inits = _initializer_ids(proto)
    base = path.parent
    for t, info in external:
        loc = info.get("location", "")
        where = base / loc if loc else base
        try:
            f = extdata.resolve(base, loc, t.name)
            size = f.stat().st_size
            offset = int(info.get("offset", 0) or 0)
            length = info.get("length")
            if offset > size:
                raise extdata.ExternalDataError(
                    f"External data offset ({offset}) exceeds file size ({size}) for tensor {t.name!r}")
            got = size - offset
            if length not in (None, ""):
                if int(length) > got:
                    raise extdata.ExternalDataError(
                        f"External data length ({length}) exceeds available data ({got} bytes from offset "
                        f"{offset}) for tensor {t.name!r}")
                got = int(length)
        except (OSError, ValueError) as e:
            why = " ".join(str(e).split())[:400] or type(e).__name__
            raise ModelLoadError(f"{path}: cannot read its external data from {where} ({why}); the data files "
                                 f"must stay where the model's tensors say, relative to the model's folder, and "
                                 f"whole") from None
        _check_size(path, t, info, got)
        if id(t) in inits:
            extdata.attach(t, base)
        else:
            onnx.external_data_helper.load_external_data_for_tensor(t, str(base))


def _data_files(path: Path, tensors, why: str) -> str:
    """The external data file at fault: the one of the tensor ``why`` (onnx's message) names,
    else the model's data file(s)."""
    import re

    by_name = {t.name: info.get("location", "?") for t, info in tensors}
    named = re.search(r"tensor '([^']*)'", why)
    if named and named.group(1) in by_name:
        return str(path.parent / by_name[named.group(1)])
    files = sorted(set(by_name.values()))
    return ", ".join(str(path.parent / f) for f in files[:3]) + (f" (and {len(files) - 3} more)" if len(files) > 3
                                                                 else "")


def _check_external_sizes(path: Path, tensors) -> None:
    """``tensors``: (TensorProto, its external_data entries as a dict) after loading.

    Raise ModelLoadError naming the tensor and its data file when a tensor read from external
    data holds fewer or more bytes than its dims and element type need (a data file cut short
    and a tensor without a ``length`` key read to the end of the file)."""
    for t, info in tensors:
        _check_size(path, t, info, len(t.raw_data))


def _check_size(path: Path, t: onnx.TensorProto, info: dict, got: int) -> None:
    """Raise ModelLoadError when ``got`` bytes of external data are not what ``t``'s dims and type need."""
    try:
        bits = DataType(t.data_type).bitwidth
    except (TypeError, ValueError, KeyError):
        return
    if not bits or t.data_type == onnx.TensorProto.STRING:
        return
    want = (math.prod(t.dims) * bits + 7) // 8
    if got != want:
        where = path.parent / info.get("location", "?")
        offset = info.get("offset", "0")
        raise ModelLoadError(
            f"{path}: tensor {t.name!r} ({DataType(t.data_type).name.lower()} {list(t.dims)}) needs {want} bytes "
            f"of external data, but {got} were read from {where} at offset {offset} (the data file is "
            f"truncated or belongs to another model; copy it again with the model)")


def untyped_values(proto: onnx.ModelProto) -> list[str]:
    """``graph input 'x' has no type`` / ``graph output 'y' has no shape`` … for each main-graph
    input or output without a type, a tensor type without an element type, or a tensor type
    without a shape field (ONNX requires all three; onnx.checker's own message names none of them)."""
    def missing(vi) -> str | None:
        kind = vi.type.WhichOneof("value") if vi.HasField("type") else None
        if kind is None:
            return "no type"
        if kind == "tensor_type":
            if not vi.type.tensor_type.elem_type:
                return "no element type"
            if not vi.type.tensor_type.HasField("shape"):
                return "no shape"
        return None

    g = proto.graph
    return [f"graph {kind} {vi.name!r} has {what}" for kind, vis in (("input", g.input), ("output", g.output))
            for vi in vis if (what := missing(vi)) is not None]


def check_typed(proto: onnx.ModelProto, where: str) -> None:
    """Raise ModelLoadError naming the first main-graph input or output without a type, an element
    type or a shape (see :func:`untyped_values`), before onnx.checker reports it without a name."""
    untyped = untyped_values(proto)
    if untyped:
        raise ModelLoadError(f"{where}: {untyped[0]} (ONNX requires an element type and a shape — its dims may "
                             f"be symbolic or unknown — on every graph input and output; set them, e.g. with "
                             f"onnx.helper.make_tensor_value_info, or re-export the model)")


def has_lazy_tensors(proto: onnx.ModelProto) -> bool:
    """True when a tensor of ``proto`` is still in an external file (:func:`load_proto` ``lazy=True``)."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL and extdata.is_lazy(t)
               for t in model_tensors(proto))


def exceeds_protobuf_limit(proto: onnx.ModelProto) -> bool:
    """True when ``proto`` cannot be serialized as one protobuf message (over 2 GiB).

    In-proto tensor bytes are summed first from dims × element size (no copies),
    because upb's ``ByteSize`` serializes the whole message and raises past the limit.
    """
    est = 0
    for t in model_tensors(proto):
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
        ModelLoadError: naming ``where`` and the checker's first line (a graph input or output
            without a type: naming it).
    """
    check_typed(proto, where)
    try:
        if path is not None and has_lazy_tensors(proto):  # the data is only in the files: check those
            onnx.checker.check_model(str(path), full_check=full)
            return
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


def load(path: str | os.PathLike, *, check: bool = True, fold_initializer_inputs: bool | None = False,
         lazy: bool = True) -> Model:
    """Load an ONNX file into the IR. See :func:`load_proto` for errors and ``lazy`` (default here:
    weights in external data files are memory-mapped when first read, never copied in), and
    :func:`from_onnx` for ``fold_initializer_inputs`` (None: when the file's IR version is < 4)."""
    proto = load_proto(path, check=check, lazy=lazy)
    if fold_initializer_inputs is None:
        fold_initializer_inputs = proto.ir_version < IR_VERSION_INITIALIZERS_NOT_INPUTS
    try:
        return from_onnx(proto, fold_initializer_inputs=fold_initializer_inputs)
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

    Models over 2 GiB, models holding tensors still in another model's external data file
    (:func:`load_proto` ``lazy=True``), and ``external_data=True`` go out with their tensors in
    ``<name>.data`` beside the file (tensors under 1 KiB stay inline; no data file when none is
    larger); tensors still in an input's data file are copied file to file, never through memory.
    Nothing is left at ``path`` if writing fails, nor any temporary file; SIGTERM or SIGHUP during
    the write, where the process has no handler of its own for them, also remove the temporary
    files, then end it (:func:`exit_on_signals`). With external data, ``proto`` itself is changed:
    the moved tensors point at the new data file and hold no bytes (as with ``onnx.save_model``),
    and stay readable through graft (they are lazy tensors of the written file); :func:`save`
    passes a fresh proto, so IR models are unaffected.

    ``data``: ``proto.SerializeToString()`` when the caller already has it (a model under
    2 GiB written as one file); written as is. Ignored for a proto with lazy tensors.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lazy = has_lazy_tensors(proto)
    if lazy:
        data = None
        if external_data is False:
            inline_lazy_tensors(proto)
            lazy = False
    if data is not None:
        external_data = False
    elif external_data is None:
        external_data = lazy or exceeds_protobuf_limit(proto)
    data_name = path.name + ".data"

    def write(tmp: str, tmp_data: Path) -> bool:
        if not external_data:
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString() if data is None else data)
            return False
        with open(tmp_data, "wb") as f:
            moved = _move_tensors_out(proto, f, data_name)
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
        for t in moved:  # readable through graft again, from the file just written
            extdata.attach(t, path.parent)
        return bool(moved)

    _atomic_write(path, write)


def inline_lazy_tensors(proto: onnx.ModelProto) -> None:
    """Read every lazy tensor of ``proto`` in, in place: a self-contained proto (what :func:`load_proto`
    without ``lazy`` gives)."""
    for t in model_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL and extdata.is_lazy(t):
            raw = extdata.read_bytes(t, _tensor_nbytes(t) if t.data_type != onnx.TensorProto.STRING else None)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw


def _atomic_write(path: Path, write) -> None:
    """Run ``write(tmp, tmp_data)`` (True: it wrote the data file too), then rename the temporary
    files onto ``path`` and ``<path>.data``: the data file first, so no model ever points at
    missing data. On any failure (SIGTERM/SIGHUP included, :func:`exit_on_signals`) both
    temporary files are removed and ``path`` is untouched."""
    tmp = tmp_data = None
    with exit_on_signals():  # SIGTERM/SIGHUP mid-write: the temporary files go too
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            # mkstemp makes the file 0600; the model gets the permissions a plain open() would give it
            os.chmod(tmp, 0o666 & ~_umask())
            tmp_data = Path(tmp + ".data")
            if write(tmp, tmp_data):
                os.chmod(tmp_data, 0o666 & ~_umask())
                os.replace(tmp_data, path.parent / (path.name + ".data"))
            elif tmp_data.exists():  # every tensor is under the threshold: one self-contained file
                os.unlink(tmp_data)
            tmp_data = None
            os.replace(tmp, path)
        except BaseException:
            for p in (tmp, tmp_data):
                if p is not None and os.path.exists(p):
                    os.unlink(p)
            raise


# Signals whose default action ends the process without running Python cleanup code (SIGINT
# already raises KeyboardInterrupt). SIGHUP does not exist on Windows.
_TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _exit_for_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # the shell's exit status for a process ended by signal `signum`


@contextlib.contextmanager
def exit_on_signals():
    """While the block runs, SIGTERM and SIGHUP raise ``SystemExit(128 + signum)`` instead of
    ending the process at once, so ``except``/``finally`` clauses (removing a half-written
    temporary file) run before it exits with the status a shell reports for that signal.

    Only signals left at their default action are taken over, and only in the main thread
    (the only one Python delivers signals to); the previous handlers come back on exit.
    A program with its own SIGTERM handler keeps it. Nests: an inner block changes nothing.
    """
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _TERMINATING:
            try:
                if signal.getsignal(sig) is signal.SIG_DFL:
                    saved[sig] = signal.signal(sig, _exit_for_signal)
            except (ValueError, OSError):  # not settable here (an embedded interpreter)
                pass
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


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


def _move_tensors_out(proto: onnx.ModelProto, f, location: str) -> list[onnx.TensorProto]:
    """Write each raw tensor of ``EXTERNAL_DATA_THRESHOLD`` bytes or more, and each tensor still in
    another file (lazy), to open file ``f`` and point ``proto`` at it under ``location`` (ONNX
    external data: location/offset/length). Returns the tensors moved.

    Each tensor's bytes are read once: upb copies ``raw_data`` on every access, which for a
    multi-GB tensor costs seconds (onnx.save_model reads it several times). Lazy tensors are
    copied file to file (:func:`graft.ir.extdata.copy_range`).
    """
    moved = []
    for t in model_tensors(proto):
        lazy = t.data_location == onnx.TensorProto.EXTERNAL and extdata.is_lazy(t)
        if not lazy and (t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data")
                         or _tensor_nbytes(t) < EXTERNAL_DATA_THRESHOLD):
            continue
        offset = f.tell()
        if offset % _EXTERNAL_ALIGN:
            f.write(b"\0" * (_EXTERNAL_ALIGN - offset % _EXTERNAL_ALIGN))
            offset = f.tell()
        if lazy:
            n = extdata.byte_range(t)[2]
            n = _tensor_nbytes_exact(t) if n is None else n
            extdata.copy_range(t, f, n)
        else:
            data = t.raw_data
            f.write(data)
            n = len(data)
            del data
        extdata.point_at(t, location, offset, n)
        moved.append(t)
    return moved


def _tensor_nbytes_exact(t: onnx.TensorProto) -> int:
    """Bytes of ``t``'s data rounded up to whole bytes (4-bit types: two elements per byte)."""
    return (math.prod(t.dims) * DataType(t.data_type).bitwidth + 7) // 8


LARGE_MODEL_BYTES = 100 * 2**20
"""Models whose initializers hold more bytes than this are saved with external data (about 100 MiB:
the size past which a single protobuf is slow to parse and cannot be memory-mapped by runtimes)."""


def model_bytes(model: Model) -> tuple[int, int]:
    """(bytes of all initializers, bytes of the largest one), subgraphs included."""
    total = largest = 0
    for g in model.all_graphs():
        for v in g.initializers.values():
            n = v.const.nbytes
            total += n
            largest = max(largest, n)
    return total, largest


def has_lazy_initializers(model: Model) -> bool:
    """True when an initializer of ``model`` is still in an external data file (memory-mapped on use)."""
    for g in model.all_graphs():
        for v in g.initializers.values():
            p = v.const.proto
            if p is not None and p.data_location == onnx.TensorProto.EXTERNAL and extdata.is_lazy(p):
                return True
    return False


def save(model: Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Export ``model`` and write it atomically (see :func:`save_proto`).

    ``external_data``: None (default) writes the initializers of 1 KiB or more to ``<name>.data``
    beside the file when the model was loaded with external data (some tensor still lives in an
    input's data file), or its initializers hold more than :data:`LARGE_MODEL_BYTES`, or it would
    not fit in one protobuf (2 GiB); True always, False never (a model over 2 GiB still goes out
    with external data). Initializers are streamed to the data file one at a time, file to file
    for those still in an input's data file: no second copy of the weights is made.
    """
    if external_data is None:
        total, _ = model_bytes(model)
        external_data = total > LARGE_MODEL_BYTES or has_lazy_initializers(model)
    if not external_data:
        save_proto(to_onnx(model), path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"

    sinks = []

    def write(tmp: str, tmp_data: Path) -> bool:
        with open(tmp_data, "wb") as f:
            sink = _DataSink(f, data_name, EXTERNAL_DATA_THRESHOLD)
            sinks.append(sink)
            token = _EXPORT.set(sink)
            try:
                with gc_paused():
                    proto = _to_onnx(model)
            finally:
                _EXPORT.reset(token)
            moved = _move_tensors_out(proto, f, data_name)  # large tensor attributes (Constant values)
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
        return bool(sink.count or moved)

    _atomic_write(path, write)
    # saved over the data file some of the model's own weights are read from (ir.save(ir.load(p), p)):
    # point them at where they are in the new file, so reads after this see the same bytes
    data_file = (path.parent / data_name).resolve()
    for p, offset, n in sinks[-1].copied if sinks else ():
        if extdata.byte_range(p)[0].resolve() == data_file:
            extdata.point_at(p, data_name, offset, n)
            extdata.attach(p, path.parent)
