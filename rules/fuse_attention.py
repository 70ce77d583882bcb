"""Fuse multi-head attention into onnxruntime's ``com.microsoft`` MultiHeadAttention / Attention.

Scaled dot-product attention over ``N`` heads of size ``H`` (Vaswani et al. 2017, "Attention Is
All You Need", §3.2.1–3.2.2) on query ``q`` (B, S, N·H), key ``k`` (B, T, N·H) and value ``v``
(B, T, N·Hv), as exporters write it::

    Qh = Transpose(Reshape(q, [B, S, N, H]), perm=[0, 2, 1, 3])          (B, N, S, H)
    Kt = Transpose(Reshape(k, [B, T, N, H]), perm=[0, 2, 3, 1])          (B, N, H, T)
    Vh = Transpose(Reshape(v, [B, T, N, Hv]), perm=[0, 2, 1, 3])         (B, N, T, Hv)
    P  = Softmax(scale · (Qh @ Kt) + mask, axis=-1)                       (B, N, S, T)
    y  = Reshape(Transpose(P @ Vh, perm=[0, 2, 1, 3]), [B, S, N·Hv])      (B, S, N·Hv)

which is onnxruntime's ``com.microsoft.MultiHeadAttention(q, k, v, attention_bias=mask,
num_heads=N, scale=scale)`` (onnxruntime docs/ContribOperators.md, MultiHeadAttention, version
1: ``attention_bias`` (B or 1, N or 1, S, T) is added to the scaled scores before Softmax).

Rule ``fuse_attention`` matches the merge of the heads, ``Reshape(Transpose(context))``, and
reads the rest of the block from the graph (:func:`read_block`: one pattern per combination of
the variants below would be dozens of rules), accepting what the exporters write:

- the scale as ``Mul`` or ``Div`` by a scalar after ``Qh @ Kt``, as ``Mul`` by a scalar on
  ``Qh`` and/or on ``Kt`` (``scaled_dot_product_attention`` exported by TorchScript multiplies
  each by ``sqrt(scale)``), several of these, or none (scale 1); the fused ``scale`` is their
  product;
- an additive mask ``Add(scores, mask)`` of any rank <= 4 that broadcasts to (B, N, S, T)
  (padding, causal or both), or none; an all-zero constant mask is no mask;
- Softmax over the last axis, optionally between ``Cast`` nodes (fp16 models computing
  Softmax in fp32), optionally followed by the NaN guard ``Where(IsNaN(P), 0, P)``;
- K transposed as ``perm=[0, 2, 3, 1]`` (after :data:`collapse_transpose_via_reshape` and
  the cleanup rules have rewritten the dynamo exporter's
  ``Reshape(Transpose(Reshape(Kh, [-1, T, H]), [0, 2, 1]), [B, N, H, T])``);
- a Reshape of the context to its own shape (TorchScript's sdpa export).

Every node read this way must be private to the block (read only by it, or by shape arithmetic
that computes the block's own Reshape targets); otherwise the rule refuses, naming the reader.

Facts come from the graph, never from a model type or a head count given by hand
(:mod:`graft.rules.fuse_facts`): ``H`` is the last entry of the split-heads Reshape's target;
``N = D / H`` with ``D`` q's width (its static last dim, or the Q projection weight's column
count). Every Reshape of the block (head split of Q, K, V, the head merge) must provably do
what attention needs: :class:`Roles` names each dim of the block's tensors (B, S, T, N, H, Hv)
and proves each target entry is the right one — a literal equal to the role's static size, or a
``Gather(Shape(u), i)`` whose dim is known (the same value, a value the projection carries the
leading axes of, or the same symbolic dim from shape inference) — with at most one ``-1``. K's
and V's batch must be provably Q's (MultiHeadAttention does not broadcast the batch); K and V
may come from another sequence (cross-attention) of any length T.

Masks: ``attention_bias`` must be 4-D with its last two dims exactly (S, T); a mask that is
not provably so is passed through ``Expand(mask, [1, 1, S, T])``, which performs the same
ONNX broadcasting the ``Add`` did. A mask of rank > 4 (it would broadcast the scores to a
higher rank), of another dtype than the scores, or of unknown rank is refused.

Differences from the unfused block: the NaN guard zeroes the probabilities of a query row
whose every key is masked with -inf; onnxruntime's kernel gives NaN for such a row instead
(only an all-padding sequence has one). Otherwise outputs agree to float rounding.

Packing (onnxruntime's ``Attention`` does the three projections as one GEMM):

- ``fold_query_scale_into_mha``: ``MHA(Mul(q, c), k, v, scale=s) = MHA(q, k, v, scale=s·c)``
  for a scalar ``c`` (MHA scales ``q·k``, which is linear in q), when MHA has no Q bias.
- ``move_projection_bias_into_mha`` (one rule per input): ``MHA(Add(t, b), ...)`` moves the 1-D
  constant ``b`` into MHA's packed ``bias`` input (Q, K, V slices; ORT adds it before the
  head split, the same sum).
- ``pack_qkv_into_attention``: ``MHA(x@Wq, x@Wk, x@Wv, bias) = Attention(x, [Wq|Wk|Wv], bias)``
  when Q, K and V project the same ``x`` (self-attention); ``qkv_hidden_sizes`` when the
  widths differ. Cross-attention (K/V from another input) stays MultiHeadAttention.

Sources: onnxruntime docs/ContribOperators.md (com.microsoft.MultiHeadAttention and
Attention, version 1); ONNX operators Reshape-14 (``0`` copies, ``-1`` infers, ``allowzero``),
Transpose-13, MatMul-13, Softmax-13, Expand-13; docs/Broadcasting.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.compiler.engine import Const, Rule, Var, op
from graft.ir import Node, Value
from graft.ir.dtypes import DataType
from graft.rules.fuse_facts import Dim, all_zero, carriers, rank, same_dim, scalar, shape_tokens, static_dim

MS = "com.microsoft"
_FLOATS = (DataType.FLOAT, DataType.FLOAT16)

context, out_shape = Var("context"), Var("out_shape")
# the merge of the heads; the rest of the block is read from the graph by read_block (its variants —
# scale placement, mask, NaN guard, Cast — would otherwise need one pattern per combination)
attention_pattern = op.Reshape(op.Transpose(context, name="merge", perm=[0, 2, 1, 3]), out_shape,
                               name="merge_reshape")


def _scoped(node: Node, op_type: str) -> str:
    """``/enc/layer.0/attention/self/Attention`` for a node named ``/enc/layer.0/attention/self/Reshape_3``."""
    scope = node.name.rsplit("/", 1)[0] if node.name and "/" in node.name else ""
    return f"{scope}/{op_type}" if scope else op_type


def _desc(node: Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} (output {node.outputs[0].name!r})"


def _is(node: Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


class _Refused(Exception):
    """Raised inside the analysis; carries the reason and the node it concerns."""

    def __init__(self, reason: str, node: Node):
        super().__init__(reason)
        self.reason, self.node = reason, node


@dataclass
class Block:
    """One attention block as read from the graph: the fused op's inputs and attributes."""

    q: Value
    k: Value
    v: Value
    num_heads: int
    scale: float
    mask: Value | None
    expand_mask: bool


# --------------------------------------------------------------------------- reading the block
def _width(x: Value) -> int | None:
    """Last dim of ``x``: static shape, else the column count of the weight of ``[Add](MatMul(., W))``."""
    d = static_dim(x, -1)
    if d is not None:
        return d
    p = x.producer
    for _ in range(3):
        if p is None:
            return None
        if _is(p, "MatMul"):
            w = p.inputs[1].constant()
            return int(w.shape[-1]) if w is not None and w.ndim == 2 else None
        if _is(p, "Add") or _is(p, "Mul"):
            nxt = [i for i in p.inputs if i is not None and i.constant() is None]
            p = nxt[0].producer if len(nxt) == 1 else None
            continue
        return None
    return None


class Roles:
    """What each dim of the block's tensors is: B (batch), S (query length), T (key length), N (heads),
    H (head size), Hv (value head size), D / Dk / Dv (widths).

    A Reshape target entry is proven to be a role when it is a literal equal to the role's static
    size, or a :class:`Dim` of a tensor whose dims are known roles (directly, through the
    projection's leading axes, or by the same symbolic dim from shape inference).
    """

    NAMES = {"B": "the batch dim", "S": "the query length", "T": "the key length", "N": "the head count",
             "H": "the head size", "Hv": "the value head size", "D": "the query width", "Dk": "the key width",
             "Dv": "the value width"}

    def __init__(self):
        self.facts: dict[Value, tuple] = {}
        self.sizes: dict[str, int | None] = {}

    def know(self, value: Value, roles: tuple) -> None:
        self.facts[value] = roles
        shape = value.shape
        if shape is not None and len(shape) == len(roles):
            for r, d in zip(roles, shape):
                if isinstance(d, int) and self.sizes.get(r) is None:
                    self.sizes[r] = d

    def of(self, token) -> set:
        """The roles ``token`` is proven to be."""
        if isinstance(token, int):
            return {r for r, size in self.sizes.items() if size is not None and size == token}
        if not isinstance(token, Dim):
            return set()
        u, i = token.value, token.axis
        out = set()
        roles = self.facts.get(u)
        if roles is not None and -len(roles) <= i < len(roles):
            out.add(roles[i])
        d = static_dim(u, i)
        if d is not None:
            out |= self.of(d)
        if i in (0, 1):  # the projection keeps the leading axes of its input
            for x, roles in self.facts.items():
                if len(roles) == 3 and (u in carriers(x) or x in carriers(u)):
                    out.add(roles[i])
        sym = u.shape[i] if u.shape is not None and -len(u.shape) <= i < len(u.shape) else None
        if isinstance(sym, str):
            for x, roles in self.facts.items():
                if x.shape is not None and len(x.shape) == len(roles):
                    out.update(r for r, d in zip(roles, x.shape) if d == sym)
        return out

    def check_target(self, reshape: Node, want: tuple, label: str) -> None:
        """Raise _Refused unless ``reshape``'s target is provably ``want`` (roles) for its input."""
        tokens = shape_tokens(reshape.inputs[1])
        if tokens is None:
            raise _Refused(f"cannot read the target shape of {label} {_desc(reshape)} (built by ops the "
                           f"fusion does not follow)", reshape)
        if len(tokens) != len(want):
            raise _Refused(f"{label} {_desc(reshape)} reshapes to rank {len(tokens)}, expected "
                           f"({', '.join(want)})", reshape)
        src = self.facts.get(reshape.inputs[0])
        copies = not reshape.attrs.get("allowzero", 0)
        wild = 0
        for i, (t, w) in enumerate(zip(tokens, want)):
            if t == -1:
                wild += 1
                continue
            if t == 0 and copies:
                ok = src is not None and i < len(src) and src[i] == w
            else:
                ok = w in self.of(t)
            if not ok:
                raise _Refused(f"{label} {_desc(reshape)}: target entry {i} is {t!r}, cannot prove it is "
                               f"{self.NAMES.get(w, w)} (target {tokens}, expected ({', '.join(want)}))", reshape)
        if wild > 1:
            raise _Refused(f"{label} {_desc(reshape)} has {wild} -1 entries", reshape)


def _heads(reshape: Node, x: Value, label: str, head: int | None = None) -> tuple[int, int]:
    """(N, H) from ``Reshape(x, [.., .., N, H])`` splitting x (B, S, D); raises _Refused."""
    tokens = shape_tokens(reshape.inputs[1])
    if tokens is None:
        raise _Refused(f"cannot read the target shape of {label} split {_desc(reshape)} (built by ops the "
                       f"fusion does not follow)", reshape)
    if len(tokens) != 4:
        raise _Refused(f"{label} split {_desc(reshape)} reshapes to rank {len(tokens)}, not (B, S, heads, "
                       f"head_size)", reshape)
    if rank(x) != 3:
        r = rank(x)
        raise _Refused(f"{label} input {x.name!r} of {_desc(reshape)} has "
                       f"{'unknown rank (run shape inference first)' if r is None else f'rank {r}'}; "
                       f"attention fusion needs (B, S, D)", reshape)
    h = tokens[3] if head is None or tokens[3] != -1 else head
    if not isinstance(h, int) or h <= 0:
        raise _Refused(f"{label} split {_desc(reshape)}: head size {tokens[3]!r} is not a positive constant "
                       f"(target {tokens})", reshape)
    if head is not None and h != head:
        raise _Refused(f"{label} head size {h} differs from Q's {head} ({_desc(reshape)})", reshape)
    d = _width(x)
    if d is None:
        raise _Refused(f"width of {label} {x.name!r} is unknown (no static last dim, no constant projection "
                       f"weight)", reshape)
    if d % h:
        raise _Refused(f"{label} head size {h} does not divide its width {d} ({_desc(reshape)} target "
                       f"{tokens})", reshape)
    return d // h, h


def _scalar_factor(node: Node | None, walked: list) -> tuple[Value, float] | None:
    """(the other input, factor) for Mul / Div of a tensor by a one-element constant, else None."""
    if node is None or not (_is(node, "Mul") or _is(node, "Div")) or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    orders = ((a, b), (b, a)) if node.op_type == "Mul" else ((a, b),)
    for t, c in orders:
        f = scalar(c, max_rank=4)
        if f is not None and t.constant() is None:
            if node.op_type == "Div":
                if f == 0:
                    return None
                f = 1.0 / f
            walked.append(node)
            return t, f
    return None


def _heads_input(x: Value, perm: list[int], label: str, walked: list, scale: list) -> tuple[Node, Node]:
    """Follow optional scalar Muls, then Transpose(perm), then the split-heads Reshape."""
    node = x.producer
    while _is(node, "Mul"):
        got = _scalar_factor(node, walked)
        if got is None:
            break
        scale.append(got[1])
        node = got[0].producer
    if not _is(node, "Transpose"):
        raise _Refused(f"{label} of the scores MatMul comes from {_desc(node) if node else 'a graph input'}, "
                       f"not Transpose(Reshape(..))", node or x.producer)
    if [int(i) for i in node.attrs.get("perm", [])] != perm:
        raise _Refused(f"{label} {_desc(node)} has perm {node.attrs.get('perm')}, attention needs {perm}", node)
    walked.append(node)
    r = node.inputs[0].producer
    if not _is(r, "Reshape"):
        raise _Refused(f"{label} {_desc(node)} transposes {_desc(r) if r else repr(node.inputs[0].name)}, not a "
                       f"Reshape that splits heads", node)
    walked.append(r)
    return node, r


def _probabilities(p_val: Value, context_node: Node, opset: int, walked: list) -> Node:
    """The Softmax behind the probabilities: through an optional NaN guard and Cast."""
    node = p_val.producer
    if _is(node, "Where") and len(node.inputs) == 3:
        cond = node.inputs[0].producer
        if _is(cond, "IsNaN") and cond.inputs[0] is node.inputs[2] and all_zero(node.inputs[1]):
            walked += [node, cond]
            node = node.inputs[2].producer
    if _is(node, "Cast"):
        walked.append(node)
        node = node.inputs[0].producer
    if not _is(node, "Softmax"):
        raise _Refused(f"attention probabilities come from {_desc(node) if node else 'a graph input'}, "
                       f"not Softmax", node or context_node)
    r = rank(node.inputs[0]) or 4
    axis = node.attrs.get("axis", -1 if opset >= 13 else 1)
    if axis not in (-1, r - 1):
        raise _Refused(f"{_desc(node)} normalizes axis {axis}, attention needs the last axis", node)
    walked.append(node)
    return node


def _reaches_matmul(value: Value) -> bool:
    n = value.producer
    for _ in range(4):
        if _is(n, "MatMul"):
            return True
        got = _scalar_factor(n, [])
        if got is None:
            return False
        n = got[0].producer
    return False


def read_block(m) -> Block:
    """The attention block around the match; raises _Refused with the reason and node."""
    walked: list[Node] = []
    factors: list[float] = []
    ctx = m[context]
    node = ctx.producer
    ctx_reshape = None
    if _is(node, "Reshape"):  # TorchScript's sdpa export views (B, N, S, Hv) as itself once more
        ctx_reshape = node
        walked.append(node)
        ctx = node.inputs[0]
        node = ctx.producer
    if not _is(node, "MatMul"):
        raise _Refused(f"the heads merged by {_desc(m.merge)} come from {_desc(node) if node else 'a graph input'}, "
                       f"not MatMul(probabilities, V)", node or m.merge)
    pv = node
    walked.append(pv)
    vt = pv.inputs[1].producer
    if not _is(vt, "Transpose") or [int(i) for i in vt.attrs.get("perm", [])] != [0, 2, 1, 3]:
        raise _Refused(f"V of {_desc(pv)} is not Transpose(Reshape(v), perm=[0, 2, 1, 3])", vt or pv)
    v_reshape = vt.inputs[0].producer
    if not _is(v_reshape, "Reshape"):
        raise _Refused(f"V of {_desc(pv)} is not a split-heads Reshape", vt)
    walked += [vt, v_reshape]
    softmax = _probabilities(pv.inputs[0], pv, m.opset, walked)
    scores = softmax.inputs[0]
    node = scores.producer
    if _is(node, "Cast"):
        walked.append(node)
        scores = node.inputs[0]
        node = scores.producer
    mask, add = None, None
    if _is(node, "Add"):
        add = node
        a, b = add.inputs
        pick = next(((s, o) for s, o in ((a, b), (b, a)) if _reaches_matmul(s)), None)
        if pick is None:
            raise _Refused(f"{_desc(add)} before {_desc(softmax)}: neither input comes from the Q·K MatMul", add)
        walked.append(add)
        scores, mask = pick
        node = scores.producer
    while _is(node, "Mul") or _is(node, "Div"):
        got = _scalar_factor(node, walked)
        if got is None:
            raise _Refused(f"{_desc(node)} scales the attention scores by a non-scalar or non-constant value", node)
        factors.append(got[1])
        node = got[0].producer
    if not _is(node, "MatMul"):
        raise _Refused(f"attention scores come from {_desc(node) if node else 'a graph input'}, not "
                       f"MatMul(Q, K^T)", node or softmax)
    qk = node
    walked.append(qk)
    q_t, q_reshape = _heads_input(qk.inputs[0], [0, 2, 1, 3], "Q", walked, factors)
    k_t, k_reshape = _heads_input(qk.inputs[1], [0, 2, 3, 1], "K^T", walked, factors)
    qv, kv, vv = q_reshape.inputs[0], k_reshape.inputs[0], v_reshape.inputs[0]
    n, h = _heads(q_reshape, qv, "Q")
    nk, _ = _heads(k_reshape, kv, "K", head=h)
    nv, hv = _heads(v_reshape, vv, "V")
    if nk != n or nv != n:
        raise _Refused(f"Q has {n} heads but K has {nk} and V {nv} (widths {_width(qv)}, {_width(kv)}, "
                       f"{_width(vv)})", k_reshape if nk != n else v_reshape)
    for x, label, where in ((qv, "Q", q_reshape), (kv, "K", k_reshape), (vv, "V", v_reshape)):
        if x.dtype is not None and x.dtype not in _FLOATS:
            raise _Refused(f"{label} {x.name!r} is {x.dtype.name}; MultiHeadAttention takes float32 or float16",
                           where)
    roles = Roles()
    roles.sizes.update({"N": n, "H": h, "Hv": hv, "D": n * h, "Dv": n * hv})
    roles.know(qv, ("B", "S", "D"))
    roles.check_target(q_reshape, ("B", "S", "N", "H"), "Q split")
    for x, label, where in ((kv, "K", k_reshape), (vv, "V", v_reshape)):
        if "B" not in roles.of(Dim(x, 0)):
            raise _Refused(f"cannot prove {label} {x.name!r} has Q's batch dim (shapes {x.shape} and {qv.shape}); "
                           f"MultiHeadAttention does not broadcast the batch", where)
    roles.know(kv, ("B", "T", "D"))
    roles.know(vv, ("B", "T", "Dv"))
    roles.check_target(k_reshape, ("B", "T", "N", "H"), "K split")
    roles.check_target(v_reshape, ("B", "T", "N", "Hv"), "V split")
    for val, r in ((q_t.outputs[0], ("B", "N", "S", "H")), (k_t.outputs[0], ("B", "N", "H", "T")),
                   (vt.outputs[0], ("B", "N", "T", "Hv")), (qk.outputs[0], ("B", "N", "S", "T")),
                   (ctx, ("B", "N", "S", "Hv"))):
        roles.know(val, r)
    if ctx_reshape is not None:
        roles.check_target(ctx_reshape, ("B", "N", "S", "Hv"), "context view")
        roles.know(ctx_reshape.outputs[0], ("B", "N", "S", "Hv"))
    roles.know(m.merge.outputs[0], ("B", "S", "N", "Hv"))
    roles.check_target(m.merge_reshape, ("B", "S", "Dv"), "head merge")
    scale = float(np.prod(factors)) if factors else 1.0
    if not np.isfinite(scale) or scale == 0:
        raise _Refused(f"the scores' scale factors multiply to {scale}", qk)
    expand = False
    if mask is not None:
        mask, expand = _check_mask(mask, qv, roles, add)
    _check_private(m, walked)
    return Block(qv, kv, vv, n, scale, mask, expand)


def _check_mask(mask: Value, qv: Value, roles: Roles, add: Node) -> tuple[Value | None, bool]:
    """(the mask to pass as attention_bias or None, whether it needs an Expand to (.., S, T))."""
    r = rank(mask)
    if all_zero(mask) and r <= 4:
        return None, False
    if r is None:
        raise _Refused(f"mask {mask.name!r} added at {_desc(add)} has unknown rank (run shape inference "
                       f"first)", add)
    if r > 4:
        raise _Refused(f"mask {mask.name!r} added at {_desc(add)} has rank {r} > 4: it broadcasts the "
                       f"(B, heads, S, T) scores to a higher rank, which attention_bias cannot", add)
    if mask.dtype is not None and qv.dtype is not None and mask.dtype != qv.dtype:
        raise _Refused(f"mask {mask.name!r} added at {_desc(add)} is {mask.dtype.name} but the scores are "
                       f"{qv.dtype.name}", add)
    n = roles.sizes["N"]
    dims = (None,) * (4 - r) + tuple(static_dim(mask, i) for i in range(r))
    if dims[1] is not None and dims[1] not in (1, n):
        raise _Refused(f"mask {mask.name!r} at {_desc(add)}: the dim aligned with the heads is {dims[1]}, which "
                       f"broadcasts neither as 1 nor as the {n} heads", add)
    b = roles.sizes.get("B")
    if dims[0] is not None and dims[0] != 1 and b is not None and dims[0] != b:
        raise _Refused(f"mask {mask.name!r} at {_desc(add)}: batch dim {dims[0]} is neither 1 nor {b}", add)
    exact = r == 4 and "S" in roles.of(Dim(mask, 2)) and "T" in roles.of(Dim(mask, 3))
    return mask, not exact


_SHAPE_OPS = frozenset({"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast"})


def _only_shapes_for(node: Node, inside: set, budget: list) -> bool:
    """True when ``node`` is shape arithmetic whose results are read only by ``inside`` (directly or
    through more shape arithmetic): it dies with the block, so it does not keep a tensor alive."""
    if budget[0] <= 0 or node.domain not in ("", "ai.onnx") or node.op_type not in _SHAPE_OPS:
        return False
    budget[0] -= 1
    for o in node.outputs:
        if o.is_graph_output():
            return False
        for u in o.users():
            if u not in inside and not _only_shapes_for(u, inside, budget):
                return False
    return True


def _check_private(m, walked: list) -> None:
    """Every walked node's outputs are read only inside the block (the engine checks matched ones);
    shape arithmetic that only computes the block's own Reshape targets counts as inside."""
    inside = set(walked) | set(m.nodes)
    for node in walked:
        for o in node.outputs:
            if o.is_graph_output():
                raise _Refused(f"output {o.name!r} of {_desc(node)} is a graph output (e.g. attention "
                               f"probabilities returned to the caller)", node)
            for u in o.users():
                if u not in inside and not _only_shapes_for(u, inside, [32]):
                    raise _Refused(f"output {o.name!r} of {_desc(node)} is also read by {_desc(u)} outside the "
                                   f"attention block", node)


def attention_check(m):
    try:
        read_block(m)
    except _Refused as e:
        return m.fail(e.reason, e.node)
    return None


def _mask_input(op, blk: Block):
    """The mask as attention_bias: Expand(mask, [1, 1, S, T]) unless it is provably (.., .., S, T).

    S and T are read from the projections' inputs (whose leading dims the projections keep),
    so later rewrites of q/k (bias moved into the fused op) leave these Shape ops alone.
    """
    if blk.mask is None or not blk.expand_mask:
        return blk.mask
    one, two = np.array([1], np.int64), np.array([2], np.int64)
    s = op.Slice(op.Shape(carriers(blk.q)[-1]), one, two)
    t = op.Slice(op.Shape(carriers(blk.k)[-1]), one, two)
    return op.Expand(blk.mask, op.Concat(np.array([1, 1], np.int64), s, t, axis=0))


def attention_replacement(op, m):
    """Softmax(scale·QK^T + mask)·V over split heads -> com.microsoft MultiHeadAttention."""
    blk = read_block(m)
    return op.domain(MS).MultiHeadAttention(blk.q, blk.k, blk.v, None, None, _mask_input(op, blk),
                                            num_heads=blk.num_heads, scale=float(blk.scale),
                                            _name=_scoped(m.merge_reshape, "MultiHeadAttention"))


fuse_attention = Rule("fuse_attention", attention_pattern, attention_replacement, check=attention_check)


# --------------------------------------------------------------------------- K transposed through a 3-D view
t4, s_flat, s_back = Var("t"), Var("s_flat"), Var("s_back")
transpose_view_pattern = op.Reshape(op.Transpose(op.Reshape(t4, s_flat, name="flatten"), name="swap", perm=[0, 2, 1]),
                                    s_back, name="unflatten")


def _transpose_view_check(m):
    t = m[t4]
    if rank(t) != 4:
        return m.fail(f"{m[t4].name!r} has {'unknown rank' if rank(t) is None else f'rank {rank(t)}'}; the "
                      f"view-transpose rewrite needs a 4-D tensor", m.flatten)
    a, b = shape_tokens(m[s_flat]), shape_tokens(m[s_back])
    if a is None or b is None:
        return m.fail("cannot read the Reshape targets", m.flatten if a is None else m.unflatten)

    def is_dim(tok, axis, node):
        if tok == 0 and not node.attrs.get("allowzero", 0) and axis < 3:
            return False
        return same_dim(tok, t, axis)

    if len(a) != 3 or a[0] != -1 or not is_dim(a[1], 2, m.flatten) or not is_dim(a[2], 3, m.flatten):
        return m.fail(f"{_desc(m.flatten)} target {a} is not [-1, dim 2, dim 3] of {t.name!r}", m.flatten)
    want = (0, 1, 3, 2)
    wild = sum(1 for x in b if x == -1)
    if len(b) != 4 or wild > 1 or not all(x == -1 or is_dim(x, w, m.unflatten) for x, w in zip(b, want)):
        return m.fail(f"{_desc(m.unflatten)} target {b} is not [dim 0, dim 1, dim 3, dim 2] of {t.name!r}",
                      m.unflatten)
    return None


def _transpose_view_replacement(op, m):
    """Reshape(Transpose(Reshape(t, [-1, c, d]), [0, 2, 1]), [a, b, d, c]) -> Transpose(t, [0, 1, 3, 2])."""
    return op.Transpose(m[t4], perm=[0, 1, 3, 2])


collapse_transpose_via_reshape = Rule("collapse_transpose_via_reshape", transpose_view_pattern,
                                      _transpose_view_replacement, check=_transpose_view_check)


# --------------------------------------------------------------------------- packing MHA into Attention
ms_op = op.domain(MS)
query, key, value, x_in = Var("query"), Var("key"), Var("value"), Var("x")
q_factor = Const("c", where=lambda a: a.size == 1)
proj_bias = Const("b")
wq, wk, wv = Const("wq"), Const("wk"), Const("wv")
mha_bias, kpm, attn_bias = Var("bias"), Var("key_padding_mask"), Var("attention_bias")

scale_pattern = ms_op.MultiHeadAttention(op.Mul(query, q_factor, name="q_scale"), key, value, _variadic=True,
                                         name="mha")


def _mha_rest(node: Node) -> list:
    return list(node.inputs[3:])


def _widths(node: Node) -> list[int] | None:
    ws = [_width(x) if x is not None else None for x in node.inputs[:3]]
    return None if any(w is None for w in ws) else ws


def _scale_check(m):
    mha = m.mha
    if mha.attrs.get("unidirectional", 0):
        return m.fail(f"{_desc(mha)} is unidirectional", mha)
    if (mha.attrs.get("scale") or 0.0) == 0.0:
        return m.fail(f"{_desc(mha)} uses the default scale 1/sqrt(head_size); graft-fused nodes set it "
                      f"explicitly", mha)
    c = float(m[q_factor].reshape(()))
    if not np.isfinite(c) or c == 0:
        return m.fail(f"scale factor {c} on the query", m.q_scale)
    if rank(m.value(q_factor)) > (rank(m[query]) or 0):
        return m.fail("the scalar's rank exceeds the query's: the Mul broadcasts", m.q_scale)
    bias = mha.inputs[3] if len(mha.inputs) > 3 else None
    if bias is not None:
        arr = bias.constant()
        w = _width(m[query])
        if arr is None or w is None or np.any(arr.reshape(-1)[:w]):
            return m.fail(f"{_desc(mha)} adds a Q bias after the scale; the factor cannot move into the scale",
                          mha)
    return None


def _scale_replacement(op, m):
    """MHA(Mul(q, c), k, v, scale=s) -> MHA(q, k, v, scale=s*c)."""
    mha = m.mha
    attrs = dict(mha.attrs)
    attrs["scale"] = float(attrs["scale"]) * float(m[q_factor].reshape(()))
    return op.domain(MS).MultiHeadAttention(m[query], m[key], m[value], *_mha_rest(mha),
                                            _name=_scoped(mha, "MultiHeadAttention"), **attrs)


fold_query_scale_into_mha = Rule("fold_query_scale_into_mha", scale_pattern, _scale_replacement, check=_scale_check)


def _bias_rule(slot: int) -> Rule:
    label = "QKV"[slot]
    t = Var("t")
    args = [query, key, value]
    args[slot] = op.Add(t, proj_bias, name="add")
    pattern = ms_op.MultiHeadAttention(*args, _variadic=True, name="mha")

    def check(m):
        mha = m.mha
        b = m[proj_bias]
        ws = _widths(mha)
        if ws is None:
            return m.fail(f"widths of {_desc(mha)}'s query/key/value are not all known", mha)
        if b.ndim != 1 or b.shape[0] != ws[slot]:
            return m.fail(f"{label} bias of shape {list(b.shape)} is not a [{ws[slot]}] vector", m.add)
        if m[t].dtype is not None and DataType.from_numpy(b.dtype) != m[t].dtype:
            return m.fail(f"{label} bias is {b.dtype}, the projection {m[t].dtype.name}", m.add)
        if rank(m[t]) != 3:
            return m.fail(f"{label} projection {m[t].name!r} is not known to be 3-D", m.add)
        old = mha.inputs[3] if len(mha.inputs) > 3 else None
        if old is not None and old.constant() is None:
            return m.fail(f"{_desc(mha)} has a bias that is not a constant", mha)
        return None

    def replacement(op, m):
        mha = m.mha
        ws = _widths(mha)
        old = mha.inputs[3] if len(mha.inputs) > 3 else None
        b = m[proj_bias]
        new = np.zeros(sum(ws), b.dtype) if old is None else np.array(old.constant(), dtype=b.dtype)
        start = sum(ws[:slot])
        new[start:start + ws[slot]] += b
        ins = list(mha.inputs) + [None] * max(0, 4 - len(mha.inputs))
        ins[slot] = m[t]
        ins[3] = op.const(new, name=f"{mha.name or 'mha'}_qkv_bias")
        return op.domain(MS).MultiHeadAttention(*ins, _name=_scoped(mha, "MultiHeadAttention"), **mha.attrs)

    replacement.__doc__ = f"MHA(.., Add(t, b) as {label}, ..) -> MHA(.., t, .., bias with b in the {label} slice)."
    return Rule(f"move_{label.lower()}_bias_into_mha", pattern, replacement, check=check)


move_q_bias_into_mha, move_k_bias_into_mha, move_v_bias_into_mha = (_bias_rule(i) for i in range(3))

pack_pattern = ms_op.MultiHeadAttention(op.MatMul(x_in, wq, name="q_proj"), op.MatMul(x_in, wk, name="k_proj"),
                                        op.MatMul(x_in, wv, name="v_proj"), op.optional(mha_bias), op.optional(kpm),
                                        op.optional(attn_bias), name="mha")


def _pack_check(m):
    ws = [m[wq], m[wk], m[wv]]
    if any(w.ndim != 2 for w in ws):
        return m.fail("a projection weight is not 2-D", m.q_proj)
    if len({w.shape[0] for w in ws}) != 1 or len({w.dtype for w in ws}) != 1:
        return m.fail(f"Q/K/V weights {[list(w.shape) for w in ws]} do not share input width and dtype", m.mha)
    if m.value(kpm) is not None:
        return m.fail(f"{_desc(m.mha)} has a key_padding_mask; Attention's mask_index means something else",
                      m.mha)
    if m.value(mha_bias) is not None and m[mha_bias].constant() is None:
        return m.fail(f"{_desc(m.mha)} has a non-constant bias", m.mha)
    if rank(m[x_in]) != 3:
        return m.fail(f"input {m[x_in].name!r} is not known to be 3-D (B, S, D)", m.q_proj)
    n = m.mha.attrs.get("num_heads", 0)
    if n <= 0 or any(w.shape[1] % n for w in ws):
        return m.fail(f"{_desc(m.mha)}: num_heads {n} does not divide the projection widths", m.mha)
    if m.mha.attrs.get("unidirectional", 0):
        return m.fail(f"{_desc(m.mha)} is unidirectional", m.mha)
    return None


def _pack_replacement(op, m):
    """MHA(x@Wq, x@Wk, x@Wv, bias, -, attention_bias) -> Attention(x, [Wq|Wk|Wv], bias, -, -, attention_bias)."""
    mha = m.mha
    ws = [m[wq], m[wk], m[wv]]
    w = np.concatenate(ws, axis=1)
    widths = [int(x.shape[1]) for x in ws]
    bias = m.value(mha_bias)
    b = np.zeros(sum(widths), w.dtype) if bias is None else np.asarray(bias.constant(), dtype=w.dtype)
    attrs = {"num_heads": int(mha.attrs["num_heads"])}
    if mha.attrs.get("scale"):
        attrs["scale"] = float(mha.attrs["scale"])
    if "mask_filter_value" in mha.attrs:
        attrs["mask_filter_value"] = mha.attrs["mask_filter_value"]
    if len(set(widths)) > 1:
        attrs["qkv_hidden_sizes"] = widths
    name = _scoped(mha, "Attention")
    return op.domain(MS).Attention(m[x_in], op.const(w, name=f"{name}_qkv_weight", copy=False),
                                   op.const(b, name=f"{name}_qkv_bias", copy=False), None, None,
                                   m.value(attn_bias), _name=name, **attrs)


pack_qkv_into_attention = Rule("pack_qkv_into_attention", pack_pattern, _pack_replacement, check=_pack_check)

# in order: normalize K's transpose, fuse, then pack (each pass of the ORT pipeline runs one group)
NORMALIZE_RULES = [collapse_transpose_via_reshape]
FUSE_RULES = [fuse_attention]
PACK_RULES = [fold_query_scale_into_mha, move_q_bias_into_mha, move_k_bias_into_mha, move_v_bias_into_mha,
              pack_qkv_into_attention]
RULES = [*NORMALIZE_RULES, *FUSE_RULES, *PACK_RULES]
