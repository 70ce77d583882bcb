"""Fuse adjacent ops into one: MatMul followed by Add becomes Gemm.

Gemm-13 computes ``Y = alpha * A' @ B' + beta * C`` with A' (M, K), B' (K, N)
and C *unidirectionally* broadcastable to (M, N) (ONNX Broadcasting.md: C's
dims, right-aligned, are each 1 or equal to Y's; C never grows Y). With
``alpha = beta = 1`` and ``transA = transB = 0``::

    Add(MatMul(A, B), C) = Gemm(A, B, C)        (Add is commutative: C + MatMul(A, B) too)

which holds exactly when

- A is 2-D: MatMul-13 on rank > 2 batches and on rank 1 promotes/removes axes,
  neither of which Gemm does. A's rank comes from its value's shape (graph
  input, value_info, or :func:`graft.ir.shapes.infer_shapes`); when it is
  unknown the check refuses rather than guess;
- B is a 2-D constant (K, N);
- C has rank <= 2 and each of its dims is 1 or equal to M (first) / N (last),
  so the Add's output is (M, N) — an Add that broadcasts the MatMul's output
  to a bigger shape is not a Gemm;
- the element type is floating point (float16, float, double; bfloat16 from
  Gemm-13), and the model's opset is >= 7 (Gemm-6 needed ``broadcast=1``).

Sources: ONNX operators MatMul-13, Add-14, Gemm-13, and docs/Broadcasting.md.
"""
from graft.compiler.engine import Const, Rule, Var, op
from graft.ir.dtypes import DataType

a, c = Var("a"), Var("c")
b = Const("b")  # a Const here lets the matcher try Add's other input order when B is not constant

matmul_add_pattern = op.Add(op.MatMul(a, b, name="matmul"), c, name="add")


def _dim_fits(dim, target) -> bool:
    """A dim of C fits output dim ``target`` under unidirectional broadcasting, as far as we can know."""
    if dim == 1:
        return True
    return dim is not None and target is not None and dim == target


def fuse_check(m):
    mm = m.matmul
    a_shape = m.shape(a)
    if a_shape is None:
        return m.fail(f"rank of MatMul {mm.name!r}'s input {m[a].name!r} is unknown; Gemm needs a 2-D A "
                      f"(add value_info or run graft.ir.shapes.infer_shapes(model) first)", mm)
    if len(a_shape) != 2:
        return m.fail(f"MatMul {mm.name!r}'s input {m[a].name!r} has rank {len(a_shape)}; Gemm needs a 2-D A",
                      mm)
    bt = m[b]
    if bt.ndim != 2:
        return m.fail(f"MatMul {mm.name!r}'s constant B has rank {bt.ndim}; Gemm needs a 2-D B", mm)
    dtype = m.dtype(b)
    if dtype is None or not dtype.is_float:
        return m.fail(f"MatMul {mm.name!r} has element type {bt.dtype}; only floating-point MatMul+Add is "
                      f"fused into Gemm", mm)
    if m.opset < 7:
        return m.fail(f"model opset {m.opset} < 7: Gemm broadcasts C only with broadcast=1 there", m.add)
    if dtype == DataType.BFLOAT16 and m.opset < 13:
        return m.fail(f"Gemm accepts bfloat16 only from opset 13 (model opset {m.opset})", mm)
    c_value, c_const = m[c], m.const(c)
    c_shape = c_const.shape if c_const is not None else c_value.shape
    if c_shape is None:
        return m.fail(f"shape of Add {m.add.name!r}'s input {c_value.name!r} is unknown; cannot tell whether "
                      f"it broadcasts to Gemm's (M, N) output", m.add)
    out = (a_shape[0], int(bt.shape[1]))
    if len(c_shape) > 2 or not all(_dim_fits(d, t) for d, t in zip(reversed(c_shape), reversed(out))):
        shown = [d if d is not None else "?" for d in c_shape]
        return m.fail(f"Add {m.add.name!r}'s input {c_value.name!r} of shape {shown} is not unidirectionally "
                      f"broadcastable to the MatMul's output shape {list(out)}", m.add)
    return None


def fuse_replacement(op, m):
    """Add(MatMul(A, B), C) -> Gemm(A, B, C)."""
    return op.Gemm(m[a], m.value(b), m[c], _name=m.matmul.name or m.add.name or "Gemm")


fuse_matmul_add_into_gemm = Rule("fuse_matmul_add_into_gemm", matmul_add_pattern, fuse_replacement,
                                 check=fuse_check)

RULES = [fuse_matmul_add_into_gemm]
