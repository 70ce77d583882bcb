"""What changed between two ONNX models, and which graft rule changed it.

``diff_models(a, b)`` matches nodes of A and B (all graphs, subgraphs included):
a named node by its name, an unnamed node by its op type and output names, each
within its graph. Unmatched A nodes are *removed*, unmatched B nodes *added*,
and a matched pair whose op, inputs or attributes differ is *changed*.

Where B came out of graft, each node a rule created carries provenance in
``NodeProto.metadata_props`` (``graft.rule``, ``graft.replaced``; see
:mod:`graft.compiler.engine.rewriter`). Added nodes are grouped by the rewrite that made
them, and each rewrite is tied to the A nodes it replaced, to the producers
that were dropped because only the replaced nodes read them (the Constant
weights of a folded Conv, say), and to the readers that now take the rule's
output instead of the replaced one (*rewired*, a change the rule explains).

Rule-made initializers carry the same provenance (``TensorProto.metadata_props``),
so rules that create only constants (``constant_to_initializer``, constant
folding) are found too.

Limits: a rule that creates nothing and only rewires readers to an existing
value (``remove_identity``, ``remove_noop_reshape``) leaves no trace in the ONNX
file: what it removed is listed as removed without a rule. When a second rule
rewrote a node the first rule created, the second rule's ``graft.replaced`` names
that intermediate node (listed as ``intermediate``); the first rule is then found
only through an initializer it made, if any.

JSON (:meth:`ModelDiff.to_json`), schema ``graft.diff/1``:

- ``a``, ``b``: per model ``{"name", "nodes", "parameters", "bytes", "initializers",
  "constant_nodes"}``. ``parameters`` counts tensor elements of initializers
  (sparse ones by stored values) and of ``Constant`` node values, in every
  graph; ``bytes`` is their size at the tensors' element widths (strings by length).
- ``identical``: no node, op-count, graph input/output or initializer difference.
- ``ops``: ``[{"op", "a", "b", "delta"}]`` for every op type in either model,
  sorted by op (``domain::Op`` outside ai.onnx).
- ``nodes``: ``{"unchanged": int, "removed": [node], "added": [node],
  "changed": [change]}``; ``node`` is ``{"graph", "name", "op", "outputs", "rule"}``
  where ``rule`` is the rule that replaced/dropped (removed) or created (added)
  it, else null; removed nodes also have ``"how"``: ``"replaced"`` or ``"dropped"`` (by
  ``rule``), ``"to_initializer"`` (no rule, but B holds the Constant node's output as an
  initializer of the same name, as other ONNX tools write it) or null.
  ``change`` is ``{"graph", "name", "op", "op_b" (when the op type changed),
  "inputs": [{"index", "a", "b", "rewired"}], "attributes": [{"name", "a", "b"}],
  "rewired_only"}`` (``a``/``b`` is null for an input or attribute only one side has).
- ``rules``: one entry per rule that created nodes or initializers, sorted by rule name:
  ``{"rule", "rewrites", "created": {op: n}, "replaced": {op: n}, "dropped": {op: n},
  "rewired": int (inputs of kept nodes that now read the rule's output), "created_nodes",
  "replaced_nodes", "dropped_nodes", "created_initializers", "dropped_initializers": [names],
  "intermediate": [names in graft.replaced that are not A nodes]}``.
- ``io``: ``{"inputs"|"outputs": {"removed": [name], "added": [name],
  "changed": [{"name", "a", "b"}]}}`` with types written ``float[batch,3,224,224]``.
- ``initializers``: ``{"removed": [name], "added": [name], "changed": [name]}`` (main
  graph and subgraphs; ``changed``: same name, different dtype, shape or data).
- ``layers`` (only when some initializer kept its name but changed shape, as after structured
  pruning): ``{"total": {"params": [a, b], "macs": [a, b]}, "layers": [{"name", "op", "params": [a, b],
  "macs": [a, b]}], "inputs": {input: shape}}`` from :func:`graft.compiler.techniques.pruning.report.layer_diff`
  (MACs at batch 1, other symbolic dims from ``dim_sizes`` or 32), or ``{"error": str}``.
- ``check``: null, or ``{"inputs": {name: shape}, "outputs": [{"output", "output_b", "max_abs",
  "max_rel", "cosine", "shape", "shape_b", "problem", "within_atol"}], "error": str | null,
  "atol": float}``: A and B run in onnxruntime on the same inputs, outputs paired by position
  (:func:`graft.compiler.techniques.numeric.agreement`). ``problem`` is null, ``"shape"`` (the shapes differ) or
  ``"nonfinite"`` (NaN/inf in one output where the other is finite); errors are then null.
  ``within_atol``: no problem and max abs error <= ``atol``.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graft.compiler.driver.diff_graph import (MAIN, FlatModel, FlatNode, Rewrite, attribute_rewrites, flatten, op_label,
                                 rule_summary, summary)
from graft.compiler.engine.rewriter import PROVENANCE_RULE
from graft.ir.dtypes import name_of

SCHEMA = "graft.diff/1"


# --------------------------------------------------------------------------- comparing nodes
def _attr_value(a: onnx.AttributeProto) -> Any:
    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return None  # subgraph nodes are diffed as nodes of their own graph
    if a.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(a.t)
    return helper.get_attribute_value(a)


def _attr_equal(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype \
            and x.shape == y.shape and bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"))
    return x == y


def show_attr(a: onnx.AttributeProto | None) -> str | None:
    """Short text for an attribute value (tensors as ``tensor float32[64]``)."""
    if a is None:
        return None
    if a.type == onnx.AttributeProto.TENSOR:
        return f"tensor {name_of(a.t.data_type)}{list(a.t.dims)}"
    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return "<graph>"
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _compare(na: FlatNode, nb: FlatNode, inst_a: dict, inst_b: dict) -> dict | None:
    pa, pb = na.proto, nb.proto
    inputs = []
    for i in range(max(len(pa.input), len(pb.input))):
        x = pa.input[i] if i < len(pa.input) else None
        y = pb.input[i] if i < len(pb.input) else None
        if x != y:
            rewired = x is not None and y is not None and inst_a.get(x) is not None \
                and inst_a.get(x) == inst_b.get(y)
            inputs.append({"index": i, "a": x, "b": y, "rewired": rewired})
    aa = {a.name: a for a in pa.attribute}
    ab = {a.name: a for a in pb.attribute}
    attrs = []
    for k in sorted(set(aa) | set(ab)):
        x, y = aa.get(k), ab.get(k)
        if x is None or y is None or x.type != y.type or not _attr_equal(_attr_value(x), _attr_value(y)):
            attrs.append({"name": k, "a": show_attr(x), "b": show_attr(y)})
    op_changed = op_label(pa) != op_label(pb)
    if not inputs and not attrs and not op_changed:
        return None
    out = {"graph": na.graph, "name": na.label, "op": na.op, "inputs": inputs, "attributes": attrs,
           "rewired_only": not attrs and not op_changed and all(i["rewired"] for i in inputs)}
    if op_changed:
        out["op_b"] = nb.op
    return out


def type_str(tp: onnx.TypeProto) -> str:
    """``float[batch,3,224,224]`` (TensorProto type names); ``?`` for unknown dims; non-tensor types by kind."""
    if not tp.HasField("tensor_type"):
        return tp.WhichOneof("value") or "?"
    tt = tp.tensor_type
    elem = name_of(tt.elem_type)
    if not tt.HasField("shape"):
        return elem
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return f"{elem}[{','.join(dims)}]"


def _io_diff(xs, ys) -> dict:
    a = {v.name: type_str(v.type) for v in xs}
    b = {v.name: type_str(v.type) for v in ys}
    return {"removed": [n for n in a if n not in b], "added": [n for n in b if n not in a],
            "changed": [{"name": n, "a": a[n], "b": b[n]} for n in a if n in b and a[n] != b[n]]}


def _node_json(n: FlatNode, rule: str | None) -> dict:
    return {"graph": n.graph, "name": n.label, "op": n.op, "outputs": list(n.proto.output), "rule": rule}


# --------------------------------------------------------------------------- the diff
def _as_proto(m, what: str) -> tuple[onnx.ModelProto, str]:
    """A ModelProto and a display name from a ModelProto, an ``ir.Model`` or a path."""
    if isinstance(m, onnx.ModelProto):
        return m, m.graph.name or what
    if isinstance(m, (str, os.PathLike)):
        from graft.ir.onnx_io import load_proto

        return load_proto(m, check=False), os.fspath(m)
    from graft.ir import Model, to_onnx

    if isinstance(m, Model):
        return to_onnx(m), m.graph.name or what
    raise TypeError(f"diff_models: model {what} is a {type(m).__name__}; expected an onnx.ModelProto, "
                    f"an ir.Model or a path to an .onnx file")


@dataclass
class ModelDiff:
    """The differences between model A and model B; see the module docstring for the JSON keys.

    Attributes:
        data: the JSON-ready dict (:meth:`to_json` returns it).
    """

    data: dict

    @property
    def identical(self) -> bool:
        return self.data["identical"]

    @property
    def removed(self) -> list[dict]:
        return self.data["nodes"]["removed"]

    @property
    def added(self) -> list[dict]:
        return self.data["nodes"]["added"]

    @property
    def changed(self) -> list[dict]:
        return self.data["nodes"]["changed"]

    @property
    def rules(self) -> dict[str, dict]:
        """Rule name → its entry of ``data["rules"]``."""
        return {r["rule"]: r for r in self.data["rules"]}

    def op_delta(self, op: str) -> int:
        """B's count of op type ``op`` minus A's (0 for an op neither has)."""
        return next((r["delta"] for r in self.data["ops"] if r["op"] == op), 0)

    def to_json(self) -> dict:
        """A json-serializable dict (schema ``graft.diff/1``; keys in the module docstring)."""
        return self.data

    def to_text(self, *, width: int = 120, max_items: int = 10) -> str:
        """Plain-text report (rich tables), deterministic for the same inputs.

        Args:
            width: line width in characters.
            max_items: rows shown per node list before ``… and N more``.
        """
        from graft.compiler.driver.diff_text import render_text

        return render_text(self.data, width=width, max_items=max_items)


def diff_models(a, b, *, check: bool = False, feeds: dict | None = None, seed: int = 0,
                dim_sizes: dict[str, int] | None = None, names: tuple[str, str] | None = None,
                atol: float = 1e-4) -> ModelDiff:
    """Compare model ``a`` (before) with model ``b`` (after).

    Args:
        a, b: ``onnx.ModelProto``, ``ir.Model``, or path of an ``.onnx`` file.
        check: also run both in onnxruntime on the same generated inputs
            (:func:`graft.compiler.techniques.numeric.compare`) and report max abs / max rel error and
            cosine similarity per output of A (B's outputs matched by position).
        feeds, seed, dim_sizes: inputs of the check (default: generated from A's input types,
            :func:`graft.compiler.techniques.numeric.make_inputs`).
        atol: an output of the check agrees (``within_atol``) when its max abs error is <= atol.
        names: display names of A and B (default: the path, else the graph name).

    Returns:
        a :class:`ModelDiff`.

    Raises:
        TypeError: an argument that is none of the accepted kinds.
        ir.ModelLoadError: a path that is missing or not an ONNX model.
    """
    pa, name_a = _as_proto(a, "A")
    pb, name_b = _as_proto(b, "B")
    if names is not None:
        name_a, name_b = names
    fa, fb = flatten(pa), flatten(pb)
    b_by_key = {n.key: n for n in fb.nodes}
    a_keys = {n.key for n in fa.nodes}
    pairs = [(n, b_by_key[n.key]) for n in fa.nodes if n.key in b_by_key]
    removed = [n for n in fa.nodes if n.key not in b_by_key]
    added = [n for n in fb.nodes if n.key not in a_keys]

    removed_inits = [k for k in fa.initializers if k not in fb.initializers]
    added_inits = [k for k in fb.initializers if k not in fa.initializers]
    rewrites = attribute_rewrites(fa, fb, removed, added, removed_inits, added_inits)
    # value name -> the rewrite that took it away (A) / made it (B): a kept node whose input moved
    # from one to the other was rewired by that rewrite
    inst_a = {o: id(rw) for rw in rewrites for n in (*rw.replaced, *rw.dropped) for o in n.proto.output}
    inst_a.update({x: id(rw) for rw in rewrites for x in rw.dropped_initializers})
    inst_b = {o: id(rw) for rw in rewrites for n in rw.created for o in n.proto.output}
    inst_b.update({x: id(rw) for rw in rewrites for x in rw.created_initializers})
    by_id = {id(rw): rw for rw in rewrites}
    changed = []
    for na, nb in pairs:
        c = _compare(na, nb, inst_a, inst_b)
        if c is not None:
            changed.append(c)
            for i in c["inputs"]:
                if i["rewired"]:
                    by_id[inst_b[i["b"]]].rewired += 1

    how: dict[int, tuple[str, str]] = {}
    for rw in rewrites:
        how.update({id(n): (rw.rule, "replaced") for n in rw.replaced})
        how.update({id(n): (rw.rule, "dropped") for n in rw.dropped})
    removed_json = []
    for n in removed:
        rule, kind = how.get(id(n), (None, None))
        if kind is None and n.proto.op_type == "Constant" and n.proto.domain in ("", "ai.onnx") \
                and (n.graph, n.proto.output[0]) in fb.initializers:
            kind = "to_initializer"
        removed_json.append({**_node_json(n, rule), "how": kind})
    added_json = [_node_json(n, n.meta.get(PROVENANCE_RULE) or None) for n in added]

    by_rule: dict[str, list[Rewrite]] = {}
    for rw in rewrites:
        by_rule.setdefault(rw.rule, []).append(rw)
    ca, cb = Counter(n.op for n in fa.nodes), Counter(n.op for n in fb.nodes)
    ops = [{"op": k, "a": ca[k], "b": cb[k], "delta": cb[k] - ca[k]} for k in sorted(set(ca) | set(cb))]
    io = {"inputs": _io_diff(pa.graph.input, pb.graph.input),
          "outputs": _io_diff(pa.graph.output, pb.graph.output)}
    inits = _initializer_diff(fa, fb)
    identical = not (removed or added or changed or any(io[k][x] for k in io for x in io[k])
                     or any(inits.values()))
    data = {
        "schema": SCHEMA,
        "a": summary(fa, name_a),
        "b": summary(fb, name_b),
        "identical": identical,
        "ops": ops,
        "nodes": {"unchanged": len(pairs) - len(changed), "removed": removed_json, "added": added_json,
                  "changed": changed},
        "rules": [rule_summary(by_rule[r]) for r in sorted(by_rule)],
        "io": io,
        "initializers": inits,
        "check": _check(pa, pb, feeds, seed, dim_sizes, atol) if check else None,
    }
    if _weights_reshaped(pa, pb):
        data["layers"] = _layer_costs(pa, pb, dim_sizes)
    return ModelDiff(data)


def _weights_reshaped(pa: onnx.ModelProto, pb: onnx.ModelProto) -> bool:
    """Some constant (initializer or Constant node) kept its name but changed shape (what structured pruning does)."""
    def dims(p):
        out = {t.name: tuple(t.dims) for t in p.graph.initializer}
        for n in p.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
                out[n.output[0]] = tuple(n.attribute[0].t.dims)
        return out
    a = dims(pa)
    return any(a.get(k, d) != d for k, d in dims(pb).items())


def _layer_costs(pa: onnx.ModelProto, pb: onnx.ModelProto, dim_sizes) -> dict:
    """Parameters and MACs per layer of A and B (the pruning section; see graft.compiler.techniques.pruning.report.layer_diff)."""
    from graft.compiler.techniques.pruning.report import layer_diff

    return layer_diff(pa, pb, dim_sizes)


def _initializer_diff(fa: FlatModel, fb: FlatModel) -> dict:
    def label(k):
        return k[1] if k[0] == MAIN else f"{k[0]}:{k[1]}"

    changed = []
    for k, ta in fa.initializers.items():
        tb = fb.initializers.get(k)
        if tb is None:
            continue
        if ta.data_type != tb.data_type or list(ta.dims) != list(tb.dims):
            changed.append(label(k))
        elif ta is not tb and ta.SerializeToString() != tb.SerializeToString() and not _attr_equal(
                numpy_helper.to_array(ta), numpy_helper.to_array(tb)):
            changed.append(label(k))
    return {"removed": [label(k) for k in fa.initializers if k not in fb.initializers],
            "added": [label(k) for k in fb.initializers if k not in fa.initializers],
            "changed": changed}


def _check(pa, pb, feeds, seed, dim_sizes, atol) -> dict:
    from graft.compiler.techniques import numeric

    shapes: dict[str, list[int]] = {}
    try:
        if feeds is None:
            feeds = numeric.make_inputs(pa, seed=seed, dim_sizes=dim_sizes)
        feeds = {k: np.asarray(v) for k, v in feeds.items()}  # a rank-0 bool comes back as a numpy scalar
        shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
        ra = numeric.run(pa, feeds)
        rb = numeric.run(pb, feeds)
    except Exception as e:  # onnxruntime raises its own exception types; report, do not crash the diff
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"inputs": shapes, "outputs": [], "error": f"{type(e).__name__}: {first}", "atol": atol}
    outs = []
    for (name_a, xa), (name_b, xb) in zip(ra.items(), rb.items()):
        r = numeric.agreement(xa, xb, name_a)
        problem = "shape" if np.shape(xa) != np.shape(xb) else \
            None if np.isfinite(r.max_abs) else "nonfinite"
        outs.append({"output": name_a, "output_b": name_b, "max_abs": _finite(r.max_abs),
                     "max_rel": _finite(r.max_rel), "cosine": r.cosine if np.isfinite(r.cosine) else None,
                     "shape": list(np.shape(xa)), "shape_b": list(np.shape(xb)), "problem": problem,
                     "within_atol": problem is None and r.max_abs <= atol})
    err = None
    if len(pa.graph.output) != len(pb.graph.output):
        err = f"A has {len(pa.graph.output)} outputs, B has {len(pb.graph.output)}; compared the first " \
              f"{len(outs)} by position"
    return {"inputs": shapes, "outputs": outs, "error": err, "atol": atol}


def _finite(x: float) -> float | None:
    # JSON has no inf or NaN (a shape mismatch, or NaN/inf in one output only)
    return x if np.isfinite(x) else None
