"""The torch backend: ``ir.to_torch(model)`` → a trainable ``torch.fx.GraphModule``.

- ONNX-domain nodes call the functions of :mod:`graft.ir.torch_ops` (ONNX semantics
  per opset, built from differentiable torch ops); ``aten`` nodes call their
  ATen overload with the arguments rebuilt from the schema (:mod:`graft.ir.torch_aten`).
- A QuantizeLinear whose output only feeds DequantizeLinear nodes with the same
  scale, zero point and axis becomes one ``fake_quantize`` call per
  DequantizeLinear (``torch.fake_quantize_per_tensor_affine`` /
  ``per_channel_affine``); a lone QuantizeLinear or DequantizeLinear runs as is.
- Initializers become attributes under their names (``encoder.layer.0.attention.
  self.query.weight`` lands in submodule ``encoder.layer.0...`` so state_dict keys
  match the source model); a lowering's transposed copy of a parameter (``meta["torch.permuted_from"]``)
  is ``permute`` of that parameter, so ties and names survive. Trainable ``nn.Parameter`` when captured from torch as
  a parameter, or — for ONNX models and rule-made tensors — when floating point,
  of more than one element, and not a BatchNormalization mean/variance or a
  quantization scale/zero point. Everything else is a buffer.

The module's ``forward`` takes the graph inputs by name, in order, and returns
one tensor for a one-output graph, else a tuple in graph-output order.
"""
from __future__ import annotations

import keyword
import math
import re

import numpy as np
import torch
import torch.fx

from graft.ir import torch_ops, torch_ops_nn
from graft.ir._core import Model, Node, Tensor, Value
from graft.ir.dtypes import DataType
from graft.ir.torch_aten import (ATEN_DOMAIN, DYNAMIC_ATTR, ONNX_TO_TORCH_DTYPE, PERMUTED_FROM, TENSOR, TENSOR_LIST,
                           arg_layout, kwarg_only, overload, returns_list)

# (op_type, input index) slots that hold statistics or quantization parameters: never trainable.
_FROZEN_SLOTS = {("BatchNormalization", 3), ("BatchNormalization", 4), ("QuantizeLinear", 1),
                 ("QuantizeLinear", 2), ("DequantizeLinear", 1), ("DequantizeLinear", 2)}


class TorchBackendError(ValueError):
    """The model holds ops the torch backend cannot run (each listed with its node and module)."""


def _ident(name: str) -> str:
    """A Python identifier for ``name`` (placeholders, class names)."""
    s = re.sub(r"\W", "_", name) or "v"
    if s[0].isdigit() or keyword.iskeyword(s):
        s = "_" + s
    return s


def _segment(name: str) -> str:
    """An attribute name for one part of a dotted path: digits stay (``layers.0.weight``, as ModuleList names
    them; fx reads them with getattr), other non-word characters become ``_``."""
    s = re.sub(r"\W", "_", name) or "_"
    return "_" + s if keyword.iskeyword(s) else s


def _to_torch_tensor(t: Tensor):
    arr = t.array
    if t.dtype == DataType.BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16).copy()).view(torch.bfloat16)
    if t.dtype in (DataType.FLOAT8E4M3FN, DataType.FLOAT8E5M2):
        raw = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8).copy())
        return raw.view(torch.float8_e4m3fn if t.dtype == DataType.FLOAT8E4M3FN else torch.float8_e5m2)
    return torch.from_numpy(np.array(arr, copy=True))


def is_trainable(v: Value, tensor: Tensor | None = None) -> bool:
    """Whether constant ``v`` (an initializer, or a Constant node's output holding ``tensor``)
    becomes an ``nn.Parameter`` (see the module doc)."""
    t = tensor if tensor is not None else v.const
    kind = v.meta.get("torch.kind")
    if kind is not None:
        return kind == "parameter" and t.dtype.is_float
    if t is None or not t.dtype.is_float or t.size <= 1:
        return False
    return not any((n.op_type, i) in _FROZEN_SLOTS for n, i in v.uses() if n.domain in ("", "ai.onnx"))


class _Builder:
    def __init__(self, model: Model):
        self.model = model
        self.opset = model.opset
        self.root = torch.nn.Module()
        self.fx = torch.fx.Graph()
        self.env: dict[Value, object] = {}
        self.attr_nodes: dict[Value, object] = {}
        self.paths: dict[str, str] = {}   # attribute path -> IR name
        self.params: dict[str, tuple[str, torch.Tensor]] = {}  # torch fqn -> (path, data) of its parameter

    # -- state ----------------------------------------------------------------------
    def _register(self, name: str, tensor, trainable: bool) -> str:
        segs = [_segment(s) for s in name.split(".")] if name else ["v"]
        path = ".".join(segs)
        if not self._fits(segs):
            path = _ident(name.replace(".", "_"))
            segs = [path]
        base, k = path, 0
        while path in self.paths or (len(segs) == 1 and hasattr(self.root, path)) or not self._fits(path.split(".")):
            k += 1
            path = f"{base}_{k}"
        segs = path.split(".")
        mod = self.root
        for s in segs[:-1]:
            sub = getattr(mod, s, None)
            if sub is None:
                sub = torch.nn.Module()
                mod.add_module(s, sub)
            mod = sub
        if trainable:
            mod.register_parameter(segs[-1], torch.nn.Parameter(tensor, requires_grad=True))
        else:
            mod.register_buffer(segs[-1], tensor)
        self.paths[path] = name
        return path

    def _fits(self, segs: list[str]) -> bool:
        """The module path exists or can be made, and the leaf name is free."""
        mod = self.root
        for s in segs[:-1]:
            sub = getattr(mod, s, None)
            if sub is None:
                return True
            if not isinstance(sub, torch.nn.Module):
                return False
            mod = sub
        return not hasattr(mod, segs[-1])

    def _get_attr(self, v: Value, tensor: Tensor | None = None):
        node = self.attr_nodes.get(v)
        if node is None:
            t = tensor if tensor is not None else v.const
            trainable = is_trainable(v, t)
            data = _to_torch_tensor(t)
            src = v.meta.get(PERMUTED_FROM) if tensor is None and trainable else None
            perm = list(src[1]) if src is not None else []
            if src is not None and sorted(perm) == list(range(data.dim())):
                # a lowering's transposed copy of a parameter: a view of the source parameter, so training
                # updates the one tensor (tied weights stay tied) under its source name and layout
                source = data.permute(*np.argsort(perm).tolist()).contiguous()
                path = self._shared(src[0], source)
                node = self.fx.call_function(torch.permute, (self.fx.get_attr(path), tuple(perm)))
            elif v.meta.get("torch.fqn") is not None and trainable:
                node = self.fx.get_attr(self._shared(v.meta["torch.fqn"], data))
            else:
                node = self.fx.get_attr(self._register(v.meta.get("torch.fqn", v.name), data, trainable))
            self.attr_nodes[v] = node
        return node

    def _shared(self, fqn: str, data) -> str:
        """The path of trainable parameter ``fqn``, registered once for all IR values holding the same data."""
        got = self.params.get(fqn)
        if got is not None and got[1].shape == data.shape and got[1].dtype == data.dtype and \
                torch.equal(got[1], data):
            return got[0]
        path = self._register(fqn, data, True)
        self.params.setdefault(fqn, (path, data))
        return path

    def value(self, v: Value | None):
        if v is None:
            return None
        got = self.env.get(v)
        if got is not None:
            return got
        if v.const is not None:
            return self._get_attr(v)
        raise TorchBackendError(f"value {v.name!r} is read before it is defined (graph not in topological order)")

    # -- nodes ----------------------------------------------------------------------
    def onnx_node(self, n: Node, fn) -> None:
        if n.op_type == "Constant":
            t = n.attrs.get("value")
            if not isinstance(t, Tensor):
                t = Tensor(np.asarray(n.outputs[0].constant()))
            self.env[n.outputs[0]] = self._get_attr(n.outputs[0], t)
            return
        kwargs = {k: _attr_arg(v, n) for k, v in n.attrs.items()}
        if len(n.outputs) > 1 or n.op_type == "Split":
            kwargs["_outputs"] = len(n.outputs)
        out = self.fx.call_function(fn, tuple(self.value(v) for v in n.inputs), kwargs)
        self._bind_outputs(n, out)

    def fake_quant(self, q: Node, dq: Node) -> None:
        zp = q.inputs[2] if len(q.inputs) > 2 else None
        dtype = ONNX_TO_TORCH_DTYPE.get(zp.dtype if zp is not None else DataType.UINT8)
        lo, hi = torch_ops_nn.quant_range(getattr(torch, dtype))
        zp_node = self.value(zp) if zp is not None else self.fx.call_function(
            torch.zeros, ((1,),), {"dtype": torch.int32})
        out = self.fx.call_function(torch_ops_nn.fake_quantize,
                                    (self.value(q.inputs[0]), self.value(q.inputs[1]), zp_node),
                                    {"axis": q.attrs.get("axis", 1), "quant_min": lo, "quant_max": hi})
        self.env[dq.outputs[0]] = out

    def aten_node(self, n: Node) -> None:
        from graft.ir.torch_aten import aten_args

        target = overload(n.op_type)
        a = aten_args(n)
        dynamic = set(n.attrs.get(DYNAMIC_ATTR, ()))
        kwo = kwarg_only(n.op_type)
        args, kwargs, optional = [], {}, []
        for name, kind, real, _default, has_default in arg_layout(n.op_type):
            val = a[name]
            if kind == TENSOR:
                val = self.value(val) if isinstance(val, Value) else val
            elif kind == TENSOR_LIST:
                val = [self.value(x) for x in val]
            elif name in dynamic:
                helper = torch_ops.ints if real.startswith("List") else torch_ops.item
                val = self.fx.call_function(helper, (self.value(val),))
            else:
                val = _aten_attr(val, real)
            if name in kwo:
                if val is not None:
                    kwargs[name] = val
            else:
                args.append(val)
                optional.append(has_default)
        # trailing absent arguments take their defaults; a required `int?` (embedding_bag's padding_idx) stays
        while args and args[-1] is None and optional[len(args) - 1]:
            args.pop()
        out = self.fx.call_function(target, tuple(args), kwargs)
        if len(n.outputs) == 1 and not returns_list(n.op_type) and len(target._schema.returns) == 1:
            rtype = str(target._schema.returns[0].type)
            if rtype != "Tensor":  # SymInt / Scalar results live as 0-d tensors in the IR
                out = self.fx.call_function(torch_ops.as_tensor, (out,))
        self._bind_outputs(n, out, force_tuple=len(target._schema.returns) > 1 or returns_list(n.op_type))

    def _bind_outputs(self, n: Node, out, force_tuple: bool = False) -> None:
        import operator

        if len(n.outputs) == 1 and not force_tuple:
            self.env[n.outputs[0]] = out
            return
        for i, o in enumerate(n.outputs):
            self.env[o] = self.fx.call_function(operator.getitem, (out, i))


def _attr_arg(v, n: Node):
    from graft.ir._core import Graph

    if isinstance(v, Tensor):
        arr = np.asarray(v.array)
        name = ONNX_TO_TORCH_DTYPE.get(v.dtype)
        if name is None:
            raise TorchBackendError(f"{n.op_type} node {n.name!r}: tensor attribute of type {v.dtype.name} "
                                    f"has no torch dtype")
        return {"data": arr.astype(np.float64 if arr.dtype.kind == "f" else arr.dtype).tolist(),
                "dtype": name, "shape": list(arr.shape)}
    if isinstance(v, Graph) or (isinstance(v, list) and v and isinstance(v[0], Graph)):
        raise TorchBackendError(f"{n.op_type} node {n.name!r} has a subgraph; control flow is not supported "
                                f"by the torch backend")
    if isinstance(v, bytes):
        return v.decode()
    return v


def _aten_attr(v, real: str):
    if v is None:
        return None
    base = real.removeprefix("Optional[").removesuffix("]")
    if base == "ScalarType":
        return getattr(torch, v)
    if base == "Device":
        return torch.device(v)
    if base in ("Layout", "MemoryFormat"):
        return getattr(torch, v)
    return v


def _quant_pairs(model: Model) -> tuple[dict[Node, Node], set[Node]]:
    """DequantizeLinear → its QuantizeLinear for fusable pairs, and the Q nodes fully absorbed."""
    pairs: dict[Node, Node] = {}
    absorbed: set[Node] = set()
    for q in model.graph:
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
            continue
        if q.attrs.get("block_size", 0) or q.attrs.get("saturate", 1) == 0:
            continue
        out = q.outputs[0]
        users = out.users()
        if out.is_graph_output() or not users:
            continue
        ok = []
        for u in users:
            if u.op_type == "DequantizeLinear" and _same(u.inputs[1:], q.inputs[1:]) and \
                    u.attrs.get("axis", 1) == q.attrs.get("axis", 1) and u.inputs[0] is out:
                ok.append(u)
        for u in ok:
            pairs[u] = q
        if len(ok) == len(users):
            absorbed.add(q)
    return pairs, absorbed


def _same(a, b) -> bool:
    a, b = list(a) + [None] * (2 - len(a)), list(b) + [None] * (2 - len(b))
    for x, y in zip(a, b):
        if x is y:
            continue
        if x is None or y is None:
            return False
        cx, cy = x.constant(), y.constant()
        if cx is None or cy is None or cx.shape != cy.shape or cx.dtype != cy.dtype or not np.array_equal(cx, cy):
            return False
    return True


def unsupported_ops(model: Model) -> list[str]:
    """One line per node the torch backend cannot run (op, node, module)."""
    from graft.ir.torch_ops import lookup

    out = []
    for g in model.all_graphs():
        for n in g:
            mod = n.meta.get("torch.module")
            where = f" in module '{mod}'" if mod else ""
            label = n.name or (n.outputs[0].name if n.outputs else "")
            if any(True for _ in n.subgraphs()):
                out.append(f"{n.op_type} (node {label!r}{where}): control flow subgraphs are not supported")
                continue
            if n.domain == ATEN_DOMAIN:
                try:
                    overload(n.op_type)
                except ValueError as e:
                    out.append(f"{n.op_type} (node {label!r}{where}): {e}")
                continue
            if n.domain not in ("", "ai.onnx"):
                out.append(f"{n.domain}::{n.op_type} (node {label!r}{where}): custom domain {n.domain!r}")
            elif n.op_type != "Constant" and lookup(n.op_type, model.opset) is None:
                out.append(f"{n.op_type} (node {label!r}{where}): no torch implementation at opset "
                           f"{model.opset}")
    return out


def to_torch(model: Model, *, class_name: str | None = None):
    """Build a ``torch.fx.GraphModule`` that computes ``model``.

    Args:
        model: an IR model with ONNX-domain and/or ``aten`` nodes.
        class_name: the generated module's class name (default: the graph name).

    Returns:
        a GraphModule; ``forward(*inputs)`` takes the graph inputs in order (names
        made Python identifiers) and returns one tensor or a tuple. Attributes
        ``graft_input_names`` / ``graft_output_names`` hold the IR names, and
        ``graft_state_names`` maps attribute paths to initializer names.

    Raises:
        TorchBackendError: ops without a torch implementation (custom domains, control
            flow, ONNX ops not in :mod:`graft.ir.torch_ops`), all listed with node and module.
    """
    from graft.ir.torch_ops import lookup

    bad = unsupported_ops(model)
    if bad:
        raise TorchBackendError(f"the torch backend cannot run {len(bad)} node(s):\n  - " + "\n  - ".join(bad))
    b = _Builder(model)
    g = model.graph
    used: set[str] = set()
    for v in g.inputs:
        if v.const is not None and v in g.initializers.values():
            continue
        name = _ident(v.name)
        while name in used:
            name += "_"
        used.add(name)
        b.env[v] = b.fx.placeholder(name)
    pairs, absorbed = _quant_pairs(model)
    for n in g:
        if n in absorbed:
            continue
        if n in pairs:
            b.fake_quant(pairs[n], n)
        elif n.domain == ATEN_DOMAIN:
            b.aten_node(n)
        else:
            b.onnx_node(n, lookup(n.op_type, b.opset))
    outs = [b.value(v) for v in g.outputs]
    b.fx.output(outs[0] if len(outs) == 1 else tuple(outs))
    b.fx._tracer_cls = GraftTracer  # unpickling re-traces the code: keep graft's op functions opaque
    gm = torch.fx.GraphModule(b.root, b.fx, class_name=_ident(class_name or g.name or "GraftModule"))
    gm.graph.lint()
    gm.graft_input_names = [v.name for v in g.inputs if v in b.env]
    gm.graft_output_names = [v.name for v in g.outputs]
    gm.graft_state_names = dict(b.paths)
    return gm


class GraftTracer(torch.fx.Tracer):
    """The fx Tracer a saved GraphModule is re-traced with on load: it records calls to
    :mod:`graft.ir.torch_ops` functions as nodes instead of tracing into them."""

    def __init__(self, autowrap_modules=(math, torch_ops, torch_ops_nn), autowrap_functions=(),
                 param_shapes_constant=False):
        super().__init__(autowrap_modules, autowrap_functions, param_shapes_constant)


def save_module(module, path) -> None:
    """Write a GraphModule from :func:`to_torch` with ``torch.save``, atomically (temporary file, then rename).

    The file holds the generated code and the parameters; :func:`load_module` reads it back
    (it needs graft importable, since the code calls :mod:`graft.ir.torch_ops`).
    """
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(module, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes the file private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_module(path):
    """Read a module written by :func:`save_module` (``torch.load(..., weights_only=False)``:
    only load files you trust, as with any pickle)."""
    return torch.load(path, weights_only=False)
