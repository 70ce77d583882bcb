"""graft.ir.shapes.infer_shapes: dtypes and shapes from onnx.shape_inference copied onto the IR."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from graft import ir
from graft.ir import shapes
from graft.ir.shapes import ShapeInferenceWarning, infer_shapes
from conftest import parse_model, with_initializers
from graft.ir.dtypes import DataType

HEADER = '<ir_version: 10, opset_import: ["" : 17{extra}]>\n'


def load(body: str, extra: str = "", check: bool = True, **arrays) -> ir.Model:
    text = HEADER.format(extra=extra) + body
    if arrays:
        proto = with_initializers(onnx.parser.parse_model(text), **arrays)
    else:
        proto = parse_model(text) if check else onnx.parser.parse_model(text)
    return ir.from_onnx(proto)


def values(model: ir.Model) -> dict[str, ir.Value]:
    return {o.name: o for g in model.all_graphs() for n in g for o in n.outputs}


def test_types_every_node_output_and_counts_them():
    model = load("""
        g (float[2, 3] x, float[3, 4] w) => (float[2, 4] y) {
            r = Relu(x)
            mm = MatMul(r, w)
            b = Greater(mm, mm)
            y = Where(b, mm, mm)
        }""")
    vals = values(model)
    assert all(vals[n].dtype is None for n in ("r", "mm", "b"))
    typed = infer_shapes(model)
    # x, w, r, mm, b, y
    assert typed == 6
    assert (vals["r"].dtype, vals["r"].shape) == (DataType.FLOAT, (2, 3))
    assert (vals["mm"].dtype, vals["mm"].shape) == (DataType.FLOAT, (2, 4))
    assert (vals["b"].dtype, vals["b"].shape) == (DataType.BOOL, (2, 4))


def test_data_propagation_makes_reshape_target_static():
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape: the target is only known with data_prop
    model = load("""
        g (float[6, 4] x) => (float[M] y) {
            s = Shape(x)
            i0 = Constant<value = int64 {0}>()
            d0 = Gather(s, i0)
            ax = Constant<value = int64[1] {0}>()
            u = Unsqueeze(d0, ax)
            m1 = Constant<value = int64[1] {4}>()
            shp = Mul(u, m1)
            r = Reshape(x, shp)
            y = Neg(r)
        }""")
    infer_shapes(model)
    vals = values(model)
    assert vals["shp"].shape == (1,)
    assert vals["r"].shape == (24,)


def test_symbolic_dims_are_kept_as_names():
    model = load("""
        g (float[N, 3] x) => (float[N, 3] y) {
            t = Transpose<perm = [1, 0]>(x)
            y = Transpose<perm = [1, 0]>(t)
        }""")
    infer_shapes(model)
    assert values(model)["t"].shape == (3, "N")


def test_custom_domain_op_does_not_raise_and_the_rest_is_typed():
    model = load("""
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Relu(x)
            b = my.ops.Mystery(a)
            y = Relu(b)
        }""", extra=', "my.ops" : 1', check=False)
    vals = values(model)
    vals["b"].shape = (2, 3)  # known from elsewhere; inference knows nothing about Mystery
    infer_shapes(model)
    assert (vals["a"].dtype, vals["a"].shape) == (DataType.FLOAT, (2, 3))
    assert vals["b"].dtype is None and vals["b"].shape == (2, 3)  # not made less precise


def test_subgraph_values_are_typed():
    model = load("""
        g (bool c, float[2, 3] x) => (float[2, 3] y) {
            y = If(c) <
                then_branch = t () => (float[2, 3] ty) { ty = Relu(x) },
                else_branch = e () => (float[2, 3] ey) { en = Neg(x)
                                                          ey = Abs(en) }
            >
        }""")
    infer_shapes(model)
    vals = values(model)
    for name in ("ty", "en", "ey"):
        assert (vals[name].dtype, vals[name].shape) == (DataType.FLOAT, (2, 3)), name


def test_large_initializers_are_typed_but_untouched():
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)  # 16 KiB > STRIP_BYTES
    model = load("""
        g (float[2, 64] x) => (float[2, 64] y) {
            y = MatMul(x, w)
        }""", w=w)
    assert w.nbytes > shapes.STRIP_BYTES
    infer_shapes(model)
    assert values(model)["y"].shape == (2, 64)
    assert [v.name for v in model.graph.inputs] == ["x"]  # stripping happens on a copy only
    np.testing.assert_array_equal(model.graph.initializers["w"].constant(), w)
    out = ir.to_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.initializer] == ["w"]


def test_inference_failure_warns_and_types_nothing(monkeypatch):
    model = load("""
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Relu(x)
            y = Relu(a)
        }""")

    def broken(*a, **k):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] broken on purpose")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    with pytest.warns(ShapeInferenceWarning, match="broken on purpose"):
        assert infer_shapes(model) == 0
    assert values(model)["a"].dtype is None
    assert "broken on purpose" in model.meta["graft.shape_inference_error"]


def test_real_model_types_most_values(minilm_onnx_path):
    model = ir.load(minilm_onnx_path)
    n_outputs = sum(len(n.outputs) for n in model.graph)
    typed = infer_shapes(model)
    assert typed >= n_outputs  # every node output plus graph inputs/outputs
    hidden = model.graph.outputs[0]
    assert hidden.dtype == DataType.FLOAT and hidden.shape[-1] == 384
    assert all(o.dtype is not None for n in model.graph for o in n.outputs)
