"""Can onnxruntime (CPU) run a node in the lower type? Asked of onnxruntime itself, per op.

For float16, onnxruntime's CPU provider runs every op: where it has no float16 kernel, its
``InsertCastTransformer`` computes in float32 between Casts. For bfloat16 it has almost no CPU
kernels (onnxruntime 1.32: none for Add-14, MatMul-13, Conv-22, ...) and no such fallback, so a
bfloat16 model fails to load. :func:`missing_kernels` builds a one-node model per distinct
(op, version, types) of the converted model and tries to load it; a ``NOT_IMPLEMENTED`` answer
means no kernel. Nothing is assumed from a list.
"""
from __future__ import annotations

import functools

import onnx
from onnx import helper

from graft import ir
from graft.ir.dtypes import DataType
from graft.compiler.techniques.precision.support import domain_opset, schema


@functools.cache
def _loads(model_bytes: bytes) -> str | None:
    """None when onnxruntime CPU loads the model, else its error message."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 — onnxruntime raises its own exception types
        return " ".join(str(e).split())
    return None


def _probe_model(node: ir.Node, model: ir.Model) -> bytes:
    from graft.ir.onnx_io import node_proto

    p = node_proto(node)
    del p.metadata_props[:]
    inputs, inits = [], []
    for v in node.inputs:
        if v is None or v.name in {i.name for i in inputs}:
            continue
        c = v.constant()
        if c is not None and c.size <= 4096:  # shape-like constants matter for loading; big weights do not
            inits.append(onnx.numpy_helper.from_array(c, v.name))
        else:
            inputs.append(helper.make_tensor_value_info(v.name, int(v.dtype or DataType.FLOAT), None))
    outputs = [helper.make_tensor_value_info(o.name, int(o.dtype or DataType.FLOAT), None)
               for o in node.outputs if o.name]
    g = helper.make_graph([p], "probe", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = min(model.ir_version, 10) if model.ir_version >= 7 else 7
    return m.SerializeToString()


def missing_kernels(model: ir.Model, target: DataType) -> list[str]:
    """``Op-version`` of every node of ``model`` (converted) that computes in ``target`` and that
    onnxruntime CPU cannot load, sorted."""
    import onnxruntime as ort  # noqa: F401 — fail here, not per probe, when it is missing

    missing: set[str] = set()
    seen: set = set()
    for n in model.all_nodes():
        if any(True for _ in n.subgraphs()):
            continue
        types = tuple(v.dtype if v is not None else None for v in (*n.inputs, *n.outputs))
        if target not in types:
            continue
        sch = schema(n.op_type, n.domain, domain_opset(model, n.domain))
        label = f"{n.op_type}-{sch.since_version}" if sch is not None else n.op_type
        key = (n.domain, n.op_type, label, types, tuple(sorted((k, str(v)) for k, v in n.attrs.items()
                                                                if isinstance(v, (int, str)))))
        if key in seen or label in missing:
            continue
        seen.add(key)
        err = _loads(_probe_model(n, model))
        if err is not None and ("NOT_IMPLEMENTED" in err or "Could not find an implementation" in err):
            missing.add(label)
    return sorted(missing)


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
