"""Structured-pruning removal rules: physically drop the channels, heads and neurons a plan removes.

The plan (``graft.compiler.techniques.pruning.plan``, in ``model.meta["graft.prune_plan"]``) is the
context: the channel-dependency analysis decided, per node, which indices of which
axis of each constant input survive. Each rule rebuilds one node with its constant
inputs sliced (``W' = W[keep_out][:, keep_in]``), so the model really shrinks:

- prune_conv: Conv weight rows (output channels) and columns (input channels), bias;
  ``group`` of a depthwise / grouped Conv becomes kept channels / channels per group;
  bias compensation ``b' = b + sum_{c removed} v_c * sum_k W[:, c, k]`` for removed inputs
  that held a known constant ``v_c`` (exact: ONNX Conv-11 is linear in each input channel,
  and without padding a constant channel contributes a constant per output), or, for an
  input-independent channel that is not uniform at the output (zero padding), the constant
  map ``Conv(x_removed, W[:, removed])`` added after the Conv (see compiler/pruning/compensate.py).
- prune_conv_transpose: ConvTranspose weight rows (input channels) and columns (output channels), bias.
- prune_gemm / prune_matmul: weight columns (output neurons) and rows (inputs), Gemm's C;
  compensation ``C' = C + alpha * v @ B'[removed]`` / ``y' = x' W' + v @ W[removed]``.
- prune_batchnorm / prune_instancenorm / prune_layernorm: BatchNormalization scale/B/mean/var,
  InstanceNormalization and LayerNormalization scale/bias, per kept channel.
- prune_embedding: Gather from a constant table (embedding columns).
- prune_split: new ``split`` sizes on the channel axis (explicit sizes replace ``num_outputs``).
- prune_slice: new starts/ends on the channel axis: ``s' = #kept before s``, ``e' = s' + #kept in [s, e)``.
- prune_reshape / prune_shape_literal: target-shape literals that name a channel
  count (a head count) become the kept count, in the Reshape's constant or in the
  constant piece of the Concat that builds it.
- prune_constant_operand: any other node's constant operand (a broadcast bias, a
  class token, a position embedding, PRelu slopes) sliced along the channel axes.

Every rule refuses nodes the plan does not name, so a pruned node is never pruned twice.
"""
from __future__ import annotations

import numpy as np

from graft.compiler.engine import Rule, Var, op
from graft.rules.prune_plan import plan_of

x, w, b, c = Var("x"), Var("w"), Var("b"), Var("c")


def _edit(m, node):
    plan = plan_of(node.graph.model if node.graph is not None else None)
    return None if plan is None else plan.edits.get(node)


def _check(name):
    def check(m):
        node = getattr(m, name)
        if _edit(m, node) is None:
            return m.fail(f"{node.op_type} node {node.name!r} is not in the pruning plan", node)
        return None
    check.__name__ = f"check_{name}"
    return check


def _sliced(op, node, pe, i):
    """Input ``i`` of ``node`` with the plan's slices applied (a new constant), or the input itself.

    A constant shared by several nodes and sliced the same way for each becomes one new constant
    (the plan remembers it), never one copy per reader; the original is never edited.
    """
    v = node.inputs[i] if i < len(node.inputs) else None
    cuts = pe.slices.get(i)
    if v is None or not cuts:
        return v
    plan = plan_of(node.graph.model)
    key = (id(v), tuple((axis, keep.tobytes()) for axis, keep in cuts))
    done = plan.sliced.get(key)
    if done is not None and done.graph is node.graph and done.name in node.graph.initializers:
        return done
    arr = np.asarray(v.constant())
    for axis, keep in cuts:
        arr = np.take(arr, keep, axis=axis)
    new = _derived(op.const(arr.astype(v.constant().dtype), name=f"{v.name}_pruned"), v)
    plan.sliced[key] = new
    return new


def _derived(new, old):
    """Mark ``new`` as the pruned form of ``old`` (finish() gives it back the old name, and a torch
    parameter stays a parameter under its state_dict key)."""
    new.meta["graft.pruned_from"] = old.name
    for k in ("torch.kind", "torch.fqn"):
        if k in old.meta:
            new.meta[k] = old.meta[k]
    return new


def _rebuild(op, node, inputs, attrs=None):
    attrs = {**node.attrs, **(attrs or {})}
    builder = op if node.domain in ("", "ai.onnx") else op.domain(node.domain)
    return getattr(builder, node.op_type)(*inputs, _outputs=len(node.outputs), _name=node.name or node.op_type,
                                          **attrs)


def _dtype(v):
    """numpy dtype of value ``v`` (float32 when unknown)."""
    arr = v.constant() if v is not None else None
    if arr is not None:
        return arr.dtype
    return v.dtype.to_numpy() if v is not None and v.dtype is not None else np.dtype(np.float32)


# ---------------------------------------------------------------- Conv
def conv_replacement(op, m):
    """Conv with kept output/input channels, new group, compensated bias."""
    node = m.conv
    pe = _edit(m, node)
    ins = [m[x], _sliced(op, node, pe, 1)]
    bias = _sliced(op, node, pe, 2) if len(node.inputs) > 2 else None
    if pe.bias_delta is not None:
        delta, dtype = pe.bias_delta, _dtype(node.inputs[1])
        base = bias.constant() if bias is not None else np.zeros(len(delta), dtype=dtype)
        bias = op.const((base.astype(np.float64) + delta).astype(dtype), name=f"{node.name}_bias_pruned")
    if bias is not None:
        ins.append(bias)
    y = _rebuild(op, node, ins, pe.attrs)
    if pe.bias_map is None:
        return y
    return op.Add(y, op.const(pe.bias_map[None].astype(_dtype(node.inputs[1])), name=f"{node.name}_compensation"))


prune_conv = Rule("prune_conv", op.Conv(x, w, op.optional(b), name="conv"), conv_replacement,
                  check=_check("conv"))


# ---------------------------------------------------------------- Gemm / MatMul
def gemm_replacement(op, m):
    """Gemm with kept rows/columns of B and C, compensated C."""
    node = m.gemm
    pe = _edit(m, node)
    ins = [m[x], _sliced(op, node, pe, 1)]
    cc = _sliced(op, node, pe, 2) if len(node.inputs) > 2 else None
    attrs = dict(pe.attrs)
    if pe.bias_delta is not None:
        delta, dtype = pe.bias_delta, _dtype(node.inputs[1])
        beta = float(node.attrs.get("beta", 1.0))
        base = beta * cc.constant().astype(np.float64) if cc is not None else np.zeros(1)
        cc = op.const((base + delta).astype(dtype), name=f"{node.name}_c_pruned")
        attrs["beta"] = 1.0
    if cc is not None:
        ins.append(cc)
    return _rebuild(op, node, ins, attrs)


def matmul_replacement(op, m):
    """MatMul with kept weight rows/columns (+ compensation Add)."""
    node = m.matmul
    pe = _edit(m, node)
    y = _rebuild(op, node, [m[x], _sliced(op, node, pe, 1)])
    if pe.bias_delta is None:
        return y
    return op.Add(y, op.const(pe.bias_delta.astype(_dtype(node.inputs[1])), name=f"{node.name}_compensation"))


prune_gemm = Rule("prune_gemm", op.Gemm(x, w, op.optional(c), name="gemm"), gemm_replacement, check=_check("gemm"))
prune_matmul = Rule("prune_matmul", op.MatMul(x, w, name="matmul"), matmul_replacement, check=_check("matmul"))


# ---------------------------------------------------------------- normalizations, embeddings
def _all_sliced(op, m):
    """The node with every planned constant input sliced (and shape literals replaced)."""
    node = m.node
    pe = _edit(m, node)
    ins = [_sliced(op, node, pe, i) for i in range(len(node.inputs))]
    for i in sorted({i for i, _ in pe.literals}):
        arr = np.array(node.inputs[i].constant()).copy()
        for (j, k), value in pe.literals.items():
            if j == i:
                arr.flat[k] = value
        ins[i] = op.const(arr, name=f"{node.inputs[i].name}_pruned")
    return _rebuild(op, node, ins, pe.attrs)


def _check_kind(kind):
    """A check passing nodes the plan names with work of ``kind`` for this rule."""
    def check(m):
        node = m.node
        pe = _edit(m, node)
        if pe is None:
            return m.fail(f"{node.op_type} node {node.name!r} is not in the pruning plan", node)
        todo = {"split": pe.split is not None, "slice": bool(pe.slice_bounds), "reshape": pe.shape is not None,
                "shape_literal": pe.kind == "shape_literal" and bool(pe.literals or pe.slices),
                "const": pe.kind == "const" and bool(pe.slices or pe.literals),
                "sliced": bool(pe.slices or pe.attrs)}[kind]
        if not todo:
            return m.fail(f"the pruning plan has no {kind} edit for {node.op_type} node {node.name!r}", node)
        return None
    check.__name__ = f"check_{kind}"
    return check


def _node(op_type):
    return getattr(op, op_type)(name="node", _variadic=True)


prune_batchnorm = Rule("prune_batchnorm", _node("BatchNormalization"), _all_sliced, check=_check_kind("sliced"))
prune_instancenorm = Rule("prune_instancenorm", _node("InstanceNormalization"), _all_sliced,
                          check=_check_kind("sliced"))
prune_layernorm = Rule("prune_layernorm", _node("LayerNormalization"), _all_sliced, check=_check_kind("sliced"))
prune_embedding = Rule("prune_embedding", _node("Gather"), _all_sliced, check=_check_kind("sliced"))
prune_conv_transpose = Rule("prune_conv_transpose", _node("ConvTranspose"), _all_sliced, check=_check_kind("sliced"))


# ---------------------------------------------------------------- Split / Slice / Reshape
def split_replacement(op, m):
    """Split with sizes counting the kept channels of each part."""
    node = m.node
    pe = _edit(m, node)
    attrs = {k: v for k, v in node.attrs.items() if k != "num_outputs"}
    sizes = np.array(pe.split, dtype=np.int64)
    if m.opset >= 13:
        ins = [node.inputs[0], op.const(sizes, name=f"{node.name}_split")]
    else:
        ins, attrs["split"] = [node.inputs[0]], sizes.tolist()
    builder = op
    return builder.Split(*ins, _outputs=len(node.outputs), _name=node.name or "Split", **attrs)


def slice_replacement(op, m):
    """Slice with its channel-axis bounds moved to the kept positions."""
    node = m.node
    pe = _edit(m, node)
    if m.opset < 10:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        for k, (s, e, _) in pe.slice_bounds.items():
            starts[k], ends[k] = s, e
        return _rebuild(op, node, [node.inputs[0]], {"starts": starts, "ends": ends})
    starts = np.array(node.inputs[1].constant(), dtype=np.int64).copy()
    ends = np.array(node.inputs[2].constant(), dtype=np.int64).copy()
    for k, (s, e, _) in pe.slice_bounds.items():
        starts.flat[k], ends.flat[k] = s, e
    dtype = node.inputs[1].constant().dtype
    ins = [node.inputs[0], op.const(starts.astype(dtype), name=f"{node.name}_starts"),
           op.const(ends.astype(node.inputs[2].constant().dtype), name=f"{node.name}_ends"), *node.inputs[3:]]
    return _rebuild(op, node, ins)


def reshape_replacement(op, m):
    """Reshape whose constant target names the kept channel counts."""
    node = m.node
    pe = _edit(m, node)
    return _rebuild(op, node, [node.inputs[0], op.const(pe.shape, name=f"{node.name}_shape")])


prune_split = Rule("prune_split", _node("Split"), split_replacement, check=_check_kind("split"))
prune_slice = Rule("prune_slice", _node("Slice"), slice_replacement, check=_check_kind("slice"))
prune_reshape = Rule("prune_reshape", _node("Reshape"), reshape_replacement, check=_check_kind("reshape"))
prune_shape_literal = Rule("prune_shape_literal", _node("Concat"), _all_sliced, check=_check_kind("shape_literal"))
# the one rule tried at every op type: constant operands of any node (Add, Mul, PRelu, Expand, Where, ...)
prune_constant_operand = Rule("prune_constant_operand", op.any_op(name="node"), _all_sliced,
                              check=_check_kind("const"))

RULES = [prune_conv, prune_conv_transpose, prune_gemm, prune_matmul, prune_batchnorm, prune_instancenorm, prune_layernorm, prune_embedding,
         prune_split, prune_slice, prune_reshape, prune_shape_literal, prune_constant_operand]
