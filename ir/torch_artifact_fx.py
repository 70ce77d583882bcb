"""graft's ``graft-fx`` file format: a ``torch.fx.GraphModule`` from :func:`graft.ir.to_torch` as data.

A zip of two members:

- ``graft_fx/module.json``: ``format`` ("graft-fx"), ``version`` (:data:`FX_VERSION`), graft and torch
  versions, ``parameters`` and ``buffers`` (state-dict names; parameters are trainable), the
  ``graft_*_names`` attributes, ``class_name``, ``nodes`` (the graph: per node ``name``, ``op``
  — placeholder, get_attr, call_function or output —, ``target``, ``args`` and ``kwargs`` as JSON)
  and ``subgraphs`` (module path → nodes, for ``If`` branches).
- ``graft_fx/weights.safetensors``: every parameter and buffer.

Call targets are names, not import paths: ``onnx::<op>@<opset>`` (graft's torch_ops registry, looked
up with :func:`graft.ir.torch_ops.lookup`), ``graft::<helper>``, ``aten::<op>.<overload>``, and a few
``torch::``/``operator::``/``math::`` functions (:func:`resolve_target`). Arguments are JSON with
tagged objects for what JSON lacks: ``{"node": name}``, ``{"tuple": [...]}``, ``{"dict": {...}}``,
``{"dtype": "float32"}``, ``{"device": "cpu"}``, ``{"layout": ...}``, ``{"memory_format": ...}``,
``{"float": "inf"}``. Reading resolves targets from the allowlist only and checks every name that
reaches fx's generated code (inputs, attributes, keyword names) is an identifier, so no code from the
file runs.
"""
from __future__ import annotations

import io
import json
import keyword
import math
import operator
import re
import zipfile
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.fx

FX_ROOT = "graft_fx"
FX_VERSION = 1
GRAFT_FX = "graft-fx"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SEGMENT = re.compile(r"[A-Za-z0-9_]+\Z")


class ArtifactError(ValueError):
    """A file :func:`load` refuses, or a module :func:`save` cannot write; the message names the
    file, the entry (node, target, archive member) and what to do."""


# --------------------------------------------------------------------------- graft-fx: names of call targets
OPERATORS = ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "eq", "ne", "lt",
              "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert")
_TORCH_FUNCTIONS = ("zeros", "ones", "full", "permute", "reshape", "cat", "stack", "where", "tensor")
# ATen ops that reach outside the process (files, printing): never resolved from a file
_ATEN_DENIED = frozenset({"from_file", "save", "_print", "warn"})


# functions to_torch calls besides the registered ONNX ops (control flow runs sub-GraphModules)
_HELPERS = {"ints": "torch_ops", "item": "torch_ops", "as_tensor": "torch_ops", "attr_tensor": "torch_ops",
            "If": "torch_ops", "Loop": "torch_ops", "Scan": "torch_ops", "fake_quantize": "torch_ops_nn"}


def _helper(name: str):
    from graft.ir import torch_ops, torch_ops_nn

    mod = {"torch_ops": torch_ops, "torch_ops_nn": torch_ops_nn}[_HELPERS[name]]
    fn = getattr(mod, name, None)
    return fn if callable(fn) else None


@lru_cache(maxsize=1)
def _graft_targets() -> dict[Callable, str]:
    """graft's op function → its name: ``onnx::<op>@<opset>`` (the first opset it implements ``op`` at),
    ``graft::<helper>``."""
    import onnx

    from graft.ir import torch_ops

    out: dict[Callable, str] = {}
    for name in _HELPERS:
        fn = _helper(name)
        if fn is not None:
            out[fn] = f"graft::{name}"
    for op in torch_ops.supported_ops():
        for v in range(1, onnx.defs.onnx_opset_version() + 1):
            fn = torch_ops.lookup(op, v)
            if fn is not None and fn not in out:
                out[fn] = f"onnx::{op}@{v}"
    return out


@lru_cache(maxsize=1)
def _names_of_targets() -> dict[Any, str]:
    out = dict(_graft_targets())
    out.update({getattr(operator, n): f"operator::{n}" for n in OPERATORS})
    out.update({getattr(torch, n): f"torch::{n}" for n in _TORCH_FUNCTIONS})
    out.update({math.floor: "math::floor", math.ceil: "math::ceil", math.sqrt: "math::sqrt"})
    return out


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        from graft.ir.torch_aten import op_type_of

        name = f"aten::{op_type_of(t)}"
        try:
            resolve_target(name)
        except ArtifactError:
            raise ArtifactError(f"node {node.name!r} calls {t}, which is not an ATen op graft-fx files may "
                                f"hold") from None
        return name
    try:
        name = _names_of_targets().get(t)
    except TypeError:  # an unhashable target
        name = None
    if name is None:
        raise ArtifactError(f"node {node.name!r} calls {getattr(t, '__qualname__', t)!r}, which graft-fx files "
                            f"cannot name (only graft's torch_ops functions, ATen ops and a few torch/operator "
                            f"functions)")
    return name


def resolve_target(name: str) -> Callable:
    """The function a graft-fx target name stands for, from the allowlist only (nothing is imported or
    looked up by a name taken from a file beyond ATen's own op table).

    Raises:
        ArtifactError: the name is not on the allowlist.
    """
    ns, _, rest = name.partition("::")
    if ns == "aten":
        op, _, ov = rest.rpartition(".")
        if not (_IDENT.match(op or "") and _IDENT.match(ov or "")) or op in _ATEN_DENIED:
            raise ArtifactError(f"target {name!r} is not an allowed ATen op")
        target = getattr(getattr(torch.ops.aten, op, None), ov, None)
        if not isinstance(target, torch._ops.OpOverload) or _touches_files(target):
            raise ArtifactError(f"target {name!r} is not an allowed ATen op")
        return target
    if ns == "operator" and rest in OPERATORS:
        return getattr(operator, rest)
    if ns == "torch" and rest in _TORCH_FUNCTIONS:
        return getattr(torch, rest)
    if ns == "math" and rest in ("floor", "ceil", "sqrt"):
        return getattr(math, rest)
    fn = None
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9_]*)@([0-9]{1,3})", rest)
    if ns == "onnx" and m:
        from graft.ir.torch_ops import lookup

        fn = lookup(m[1], int(m[2]))  # graft's registry: the op's implementation at that opset
    elif ns == "graft" and rest in _HELPERS:
        fn = _helper(rest)
    if fn is None:
        raise ArtifactError(f"target {name!r} is not on graft's allowlist (graft's ONNX ops and helpers, ATen "
                            f"ops, {', '.join('torch.' + n for n in _TORCH_FUNCTIONS)}, operator functions)")
    return fn


def _touches_files(op) -> bool:
    return any(k in a.name.lower() for a in op._schema.arguments for k in ("file", "path"))


# --------------------------------------------------------------------------- graft-fx: arguments as JSON
def _encode(v, node: torch.fx.Node):
    if isinstance(v, torch.fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, tuple):
        return {"tuple": [_encode(x, node) for x in v]}
    if isinstance(v, list):
        return [_encode(x, node) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise ArtifactError(f"node {node.name!r}: a dict argument with non-string keys")
        return {"dict": {k: _encode(x, node) for k, x in v.items()}}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    raise ArtifactError(f"node {node.name!r}: argument {v!r} of type {type(v).__name__} cannot be written "
                        f"as graft-fx JSON")


def _decode(v, env: dict, where: str):
    if isinstance(v, list):
        return [_decode(x, env, where) for x in v]
    if not isinstance(v, dict):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise ArtifactError(f"{where}: unexpected JSON value {v!r}")
    if len(v) != 1:
        raise ArtifactError(f"{where}: an argument object must have one key, got {sorted(v)}")
    (tag, x), = v.items()
    if tag == "node":
        if x not in env:
            raise ArtifactError(f"{where}: refers to node {x!r}, which is not defined before it")
        return env[x]
    if tag == "tuple" and isinstance(x, list):
        return tuple(_decode(y, env, where) for y in x)
    if tag == "dict" and isinstance(x, dict):
        return {k: _decode(y, env, where) for k, y in x.items()}
    if tag == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    kinds = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
    if tag in kinds and isinstance(x, str) and _IDENT.match(x) and isinstance(getattr(torch, x, None), kinds[tag]):
        return getattr(torch, x)
    if tag == "device" and isinstance(x, str) and re.fullmatch(r"[a-z]+(:[0-9]+)?", x):
        return torch.device(x)
    raise ArtifactError(f"{where}: unknown argument {v!r}")


# --------------------------------------------------------------------------- graft-fx: write and read
def _nodes_json(gm: torch.fx.GraphModule) -> list[dict]:
    nodes = []
    for n in gm.graph.nodes:
        entry: dict[str, Any] = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            entry["target"] = _target_name(n)
        elif n.op in ("placeholder", "get_attr"):
            entry["target"] = n.target
        elif n.op != "output":
            raise ArtifactError(f"node {n.name!r} is a {n.op} node; graft-fx files hold call_function, get_attr, "
                                f"placeholder and output nodes only")
        bad = [k for k in n.kwargs if not _IDENT.match(k) or keyword.iskeyword(k)]
        if bad:
            raise ArtifactError(f"node {n.name!r}: keyword argument {bad[0]!r} is not an identifier")
        entry["args"] = _encode(tuple(n.args), n)["tuple"]
        entry["kwargs"] = {k: _encode(x, n) for k, x in n.kwargs.items()}
        nodes.append(entry)
    return nodes


def graft_fx_bytes(gm: torch.fx.GraphModule, meta: dict) -> bytes:
    """The ``graft-fx`` file for ``gm``; ``meta`` (versions, names, a note) goes into module.json as is.

    Raises:
        ArtifactError: a node the format cannot hold (a call_module/call_method node, a target with no
            name, an argument JSON cannot hold), naming it.
    """
    from safetensors.torch import save as st_save

    # sub-GraphModules (If branches) are graphs of their own, stored under their module path
    subgraphs = {path: {"class_name": type(sub).__name__, "nodes": _nodes_json(sub)}
                 for path, sub in gm.named_modules() if path and isinstance(sub, torch.fx.GraphModule)}
    state = {}
    seen_storage = set()
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if t.numel() and key in seen_storage:  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen_storage.add(key)
        state[name] = t
    meta = {**meta, "class_name": type(gm).__name__, "nodes": _nodes_json(gm), "subgraphs": subgraphs}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{FX_ROOT}/module.json", json.dumps(meta, allow_nan=False))
        z.writestr(f"{FX_ROOT}/weights.safetensors", st_save(state))
    return buf.getvalue()


def is_dotted_name(name: str) -> bool:
    """Dot-separated word segments (``encoder.layer.0.weight``, ``0_attention_Constant``): safe in fx's
    generated code, which writes an attribute segment that is not an identifier as ``getattr(x, "seg")``."""
    return all(_SEGMENT.match(s) for s in name.split("."))


def check_name(name, what: str, where: str, dotted: bool = True) -> str:
    """``name`` if it is an identifier (``dotted``: dot-separated word segments, as state names are).

    Raises:
        ArtifactError: otherwise, naming ``what`` and ``where``.
    """
    ok = isinstance(name, str) and name != "" and (is_dotted_name(name) if dotted else bool(_IDENT.match(name)))
    if not ok:
        raise ArtifactError(f"{where}: {what} {name!r} is not a {'dotted ' if dotted else ''}identifier")
    return name


def read_graft_fx(z: zipfile.ZipFile, where: str) -> torch.fx.GraphModule:
    """The GraphModule in graft-fx archive ``z`` (``where``: the file, for messages).

    Raises:
        ArtifactError: an unexpected member, bad JSON, a target off the allowlist, a name that is not an
            identifier, a malformed graph — naming the node or entry; nothing from the file has run.
    """
    from safetensors.torch import load as st_load

    expected = {f"{FX_ROOT}/module.json", f"{FX_ROOT}/weights.safetensors"}
    extra = sorted(set(z.namelist()) - expected)
    if extra:
        raise ArtifactError(f"{where}: unexpected archive member {extra[0]!r} in a graft-fx file")
    try:
        meta = json.loads(z.read(f"{FX_ROOT}/module.json"))
    except ValueError as e:
        raise ArtifactError(f"{where}: graft_fx/module.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != GRAFT_FX:
        raise ArtifactError(f"{where}: graft_fx/module.json does not describe a graft-fx module")
    if meta.get("version") != FX_VERSION:
        raise ArtifactError(f"{where}: graft-fx version {meta.get('version')!r}; this graft reads version "
                            f"{FX_VERSION} (load it with the graft that wrote it, graft {meta.get('graft_version')})")
    try:
        tensors = st_load(z.read(f"{FX_ROOT}/weights.safetensors"))
    except Exception as e:  # noqa: BLE001 — safetensors raises its own error types on corrupt data
        raise ArtifactError(f"{where}: graft_fx/weights.safetensors cannot be read ({first_line(e)})") from None
    params, buffers = meta.get("parameters"), meta.get("buffers")
    if not isinstance(params, list) or not isinstance(buffers, list):
        raise ArtifactError(f"{where}: module.json lacks the parameter and buffer lists")
    root = torch.nn.Module()
    for name in params + buffers:
        check_name(name, "state name", where)
        if name not in tensors:
            raise ArtifactError(f"{where}: tensor {name!r} is listed in module.json but not in weights.safetensors")
        *path, leaf = name.split(".")
        mod = root
        for s in path:
            sub = getattr(mod, s, None)
            if sub is None:
                sub = torch.nn.Module()
                mod.add_module(s, sub)
            elif not isinstance(sub, torch.nn.Module):
                raise ArtifactError(f"{where}: state name {name!r} nests under {s!r}, which is not a module")
            mod = sub
        if hasattr(mod, leaf):
            raise ArtifactError(f"{where}: state name {name!r} is given twice or names a module attribute")
        if name in params:
            mod.register_parameter(leaf, torch.nn.Parameter(tensors[name], requires_grad=True))
        else:
            mod.register_buffer(leaf, tensors[name])
    subgraphs = meta.get("subgraphs", {})
    if not isinstance(subgraphs, dict):
        raise ArtifactError(f"{where}: module.json 'subgraphs' is not an object")
    for path in subgraphs:
        check_name(path, "subgraph path", where)
    state = set(params) | set(buffers)
    # deepest first: a branch's own branches are GraphModules before the branch is built
    for path in sorted(subgraphs, key=lambda p: -p.count(".")):
        sub = subgraphs[path]
        if not isinstance(sub, dict):
            raise ArtifactError(f"{where}: subgraph {path!r} is not an object")
        here = f"{where}: subgraph {path!r}"
        prefix = path + "."
        attrs = {n[len(prefix):] for n in state | set(subgraphs) if n.startswith(prefix)}
        *parent, leaf = path.split(".")
        owner = root
        for seg in parent:
            owner = getattr(owner, seg, None)
            if not isinstance(owner, torch.nn.Module):
                raise ArtifactError(f"{here}: its parent module does not exist")
        holder = getattr(owner, leaf, None)
        if holder is None:
            holder = torch.nn.Module()
        if not isinstance(holder, torch.nn.Module):
            raise ArtifactError(f"{here}: the path is a tensor")
        gm = _build_graph(holder, sub.get("nodes"), attrs, sub.get("class_name"), here)
        if hasattr(owner, leaf):
            delattr(owner, leaf)
        owner.add_module(leaf, gm)
    gm = _build_graph(root, meta.get("nodes"), state | set(subgraphs), meta.get("class_name"), where)
    attach_names(gm, meta)
    return gm


def _build_graph(root: torch.nn.Module, nodes, attrs: set, class_name, where: str) -> torch.fx.GraphModule:
    """A GraphModule over ``root`` from a graft-fx node list; ``attrs``: the get_attr targets allowed."""
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    if not isinstance(nodes, list) or not nodes:
        raise ArtifactError(f"{where}: module.json has no nodes")
    outputs = 0
    for i, entry in enumerate(nodes):
        if not isinstance(entry, dict):
            raise ArtifactError(f"{where}: node #{i} is not an object")
        name = check_name(entry.get("name"), "node name", f"{where}: node #{i}", dotted=False)
        here = f"{where}: node {name!r}"
        if name in env:
            raise ArtifactError(f"{here}: the name is used twice")
        op, target = entry.get("op"), entry.get("target")
        args, kwargs = entry.get("args", []), entry.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ArtifactError(f"{here}: args must be a list and kwargs an object")
        for k in kwargs:
            if not _IDENT.match(k) or keyword.iskeyword(k):
                raise ArtifactError(f"{here}: keyword argument {k!r} is not an identifier")
        a = tuple(_decode(x, env, here) for x in args)
        kw = {k: _decode(x, env, here) for k, x in kwargs.items()}
        if op == "placeholder":
            if a or kw:
                raise ArtifactError(f"{here}: an input takes no arguments")
            check_name(target, "input name", here, dotted=False)
            if keyword.iskeyword(target):
                raise ArtifactError(f"{here}: input name {target!r} is a Python keyword")
            node = graph.create_node("placeholder", target, a, kw, name)
        elif op == "get_attr":
            if target not in attrs:
                raise ArtifactError(f"{here}: reads {target!r}, which is not a parameter, buffer or subgraph "
                                    f"of the file")
            node = graph.create_node("get_attr", target, (), {}, name)
        elif op == "call_function":
            if not isinstance(target, str):
                raise ArtifactError(f"{here}: target must be a string")
            try:
                fn = resolve_target(target)
            except ArtifactError as e:
                raise ArtifactError(f"{here}: {e}; nothing from the file was run") from None
            node = graph.create_node("call_function", fn, a, kw, name)
        elif op == "output":
            if len(a) != 1 or kw:
                raise ArtifactError(f"{here}: the output node takes one argument")
            outputs += 1
            node = graph.create_node("output", "output", a, kw, name)
        else:
            raise ArtifactError(f"{here}: op {op!r} is not one graft-fx files hold")
        env[name] = node
    if outputs != 1:
        raise ArtifactError(f"{where}: the graph has {outputs} output nodes, not 1")
    if not isinstance(class_name, str) or not _IDENT.match(class_name):
        class_name = "GraftModule"
    try:
        graph.lint()
        return torch.fx.GraphModule(root, graph, class_name=class_name)
    except Exception as e:  # noqa: BLE001 — fx's own checks on a malformed graph
        raise ArtifactError(f"{where}: the graph is malformed ({first_line(e)})") from None


def attach_names(gm, meta: dict) -> None:
    """Set ``graft_input_names``, ``graft_output_names`` and ``graft_state_names`` from file metadata."""
    for key in ("graft_input_names", "graft_output_names"):
        v = meta.get(key)
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            setattr(gm, key, list(v))
    v = meta.get("graft_state_names")
    if isinstance(v, dict) and all(isinstance(k, str) and isinstance(s, str) for k, s in v.items()):
        gm.graft_state_names = dict(v)




def first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch's capture errors run to pages), at most 300 characters."""
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]
