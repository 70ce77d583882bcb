"""Cleanup rules: remove ops that compute their input unchanged, and lift constants.

Each rule is an identity of the ONNX operator semantics (https://onnx.ai/onnx/operators/):

- remove_identity:  Identity(x) = x                                     (Identity-1/13/14/16/19/21)
- remove_dropout:   Dropout(x) = x at inference. Dropout-1/6: when ``is_test`` != 0;
  Dropout-7/10: always (these versions have no training mode in the graph);
  Dropout-12/13/22: when input ``training_mode`` is absent or a constant false,
  or when input ``ratio`` is a constant 0 (scale 1/(1-0) = 1, nothing dropped).
  The ``mask`` output must be unused.
- remove_noop_cast: Cast(x, to=T) = x when x already has element type T  (Cast-1..24);
  CastLike(x, y) = x when x and y have the same element type            (CastLike-15..24).
- remove_noop_reshape: Reshape(x, s) = x when the output shape equals x's shape
  (Reshape-5/13/14/19/21: a 0 in s copies the input dim unless ``allowzero`` = 1,
  one -1 is inferred from the element count); and
  Reshape(Reshape(x, s1), s2) = Reshape(x, s2) when s2 cannot refer to the
  intermediate's dims (no 0 in s2, or ``allowzero`` = 1): the element count is
  unchanged by the first Reshape, so a -1 in s2 resolves the same way.
- remove_noop_transpose: Transpose(x, perm) = x when perm = (0, 1, ..., r-1) (Transpose-1/13/21).
- cancel_transpose_pair: Transpose(Transpose(x, p1), p2) = Transpose(x, q),
  q[i] = p1[p2[i]] (output dim i of the outer is input dim p2[i] of it, which is
  dim p1[p2[i]] of x); when q is the identity the pair is just x.
- constant_to_initializer: a ``Constant`` node (Constant-1..24, any ``value*``
  attribute) becomes an initializer holding the same tensor.

Removing a node whose output is a graph output keeps the output's name (the
rewriter renames the surviving value, or refuses when that value is a graph
input or an initializer).
"""
from __future__ import annotations

from graft.compiler.engine import Rule, Var, op
from graft.ir.shapes import is_static, static_dim

x, like = Var("x"), Var("like")
shape, shape1, shape2 = Var("shape"), Var("shape1"), Var("shape2")
ratio, training_mode = Var("ratio"), Var("training_mode")


# ---------------------------------------------------------------- Identity
def _identity_replacement(op, m):
    """Identity(x) -> x."""
    return m[x]


remove_identity = Rule("remove_identity", op.Identity(x, name="identity"), _identity_replacement)


# ---------------------------------------------------------------- Dropout
dropout_pattern = op.Dropout(x, op.optional(ratio), op.optional(training_mode), name="dropout")


def _dropout_check(m):
    node = m.dropout
    for mask in node.outputs[1:]:
        if mask.is_graph_output() or mask.num_uses:
            return m.fail(f"Dropout's mask output {mask.name!r} is used", node)
    if m.opset <= 6:
        if not node.attrs.get("is_test", 0):
            return m.fail(f"Dropout (opset {m.opset}) has is_test=0: it drops at run time", node)
        return None
    if m.opset <= 11:
        return None
    r = m.const(ratio)
    if r is not None and float(r) == 0.0:
        return None  # ratio 0 is the identity even in training mode
    if m.value(training_mode) is None:
        return None
    bad = m.need_constant(training_mode, why="Dropout may run in training mode")
    if bad is not None:
        return bad
    if bool(m.const(training_mode)):
        return m.fail("Dropout runs in training mode (training_mode is true)", node)
    return None


def _dropout_replacement(op, m):
    """Inference Dropout(x) -> x (the unused mask output goes with the node)."""
    return (m[x], *m.dropout.outputs[1:])


remove_dropout = Rule("remove_dropout", dropout_pattern, _dropout_replacement, check=_dropout_check)


# ---------------------------------------------------------------- Cast
def _cast_check(m):
    have = m.value(x).dtype
    if have is None:
        return m.fail(f"dtype of Cast input {m.value(x).name!r} is unknown (run infer_shapes first)", m.cast)
    if int(have) != int(m.cast.attrs.get("to", 0)):
        return m.fail(f"Cast changes dtype {have.name} to {m.cast.attrs.get('to')}", m.cast)
    return None


def _cast_replacement(op, m):
    """Cast(x, to=dtype(x)) -> x."""
    return m[x]


remove_noop_cast = Rule("remove_noop_cast", op.Cast(x, name="cast"), _cast_replacement, check=_cast_check)


def _castlike_check(m):
    a, b = m.value(x).dtype, m.value(like).dtype
    if a is None or b is None:
        return m.fail("CastLike operand dtypes are unknown (run infer_shapes first)", m.castlike)
    if a != b:
        return m.fail(f"CastLike changes dtype {a.name} to {b.name}", m.castlike)
    return None


def _castlike_replacement(op, m):
    """CastLike(x, y) -> x when dtype(x) == dtype(y)."""
    return m[x]


remove_noop_castlike = Rule("remove_noop_castlike", op.CastLike(x, like, name="castlike"),
                            _castlike_replacement, check=_castlike_check)


# ---------------------------------------------------------------- Reshape
def reshape_is_identity(in_shape, target, allowzero: int) -> bool:
    """Whether Reshape(x, target) returns x unchanged, given x's (possibly symbolic) shape.

    Every dim of ``target`` must be provably equal to x's dim at that position:
    the same static size, or a 0 copying the dim (``allowzero`` = 0). A single -1
    is the identity too when every other dim is proven equal, since the element
    count is preserved.
    """
    if in_shape is None or target is None or len(in_shape) != len(target):
        return False
    minus_one = 0
    for have, want in zip(in_shape, target):
        want = int(want)
        if want == -1:
            minus_one += 1
        elif want == 0 and not allowzero:
            continue
        elif not (static_dim(have) and have == want):
            return False
    return minus_one <= 1


def _reshape_check(m):
    node, data = m.reshape, m.value(x)
    out = node.output
    if is_static(data.shape) and is_static(out.shape):
        if tuple(data.shape) == tuple(out.shape):
            return None
        return m.fail(f"Reshape changes shape {list(data.shape)} to {list(out.shape)}", node)
    target = m.const(shape)
    if target is None:
        return m.fail("Reshape's shape input is not a constant and the shapes are not static", node)
    if reshape_is_identity(data.shape, target.tolist(), node.attrs.get("allowzero", 0)):
        return None
    return m.fail(f"Reshape to {target.tolist()} is not provably the identity on shape "
                  f"{list(data.shape) if data.shape is not None else 'unknown'}", node)


def _reshape_replacement(op, m):
    """Reshape(x, shape(x)) -> x."""
    return m[x]


remove_noop_reshape = Rule("remove_noop_reshape", op.Reshape(x, shape, name="reshape"), _reshape_replacement,
                           check=_reshape_check)

reshape_pair_pattern = op.Reshape(op.Reshape(x, shape1, name="inner"), shape2, name="outer")


def _reshape_pair_check(m):
    if m.outer.attrs.get("allowzero", 0):
        return None
    s2 = m.const(shape2)
    if s2 is None:
        return m.fail("outer Reshape's shape is not a constant, it may copy dims of the inner one (0)", m.outer)
    if (s2 == 0).any():
        return m.fail(f"outer Reshape's shape {s2.tolist()} has a 0, which copies a dim of the inner "
                      f"Reshape's output", m.outer)
    return None


def _reshape_pair_replacement(op, m):
    """Reshape(Reshape(x, s1), s2) -> Reshape(x, s2)."""
    return op.Reshape(m[x], m[shape2], **m.outer.attrs)


collapse_reshape_pair = Rule("collapse_reshape_pair", reshape_pair_pattern, _reshape_pair_replacement,
                             check=_reshape_pair_check)


# ---------------------------------------------------------------- Transpose
def _perm(node, data) -> list[int] | None:
    p = node.attrs.get("perm")
    if p is not None:
        return [int(i) for i in p]
    if data.shape is None:
        return None
    return list(range(len(data.shape)))[::-1]  # the spec's default: reverse the dims


def _noop_transpose_check(m):
    p = _perm(m.transpose, m.value(x))
    if p is None:
        return m.fail("Transpose has no perm and the input rank is unknown", m.transpose)
    if p != list(range(len(p))):
        return m.fail(f"Transpose perm {p} is not the identity", m.transpose)
    return None


def _noop_transpose_replacement(op, m):
    """Transpose(x, perm=identity) -> x."""
    return m[x]


remove_noop_transpose = Rule("remove_noop_transpose", op.Transpose(x, name="transpose"),
                             _noop_transpose_replacement, check=_noop_transpose_check)

transpose_pair_pattern = op.Transpose(op.Transpose(x, name="inner"), name="outer")


def _transpose_pair_check(m):
    p1 = _perm(m.inner, m.value(x))
    if p1 is None:
        return m.fail("inner Transpose has no perm and the input rank is unknown", m.inner)
    p2 = m.outer.attrs.get("perm")
    p2 = list(range(len(p1)))[::-1] if p2 is None else [int(i) for i in p2]
    if len(p1) != len(p2):
        return m.fail(f"Transpose perms {p1} and {p2} have different ranks", m.outer)
    return None


def _transpose_pair_replacement(op, m):
    """Transpose(Transpose(x, p1), p2) -> x or Transpose(x, p1[p2])."""
    p1 = _perm(m.inner, m.value(x))
    p2 = m.outer.attrs.get("perm")
    p2 = list(range(len(p1)))[::-1] if p2 is None else [int(i) for i in p2]
    q = [p1[i] for i in p2]
    if q == list(range(len(q))):
        return m[x]
    return op.Transpose(m[x], perm=q)


cancel_transpose_pair = Rule("cancel_transpose_pair", transpose_pair_pattern, _transpose_pair_replacement,
                             check=_transpose_pair_check)


# ---------------------------------------------------------------- Constant
def _constant_check(m):
    out = m.constant.output
    if out.constant() is None:
        return m.fail("Constant node holds a sparse tensor or no value (kept as a node)", m.constant)
    return None


def _constant_replacement(op, m):
    """Constant(value=t) -> initializer t."""
    node = m.constant
    t = node.attrs.get("value")
    dtype = getattr(t, "dtype", None)
    return op.const(node.output.constant(), dtype=dtype, name=node.output.name)


constant_to_initializer = Rule("constant_to_initializer", op.Constant(name="constant"), _constant_replacement,
                               check=_constant_check)

RULES = [remove_identity, remove_dropout, remove_noop_cast, remove_noop_castlike, remove_noop_reshape,
         collapse_reshape_pair, remove_noop_transpose, cancel_transpose_pair, constant_to_initializer]
