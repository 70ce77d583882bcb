"""``torch.export.ExportedProgram`` → graft IR (the torch frontend's graph translation).

One IR node per ATen call, laid out as :mod:`graft.ir.torch_aten` describes; parameters,
buffers and lifted constants become initializers named by their fully qualified
names; ``operator.getitem`` picks an output of a multi-output node; Python
arithmetic on symbolic sizes (``operator.mul`` on ``SymInt``) becomes ONNX ops on
0-d int64 tensors, and an int list holding symbolic sizes (``view(x, [s0, -1])``)
a 1-D int64 tensor built with ``Unsqueeze``/``Concat``. Run-time assertions
(``_assert_scalar``, ``_assert_tensor_metadata``) are dropped.
"""
from __future__ import annotations

import operator
import re
from typing import Any

import numpy as np
import torch
import torch.fx

from graft.ir._core import Model, Node, Tensor, Value
from graft.ir.dtypes import DataType
from graft.ir.torch_aten import (ATEN_DOMAIN, DYNAMIC_ATTR, LIST_SIZES_ATTR, TENSOR, TENSOR_LIST, TORCH_TO_ONNX_DTYPE,
                           arg_layout, op_type_of, returns_list)

# Opset of the ONNX ops in a torch-captured model (the frontend's glue and the ATen lowering rules).
# 18: Reduce* take axes as an input, Split has num_outputs, LayerNormalization (17) exists.
ONNX_OPSET = 18

_DROPPED = frozenset({"_assert_tensor_metadata.default", "_assert_scalar.default", "_assert_async.default",
                      "_assert_async.msg", "sym_constrain_range.default", "sym_constrain_range_for_size.default"})

# Python operators on symbolic sizes -> ONNX op on 0-d tensors
_SYM_OPS = {operator.add: "Add", operator.sub: "Sub", operator.mul: "Mul", operator.floordiv: "Div",
            operator.mod: "Mod", operator.neg: "Neg", operator.truediv: "Div", operator.eq: "Equal",
            operator.lt: "Less", operator.le: "LessOrEqual", operator.gt: "Greater",
            operator.ge: "GreaterOrEqual", operator.pow: "Pow"}


class TorchImportError(ValueError):
    """A construct of the captured graph that graft's IR cannot hold (names the node and module)."""


def torch_dtype(dtype) -> DataType:
    """ONNX element type of a ``torch.dtype``.

    Raises:
        TorchImportError: a dtype with no ONNX equivalent.
    """
    name = str(dtype).removeprefix("torch.")
    try:
        return TORCH_TO_ONNX_DTYPE[name]
    except KeyError:
        raise TorchImportError(f"torch dtype {dtype} has no ONNX equivalent") from None


def tensor_to_numpy(t) -> np.ndarray:
    """A numpy copy of a torch tensor (bfloat16 / float8 through ``ml_dtypes``)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        import ml_dtypes

        nd = ml_dtypes.float8_e4m3fn if t.dtype == torch.float8_e4m3fn else ml_dtypes.float8_e5m2
        return t.view(torch.uint8).numpy().view(nd).copy()
    return np.array(t.numpy(), copy=True)


def module_path(meta: dict) -> tuple[str, str]:
    """(user module path, module class name) of an fx node from its ``nn_module_stack``."""
    stack = meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    path = re.sub(r"^L\['self'\]\.?|^L__self___?", "", str(path))
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).lstrip(".")
    typ = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
    return path, typ.rsplit(".", 1)[-1]


class _Importer:
    def __init__(self, ep, dim_names: dict[str, str]):
        self.ep = ep
        self.dim_names = dim_names
        self.model = Model(opset_imports={"": ONNX_OPSET, ATEN_DOMAIN: 1})
        self.model.producer_name = "graft"
        self.graph = self.model.graph
        self.env: dict[Any, Any] = {}

    # -- types ------------------------------------------------------------------
    def _dim(self, d):
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            if getattr(expr, "is_number", False):
                return int(expr)
            s = str(expr)
            return self.dim_names.get(s, s)
        return int(d)

    def _typed(self, v: Value, val) -> Value:
        if isinstance(val, torch.Tensor):
            v.dtype = torch_dtype(val.dtype)
            v.shape = tuple(self._dim(d) for d in val.shape)
        elif isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            v.dtype, v.shape = DataType.INT64, ()
        elif isinstance(val, (torch.SymFloat, float)):
            v.dtype, v.shape = DataType.DOUBLE, ()
        elif isinstance(val, (torch.SymBool, bool)):
            v.dtype, v.shape = DataType.BOOL, ()
        return v

    def _where(self, fx_node) -> str:
        path, typ = module_path(fx_node.meta)
        mod = f"module '{path}' ({typ})" if path else "the top-level module"
        return f"node {fx_node.name!r} ({fx_node.target}) in {mod}"

    # -- values -----------------------------------------------------------------
    def _const(self, array, hint: str) -> Value:
        v = self.graph.make_constant(np.asarray(array), hint)
        v.meta["torch.kind"] = "constant"
        return v

    def _initializer(self, name: str, tensor, kind: str) -> Value:
        if not isinstance(tensor, torch.Tensor):
            raise TorchImportError(f"{kind} {name!r} is a {type(tensor).__name__}, not a tensor "
                                   f"(script objects are not supported)")
        v = Value(self.graph.unique_name(name), const=Tensor(tensor_to_numpy(tensor), dtype=torch_dtype(tensor.dtype)))
        v.meta["torch.kind"] = kind
        v.meta["torch.fqn"] = name
        self.graph.add_initializer(v)
        return v

    def _value(self, a, fx_node):
        """IR Value for an fx argument that must be a tensor-like value."""
        if isinstance(a, torch.fx.Node):
            got = self.env.get(a)
            if isinstance(got, Value):
                return got
            raise TorchImportError(f"{self._where(fx_node)} reads {a.name!r}, which is not a single tensor")
        raise TorchImportError(f"{self._where(fx_node)}: unexpected argument {a!r}")

    # -- placeholders -----------------------------------------------------------
    def placeholders(self) -> None:
        from torch.export.graph_signature import InputKind

        ep = self.ep
        specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
        for n in ep.graph.nodes:
            if n.op != "placeholder":
                continue
            spec = specs.get(n.name)
            if spec is None or spec.kind == InputKind.USER_INPUT:
                val = n.meta.get("val")
                if not hasattr(val, "shape"):
                    if n.users:
                        raise TorchImportError(f"input {n.name!r} is a {type(val).__name__}, not a tensor; "
                                               f"graft models take tensor inputs only")
                    continue
                v = self._typed(Value(n.name), val)
                self.graph.add_input(v)
                self.env[n] = v
                continue
            if not n.users:
                continue  # an unused parameter/buffer (e.g. BatchNorm's num_batches_tracked)
            if spec.kind == InputKind.PARAMETER:
                self.env[n] = self._initializer(spec.target, ep.state_dict[spec.target], "parameter")
            elif spec.kind == InputKind.BUFFER:
                t = ep.state_dict[spec.target] if spec.persistent is not False else ep.constants[spec.target]
                self.env[n] = self._initializer(spec.target, t, "buffer")
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                self.env[n] = self._initializer(spec.target, ep.constants[spec.target], "constant")
            else:
                raise TorchImportError(f"input {n.name!r} is a {spec.kind.name} input (script object or "
                                       f"effect token); graft's IR holds tensors only")

    # -- nodes ------------------------------------------------------------------
    def call(self, n) -> None:
        target = n.target
        if target is operator.getitem:
            src = self.env.get(n.args[0])
            if not isinstance(src, (list, tuple)):
                raise TorchImportError(f"{self._where(n)}: getitem on a value that is not a tuple")
            i = n.args[1]
            if i >= len(src):
                if n.users:
                    raise TorchImportError(f"{self._where(n)}: reads output {i} of a {len(src)}-output node")
                return  # an unread output the import did not keep
            self.env[n] = src[i]
            return
        if isinstance(target, torch._ops.OpOverload):
            op_type = op_type_of(target)
            if op_type in _DROPPED:
                return
            self._aten(n, op_type)
            return
        if target in _SYM_OPS or getattr(target, "__name__", "") in ("sym_max", "sym_min", "sym_not",
                                                                      "sym_float", "sym_int"):
            self._sym(n)
            return
        kind = "control flow (torch.cond / torch.map / while_loop)" \
            if isinstance(target, torch._ops.HigherOrderOperator) else "Python call"
        raise TorchImportError(f"{self._where(n)} is a {kind} ({target}) that graft's torch frontend cannot "
                               f"represent; rewrite it with tensor ops or keep this part outside the "
                               f"compiled module")

    def _meta(self, node: Node, fx_node) -> None:
        path, typ = module_path(fx_node.meta)
        node.meta["torch.module"] = path
        if typ:
            node.meta["torch.module_type"] = typ
        node.meta["torch.target"] = str(fx_node.target)

    def _aten(self, n, op_type: str) -> None:
        layout = arg_layout(op_type)
        args, kwargs = n.args, n.kwargs
        inputs: list[Value | None] = []
        attrs: dict[str, Any] = {}
        dynamic: list[str] = []
        list_sizes: list[int] = []
        glue: list[Node] = []
        for i, (name, kind, real, default, has_default) in enumerate(layout):
            if i < len(args):
                a = args[i]
            elif name in kwargs:
                a = kwargs[name]
            else:
                a = default if has_default else None
            if kind == TENSOR:
                if isinstance(a, torch.fx.Node):
                    inputs.append(self._value(a, n))
                elif a is None:
                    inputs.append(None)
                elif isinstance(a, (bool, int, float)):
                    attrs[name] = a
                elif isinstance(a, torch.Tensor):
                    inputs.append(self._initializer(f"{n.name}_{name}", a, "constant"))
                else:
                    raise TorchImportError(f"{self._where(n)}: argument {name}={a!r} is not a tensor")
            elif kind == TENSOR_LIST:
                a = list(a or ())
                list_sizes.append(len(a))
                inputs.extend(None if x is None else self._value(x, n) for x in a)
            elif _has_node(a):
                dynamic.append(name)
                if isinstance(a, (list, tuple)):
                    inputs.append(self._int_list(a, n, glue))
                else:
                    inputs.append(self._value(a, n))
            elif a is not None:
                attrs[name] = _attr_value(a)
        if dynamic:
            attrs[DYNAMIC_ATTR] = dynamic
        if len(list_sizes) > 1:
            attrs[LIST_SIZES_ATTR] = list_sizes
        val = n.meta.get("val")
        node_name = self.graph.unique_name(n.name)
        outs = self._outputs(n, node_name, op_type, val)
        node = Node(op_type, inputs, outs, attrs, domain=ATEN_DOMAIN, name=node_name)
        for g in glue:
            self._meta(g, n)
            self.graph.append(g)
        self._meta(node, n)
        self.graph.append(node)
        if isinstance(val, (list, tuple)):
            self.env[n] = outs
        else:
            self.env[n] = outs[0] if outs else None

    def _outputs(self, n, node_name: str, op_type: str, val) -> list[Value]:
        if val is None:
            return []
        if not isinstance(val, (list, tuple)):
            # ONNX keeps node and value names apart: the output shares its node's name
            return [self._typed(Value(node_name), val)]
        count = len(val)
        names = {}
        for u in n.users:
            if u.target is operator.getitem and u.users:  # export leaves unread getitems behind
                names.setdefault(u.args[1], u.name)
        if not returns_list(op_type):
            # Fixed tuples (native_layer_norm's mean/rstd, max_pool's indices): keep only the used prefix.
            count = max(names, default=0) + 1
        return [self._typed(Value(self.graph.unique_name(names.get(i, f"{n.name}_out{i}"))), val[i])
                for i in range(count)]

    def _int_list(self, items, n, glue: list[Node]) -> Value:
        """A 1-D int64 tensor from a list of ints and symbolic sizes (ONNX Unsqueeze + Concat)."""
        parts: list[Value] = []
        pending: list[int] = []
        axes = self._const(np.array([0], dtype=np.int64), f"{n.name}_axes")
        for x in items:
            if isinstance(x, torch.fx.Node):
                if pending:
                    parts.append(self._const(np.array(pending, dtype=np.int64), f"{n.name}_sizes"))
                    pending = []
                out = Value(self.graph.unique_name(f"{x.name}_1d"), DataType.INT64, (1,))
                glue.append(Node("Unsqueeze", [self._value(x, n), axes], [out],
                                 name=self.graph.unique_name(f"{x.name}_unsqueeze")))
                parts.append(out)
            else:
                pending.append(int(x))
        if pending:
            parts.append(self._const(np.array(pending, dtype=np.int64), f"{n.name}_sizes"))
        out = Value(self.graph.unique_name(f"{n.name}_size"), DataType.INT64, (len(items),))
        glue.append(Node("Concat", parts, [out], {"axis": 0}, name=self.graph.unique_name(f"{n.name}_size")))
        return out

    def _sym(self, n) -> None:
        """Python arithmetic on symbolic sizes as ONNX ops on 0-d tensors."""
        name = getattr(n.target, "__name__", "")
        ins = []
        for a in n.args:
            if isinstance(a, torch.fx.Node):
                ins.append(self._value(a, n))
            else:
                dt = np.float64 if isinstance(a, float) else np.int64
                ins.append(self._const(np.array(a, dtype=dt), f"{n.name}_c"))
        node_name = self.graph.unique_name(n.name)
        out = self._typed(Value(node_name), n.meta.get("val"))
        if name in ("sym_float", "sym_int"):
            node = Node("Cast", ins, [out], {"to": int(out.dtype)}, name=node_name)
        elif name in ("sym_max", "sym_min"):
            node = Node("Max" if name == "sym_max" else "Min", ins, [out], name=node_name)
        elif name == "sym_not":
            node = Node("Not", ins, [out], name=node_name)
        else:
            op = _SYM_OPS[n.target]
            if n.target is operator.truediv:
                casts = []
                for i, v in enumerate(ins):
                    c = Value(self.graph.unique_name(f"{n.name}_f{i}"), DataType.DOUBLE, ())
                    node_c = Node("Cast", [v], [c], {"to": int(DataType.DOUBLE)},
                                  name=self.graph.unique_name(f"{n.name}_cast"))
                    self._meta(node_c, n)
                    self.graph.append(node_c)
                    casts.append(c)
                ins = casts
            node = Node(op, ins, [out], name=node_name)
        self._meta(node, n)
        self.graph.append(node)
        self.env[n] = out

    # -- outputs ----------------------------------------------------------------
    def outputs(self, out_node, out_names: list[str]) -> None:
        from torch.export.graph_signature import OutputKind

        specs = self.ep.graph_signature.output_specs
        flat = list(out_node.args[0])
        values = []
        for i, (a, spec) in enumerate(zip(flat, specs)):
            if spec.kind != OutputKind.USER_OUTPUT:
                what = {OutputKind.BUFFER_MUTATION: "buffer", OutputKind.PARAMETER_MUTATION: "parameter",
                        OutputKind.USER_INPUT_MUTATION: "input"}.get(spec.kind, spec.kind.name.lower())
                raise TorchImportError(
                    f"forward() updates {what} {spec.target!r} in place: graft captures inference graphs "
                    f"without state updates (avoid in-place updates of parameters/buffers/inputs in forward(); "
                    f"training-mode BatchNorm does this, so capture in eval mode)")
            v = self.env.get(a) if a is not None else None
            if not isinstance(v, Value):
                name = out_names[i] if i < len(out_names) else f"output_{i}"
                raise TorchImportError(
                    f"output {i} ({name}) of the model is {a!r}, not a tensor: graft models return tensors only; "
                    f"wrap the model in a module whose forward returns just its tensor outputs (e.g. drop the "
                    f"None of nn.MultiheadAttention(need_weights=False))")
            values.append(v)
        seen: set[Value] = set()
        final = []
        for v, name in zip(values, out_names):
            if v in seen or v.producer is None:
                # graph inputs, initializers and repeated outputs need their own named value
                out = Value(self.graph.unique_name(name), v.dtype, v.shape)
                self.graph.append(Node("Identity", [v], [out], name=self.graph.unique_name(f"{name}_identity")))
                v = out
            elif name and v.name != name:
                v.name = self.graph.unique_name(name)
            seen.add(v)
            final.append(v)
        self.graph.set_outputs(final)

    def eliminate_dead(self) -> None:
        g = self.graph
        changed = True
        while changed:
            changed = False
            for node in reversed(g.nodes):
                if not any(o.num_uses or o.is_graph_output() for o in node.outputs):
                    g.remove(node, check_uses=False)
                    changed = True
        for name, v in list(g.initializers.items()):
            if v.num_uses == 0 and not v.is_graph_output():
                del g.initializers[name]


def _has_node(a) -> bool:
    if isinstance(a, torch.fx.Node):
        return True
    if isinstance(a, (list, tuple)):
        return any(isinstance(x, torch.fx.Node) for x in a)
    return False


def _attr_value(a):
    if isinstance(a, torch.dtype):
        return str(a).removeprefix("torch.")
    if isinstance(a, (torch.device, torch.layout, torch.memory_format)):
        return str(a).removeprefix("torch.")
    if isinstance(a, tuple):
        return [_attr_value(x) for x in a]
    if isinstance(a, list):
        return [_attr_value(x) for x in a]
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return int(a) if isinstance(a, torch.SymInt) else float(a) if isinstance(a, torch.SymFloat) else bool(a)
    return a


def output_names(ep) -> list[str]:
    """Names for the flat user outputs from the output pytree (``last_hidden_state``, ``output_0``)."""
    from torch.export.graph_signature import OutputKind
    from torch.utils import _pytree as pytree

    n_user = sum(1 for s in ep.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT)
    try:
        spec = ep.call_spec.out_spec
        tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = [p for p, _ in pytree.tree_flatten_with_path(tree)[0]]
        names = []
        for p in paths:
            parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p]
            names.append("_".join(parts))
    except Exception:  # an unusual output container: fall back to positions
        names = []
    if len(names) != n_user:
        names = [f"output_{i}" for i in range(n_user)]
    if n_user == 1 and names[0] in ("", "0"):
        return ["output"]
    return [nm if nm and not nm[0].isdigit() else f"output_{nm}" for nm in names]


def import_program(ep, dim_names: dict[str, str] | None = None) -> Model:
    """Translate an ``ExportedProgram`` into an IR :class:`Model` (see the module doc).

    Args:
        ep: the program (any ATen level: training IR or core ATen).
        dim_names: symbol name (``"s43"``) → dim name (``"batch"``) for symbolic dims.

    Raises:
        TorchImportError: a graph construct graft cannot represent (control flow,
            script objects, buffer mutation, non-tensor outputs).
    """
    imp = _Importer(ep, dim_names or {})
    imp.placeholders()
    out_node = None
    for n in ep.graph.nodes:
        if n.op == "call_function":
            imp.call(n)
        elif n.op == "get_attr":
            obj = getattr(ep.graph_module, n.target)
            if not isinstance(obj, torch.Tensor):
                raise TorchImportError(f"node {n.name!r} reads submodule {n.target!r}, a branch of control flow "
                                       f"(torch.cond / torch.map / while_loop), which graft's torch frontend does "
                                       f"not support; rewrite it with torch.where or keep it outside the module")
            imp.env[n] = imp._initializer(n.target, obj, "constant")
        elif n.op == "output":
            out_node = n
    imp.outputs(out_node, output_names(ep))
    imp.eliminate_dead()
    return imp.model
