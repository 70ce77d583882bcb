"""The torch backend: ``ir.to_torch(model)`` → a trainable ``torch.fx.GraphModule``.

- ONNX-domain nodes call the functions of :mod:`graft.ir.torch_ops` and the ``torch_ops_*``
  modules (``OP_MODULES``; ONNX semantics per opset, built from differentiable torch ops);
  ``aten`` nodes call their ATen overload with the arguments rebuilt from the schema
  (:mod:`graft.ir.torch_aten`).
- Control flow: an If whose condition can be computed at conversion (constants, ``Shape`` of
  statically shaped values, and ops on those: :func:`fold_constant`) is replaced by the branch it
  selects; otherwise If, Loop and Scan bodies become sub-GraphModules that ``torch_ops.If`` /
  ``Loop`` / ``Scan`` run with Python control flow.
- Everything torch cannot express is refused before anything runs (:func:`unsupported_ops`):
  ops without an implementation, attribute values (``torch_ops.refusal``; an attribute the op
  function does not take), sequence/optional values and element types without a torch dtype.
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

import functools
import inspect
import keyword
import math
import re

import numpy as np
import torch
import torch.fx

from graft.ir import (torch_ops, torch_ops_attn, torch_ops_nn, torch_ops_rnn, torch_ops_signal, torch_ops_tensor,
                      torch_ops_vision)
from graft.ir._core import Graph, Model, Node, Tensor, Value, outer_scope_values
from graft.ir.dtypes import DataType
from graft.ir.torch_aten import (ATEN_DOMAIN, DYNAMIC_ATTR, ONNX_TO_TORCH_DTYPE, PERMUTED_FROM, TENSOR, TENSOR_LIST,
                           arg_layout, kwarg_only, overload, returns_list)

# The modules whose functions the emitted code calls (importing them registers their ops).
OP_MODULES = (torch_ops, torch_ops_nn, torch_ops_rnn, torch_ops_vision, torch_ops_attn, torch_ops_signal,
              torch_ops_tensor)

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
    if t.dtype == DataType.BFLOAT16 or t.dtype in _FLOAT8_IR:
        # ml_dtypes arrays: copy the bits (np.ascontiguousarray would make a 0-d array 1-d)
        bits = np.array(arr, copy=True, order="C").view(np.int16 if t.dtype == DataType.BFLOAT16 else np.uint8)
        return torch.from_numpy(bits).view(torch_ops.ONNX_DTYPES[int(t.dtype)])
    return torch.from_numpy(np.array(arr, copy=True))


_FLOAT8_IR = frozenset({DataType.FLOAT8E4M3FN, DataType.FLOAT8E4M3FNUZ, DataType.FLOAT8E5M2, DataType.FLOAT8E5M2FNUZ,
                        DataType.FLOAT8E8M0})


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
    def emit(self, nodes, pairs: dict[Node, Node] | None = None, absorbed: frozenset | set = frozenset()) -> None:
        """Emit fx nodes for ``nodes`` (one graph's, in order)."""
        from graft.ir.torch_ops import lookup

        for n in nodes:
            if n in absorbed:
                continue
            if pairs and n in pairs:
                self.fake_quant(pairs[n], n)
            elif n.domain == ATEN_DOMAIN:
                self.aten_node(n)
            elif n.op_type == "If":
                self.if_node(n)
            elif n.op_type in ("Loop", "Scan"):
                self.loop_node(n)
            else:
                self.onnx_node(n, lookup(n.op_type, self.opset))

    def onnx_node(self, n: Node, fn) -> None:
        if n.op_type == "Constant":
            t = n.attrs.get("value")
            if not isinstance(t, Tensor):
                t = Tensor(np.asarray(n.outputs[0].constant()))
            self.env[n.outputs[0]] = self._get_attr(n.outputs[0], t)
            return
        kwargs = {k: _attr_arg(v, n) for k, v in n.attrs.items() if k not in _IGNORED_ATTRS}
        if len(n.outputs) > 1 or n.op_type == "Split":
            kwargs["_outputs"] = len(n.outputs)
        out = self.fx.call_function(fn, tuple(self.value(v) for v in n.inputs), kwargs)
        self._bind_outputs(n, out)

    def if_node(self, n: Node) -> None:
        """ONNX If: a condition known at conversion time inlines the branch it selects; otherwise both
        branches become sub-GraphModules and :func:`torch_ops.If` runs one of them (a Python ``if``)."""
        then_g, else_g = n.attrs["then_branch"], n.attrs["else_branch"]
        cond = fold_constant(n.inputs[0], self.opset)
        if cond is not None:
            branch = then_g if bool(np.asarray(cond).reshape(-1)[0]) else else_g
            self.emit(branch)
            for o, v in zip(n.outputs, branch.outputs):
                self.env[o] = self.value(v)
            return
        captured: dict[Value, None] = dict.fromkeys(outer_scope_values(then_g))
        captured.update(dict.fromkeys(outer_scope_values(else_g)))
        args = [self.value(n.inputs[0])] + [self.value(v) for v in captured]
        base = _ident(n.name or (n.outputs[0].name if n.outputs else "if"))
        mods = []
        for tag, g in (("then", then_g), ("else", else_g)):
            gm = self.submodule(g, list(captured))
            path = _ident(f"{base}_{tag}_branch")
            while hasattr(self.root, path):
                path += "_"
            self.root.add_module(path, gm)
            mods.append(self.fx.get_attr(path))
        out = self.fx.call_function(torch_ops.If, (args[0], mods[0], mods[1], *args[1:]))
        self._bind_outputs(n, out, force_tuple=len(n.outputs) > 1)

    def loop_node(self, n: Node) -> None:
        """ONNX Loop / Scan: the body becomes a sub-GraphModule run by :func:`torch_ops.Loop` / ``Scan``."""
        body = n.attrs["body"]
        captured = outer_scope_values(body)
        gm = self.submodule(body, captured)
        path = _ident(f"{n.name or n.outputs[0].name}_body")
        while hasattr(self.root, path):
            path += "_"
        self.root.add_module(path, gm)
        mod = self.fx.get_attr(path)
        ins = [self.value(v) for v in n.inputs]
        if n.op_type == "Loop":
            ins += [None] * (2 - len(ins))
            out = self.fx.call_function(torch_ops.Loop, (mod, *ins, *(self.value(v) for v in captured)),
                                        {"n_carried": len(n.inputs) - 2})
        else:
            k = n.attrs["num_scan_inputs"]
            n_state = len(n.inputs) - k
            n_out = len(n.outputs) - n_state
            out = self.fx.call_function(torch_ops.Scan, (mod, *ins, *(self.value(v) for v in captured)), {
                "n_state": n_state, "n_scan_inputs": k,
                "input_axes": list(n.attrs.get("scan_input_axes", [0] * k)),
                "input_directions": list(n.attrs.get("scan_input_directions", [0] * k)),
                "output_axes": list(n.attrs.get("scan_output_axes", [0] * n_out)),
                "output_directions": list(n.attrs.get("scan_output_directions", [0] * n_out))})
        self._bind_outputs(n, out, force_tuple=True)

    def submodule(self, g: Graph, captured: list[Value]):
        """A GraphModule computing subgraph ``g`` from its inputs, then the outer values it reads
        (``captured``, in order)."""
        sub = _Builder(self.model)
        for v in list(g.inputs) + captured:
            sub.env[v] = sub.fx.placeholder(_ident(v.name))
        sub.emit(g)
        outs = [sub.value(v) for v in g.outputs]
        sub.fx.output(outs[0] if len(outs) == 1 else tuple(outs))
        sub.fx._tracer_cls = GraftTracer
        return torch.fx.GraphModule(sub.root, sub.fx, class_name=_ident(g.name or "Branch"))

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


# Attributes with no effect on the result: `consumed_inputs` (opset < 6) was a memory-reuse hint.
_IGNORED_ATTRS = frozenset({"consumed_inputs"})


def fold_constant(v: Value, opset: int, budget: int = 64):
    """``v``'s value when it can be computed at conversion time, as a numpy array, else None.

    Constants and initializers are known; ``Shape`` of a value whose declared shape is static is known;
    any other ONNX node whose inputs are all known is evaluated with its torch implementation
    (at most ``budget`` nodes are evaluated).
    """
    from graft.ir.torch_ops import lookup

    memo: dict[Value, object] = {}
    left = [budget]

    def get(x: Value):
        if x in memo:
            return memo[x]
        arr = x.constant()
        out = None
        if arr is not None:
            out = np.asarray(arr)
        else:
            p = x.producer
            if p is not None and p.domain in ("", "ai.onnx") and not any(True for _ in p.subgraphs()) \
                    and left[0] > 0:
                left[0] -= 1
                out = _fold_node(p, x, get, opset, lookup)
        memo[x] = out
        return out

    return get(v)


def _fold_node(p: Node, x: Value, get, opset: int, lookup):
    if p.op_type == "Shape" and p.inputs[0].shape is not None and \
            all(isinstance(d, int) for d in p.inputs[0].shape):
        dims = list(p.inputs[0].shape)[p.attrs.get("start", 0):p.attrs.get("end", None)]
        return np.asarray(dims, dtype=np.int64)
    if p.op_type == "Constant" or p.op_type in _RANDOM_OPS:
        return None
    fn = lookup(p.op_type, opset)
    if fn is None:
        return None
    kwargs = {k: _attr_arg(v, p) for k, v in p.attrs.items() if k not in _IGNORED_ATTRS}
    if torch_ops.refusal(p.op_type, opset, kwargs, len(p.outputs), _in_types(p)) is not None:
        return None
    ins = []
    for i in p.inputs:
        if i is None:
            ins.append(None)
            continue
        a = get(i)
        if a is None or a.dtype == object:
            return None
        ins.append(torch.from_numpy(np.array(a, copy=True)))
    if len(p.outputs) > 1 or p.op_type == "Split":
        kwargs["_outputs"] = len(p.outputs)
    try:
        with torch.no_grad():
            out = fn(*ins, **kwargs)
    except Exception:  # noqa: BLE001 - not foldable here: the op runs at run time instead
        return None
    out = out[p.outputs.index(x)] if isinstance(out, (tuple, list)) else out
    return out.numpy() if isinstance(out, torch.Tensor) and out.dtype in _NUMPY_OK else None


_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "Dropout"})
_NUMPY_OK = frozenset({torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                       torch.float16, torch.float32, torch.float64})


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
        if q.attrs.get("block_size", 0) or q.attrs.get("saturate", 1) == 0 or q.attrs.get("precision", 0):
            continue
        zp = q.inputs[2] if len(q.inputs) > 2 else None
        qtype = zp.dtype if zp is not None else q.attrs.get("output_dtype", 0) or DataType.UINT8
        if qtype not in (DataType.UINT8, DataType.INT8):  # what torch's fake_quantize takes
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


def _in_types(n: Node) -> list:
    return [int(v.dtype) if v is not None and v.dtype is not None else None for v in n.inputs]


def _in_ranks(n: Node) -> list:
    return [len(v.shape) if v is not None and v.shape is not None else None for v in n.inputs]


@functools.cache
def _parameters(fn) -> tuple[frozenset, bool]:
    """The keyword parameters of an op function, and whether it takes any keyword (``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a torch builtin registered as is: positional inputs only
        return frozenset(), False
    return (frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)),
            any(p.kind == p.VAR_KEYWORD for p in params))


def _signature_problem(fn, attrs: dict, n_outputs: int) -> str | None:
    """An attribute the op function does not know (a newer opset's, or a misspelling), or more outputs
    than it computes: refused here rather than failing with a TypeError when the module runs."""
    names, any_kw = _parameters(fn)
    if any_kw:
        return None
    for k, v in attrs.items():
        if k not in names:
            return f"attribute {k}={v!r} is not supported"
    if n_outputs > 1 and "_outputs" not in names:
        return f"only the first output is supported ({n_outputs} requested)"
    return None


def _value_problem(v: Value) -> str | None:
    """Why a value cannot live in a torch tensor (a sequence, map or optional; a 4-bit, 2-bit or string
    element type), or None."""
    tp = v.type_proto
    if tp is not None and tp.WhichOneof("value") not in (None, "tensor_type"):
        return f"is of {tp.WhichOneof('value').removesuffix('_type')} type; the torch backend handles tensors only"
    if v.dtype is not None and int(v.dtype) not in torch_ops.ONNX_DTYPES:
        return f"has element type {torch_ops.type_name(int(v.dtype))}: torch has no such tensor type"
    return None


def unsupported_ops(model: Model) -> list[str]:
    """One line per node the torch backend cannot run (op, node, module, and why: no implementation,
    an attribute value, an element type), then one per graph input/output of a type torch cannot hold."""
    from graft.ir.torch_ops import lookup

    out = []
    for g in model.all_graphs():
        for n in g:
            mod = n.meta.get("torch.module")
            where = f" in module '{mod}'" if mod else ""
            label = n.name or (n.outputs[0].name if n.outputs else "")
            if any(True for _ in n.subgraphs()) and not (n.domain in ("", "ai.onnx") and (
                    n.op_type in ("If", "Loop") or n.op_type == "Scan" and model.opset >= 9)):
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
                continue
            if n.op_type in ("Constant", "If", "Loop", "Scan"):
                why = None
            elif lookup(n.op_type, model.opset) is None:
                why = f"no torch implementation at opset {model.opset}"
            else:
                try:
                    attrs = {k: _attr_arg(v, n) for k, v in n.attrs.items() if k not in _IGNORED_ATTRS}
                except TorchBackendError as e:
                    why = str(e).partition(": ")[2]
                else:
                    why = _signature_problem(lookup(n.op_type, model.opset), attrs, len(n.outputs)) or \
                        torch_ops.refusal(n.op_type, model.opset, attrs, len(n.outputs), _in_types(n), _in_ranks(n))
            if why is None:
                for v in list(n.inputs) + list(n.outputs):
                    if v is not None and (p := _value_problem(v)):
                        why = f"value {v.name!r} {p}"
                        break
            if why:
                out.append(f"{n.op_type} (node {label!r}{where}): {why}")
    g = model.graph
    for role, values in (("input", g.inputs), ("output", g.outputs)):
        for v in values:
            if (p := _value_problem(v)):
                out.append(f"graph {role} {v.name!r} {p}")
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
            flow other than If/Loop/Scan, ONNX ops not registered in :mod:`graft.ir.torch_ops`, attribute
            values and element types torch cannot express), all listed with node and module.
    """
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
    b.emit(g, pairs, absorbed)
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
    """The fx Tracer an unpickled GraphModule (``copy.deepcopy``, ``pickle``, an old ``torch.save`` file
    read with ``load_module(path, trust=True)``) is re-traced with: it records calls to
    :mod:`graft.ir.torch_ops` functions as nodes instead of tracing into them."""

    def __init__(self, autowrap_modules=(math, *OP_MODULES), autowrap_functions=(),
                 param_shapes_constant=False):
        super().__init__(autowrap_modules, autowrap_functions, param_shapes_constant)


def save_module(module, path, example_inputs=None, *, format: str = "auto"):
    """Write a GraphModule from :func:`to_torch` to ``path`` as data only, atomically (temporary file,
    then rename; nothing left on failure). See :mod:`graft.ir.torch_artifact` for the two formats.

    Args:
        module: the GraphModule.
        path: where to write (``.pt2`` by convention).
        example_inputs: a :class:`graft.ir.torch_artifact.ExampleInputs` (symbolic dims marked; from
            :func:`graft.ir.torch_artifact.example_inputs`) or a tuple of tensors. With them, the file
            is a ``torch.export`` program when torch.export captures the module — it then loads
            without graft (``torch.export.load(path).module()``); without them, or when capture
            fails, it is graft's ``graft-fx`` format (needs graft to load).
        format: ``"auto"``, ``"pt2"`` (fail rather than fall back) or ``"graft-fx"``.

    Returns:
        :class:`graft.ir.torch_artifact.SaveReport`: the format written, the input shapes the
        program accepts, and why when it is not a fully dynamic ``pt2``.

    Raises:
        graft.ir.torch_artifact.ArtifactError: see :func:`graft.ir.torch_artifact.save`.
        OSError: the file cannot be written.
    """
    from graft.ir.torch_artifact import save

    return save(module, path, example_inputs, format=format)


def load_module(path, *, trust: bool = False):
    """Read a module written by :func:`save_module`; nothing from the file is run or unpickled
    (see :func:`graft.ir.torch_artifact.load` for the checks).

    Args:
        path: the file.
        trust: also load ``torch.save`` pickles written by earlier graft (they can run code when
            loaded: only for files you trust).

    Returns:
        a trainable ``torch.fx.GraphModule``.

    Raises:
        graft.ir.torch_artifact.ArtifactError: a file the checks refuse, naming the entry; a pickle
            without ``trust=True``.
        OSError: the file cannot be read.
    """
    from graft.ir.torch_artifact import load

    return load(path, trust=trust)
