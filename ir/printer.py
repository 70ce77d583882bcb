"""A stable, one-line-per-node text form of an IR graph, for diffs, tests and debugging.

Example (a Conv with constant weight and bias)::

    graph main (%x: float32[1,3,8,8]) {
      %conv_out = Conv(%x, %w<float32[8,3,3,3]>, %b<float32[8]>) {group=1, kernel_shape=[3, 3]}  # conv1
      return %conv_out
    }

- Values are ``%name``; a constant (initializer, or output of a ``Constant``
  node) carries its type, ``%w<float32[8,3,3,3]>``; an absent optional input is ``%_``.
- Attributes are sorted by name; tensors print as ``<dtype[dims]>``, subgraphs
  as ``@name`` followed by the subgraph's block, indented two spaces.
- Other domains print as ``domain::Op``. Node names follow ``#``.

The text depends only on the graph (never on ids or hash order), so the same
graph always prints the same.
"""
from __future__ import annotations

import numpy as np

from graft.ir._core import Graph, Model, Node, Tensor, Value
from graft.ir.dtypes import name_of


def print_graph(graph_or_model: Graph | Model) -> str:
    """The text form of a graph (or a model's main graph, preceded by its opset line).

    Args:
        graph_or_model: an :class:`ir.Graph` or :class:`ir.Model`.

    Returns:
        the text, newline-terminated.

    Raises:
        TypeError: for anything else.
    """
    lines: list[str] = []
    if isinstance(graph_or_model, Model):
        m = graph_or_model
        opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(m.opset_imports.items()))
        lines.append(f"model (ir_version={m.ir_version}, opset {opsets})")
        _graph(m.graph, lines, 0)
    elif isinstance(graph_or_model, Graph):
        _graph(graph_or_model, lines, 0)
    else:
        raise TypeError(f"print_graph takes an ir.Graph or ir.Model, got {type(graph_or_model).__name__}")
    return "\n".join(lines) + "\n"


def type_str(dtype, shape) -> str:
    """``float32[1,3,'N',?]``-style text for a dtype and shape (``?`` unknown dim, ``*`` unknown rank)."""
    d = name_of(dtype) if dtype is not None else "?"
    d = {"float": "float32", "double": "float64"}.get(d, d)
    if shape is None:
        return f"{d}[*]"
    dims = ",".join("?" if s is None else (str(s) if isinstance(s, int) else repr(s)) for s in shape)
    return f"{d}[{dims}]"


def _graph(g: Graph, lines: list[str], depth: int) -> None:
    pad = "  " * depth
    ins = ", ".join(f"%{v.name}: {type_str(v.dtype, v.shape)}" for v in g.inputs if v.const is None)
    lines.append(f"{pad}graph {g.name} ({ins}) {{")
    for v in g.inputs:
        if v.const is not None:  # an input with a default: the caller may override it
            lines.append(f"{pad}  input %{v.name}: {type_str(v.dtype, v.shape)} = <default>")
    for n in g:
        lines.append(pad + "  " + node_line(n))
        for key in sorted(n.attrs):
            val = n.attrs[key]
            subs = [val] if isinstance(val, Graph) else \
                [x for x in val if isinstance(x, Graph)] if isinstance(val, list) else []
            for sg in subs:
                _graph(sg, lines, depth + 2)
    lines.append(f"{pad}  return " + ", ".join(_ref(v) for v in g.outputs))
    lines.append(f"{pad}}}")


def node_line(n: Node) -> str:
    """One node as ``%out = Op(%a, %b) {attr=...}  # name`` (no subgraph bodies)."""
    outs = ", ".join(f"%{o.name}" if o.name else "%_" for o in n.outputs)
    op = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
    args = ", ".join(_ref(v) for v in n.inputs)
    text = f"{outs} = {op}({args})" if n.outputs else f"{op}({args})"
    if n.attrs:
        text += " {" + ", ".join(f"{k}={_attr(n.attrs[k])}" for k in sorted(n.attrs)) + "}"
    if n.name:
        text += f"  # {n.name}"
    return text


def _ref(v: Value | None) -> str:
    if v is None:
        return "%_"
    if v.const is not None and not v.is_graph_input():
        return f"%{v.name}<{type_str(v.const.dtype, v.const.shape)}>"
    p = v.producer
    if p is not None and p.op_type == "Constant" and p.domain == "" and isinstance(p.attrs.get("value"), Tensor):
        t = p.attrs["value"]
        return f"%{v.name}<{type_str(t.dtype, t.shape)}>"
    return f"%{v.name}"


def _attr(val) -> str:
    if isinstance(val, Tensor):
        return f"<{type_str(val.dtype, val.shape)}>"
    if isinstance(val, Graph):
        return f"@{val.name}"
    if isinstance(val, float):
        # ONNX float attributes are float32: print the shortest float32 text (1e-05, not 9.99e-06)
        return str(np.float32(val))
    if isinstance(val, str):
        return repr(val)
    if isinstance(val, bytes):
        return repr(val)
    if isinstance(val, (list, tuple)):
        return "[" + ", ".join(_attr(x) for x in val) + "]"
    if isinstance(val, (bool, int)):
        return str(int(val))
    return f"<{type(val).__name__}>"
