"""Models of IR version < 4 list every initializer as a graph input too; graft treats those
initializers as constants (and, when asked, those of newer models), so weights fold.

The nine ``light_*`` models the onnx package ships (onnx/backend/test/data/light, IR version 3,
opset 9) are checked against their shipped expected outputs, on the inputs and with the
tolerances of onnx's own backend test (``onnx.backend.test.runner.Runner``).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper
from onnx.backend.test.runner import Runner

from compile_models import conv_bn_model, save
from graft.compiler import compile
from graft.compiler.driver.cli import main
from graft.rules.constant_folding import GROWTH_MIN_BYTES

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# (name, rtol, atol) as onnx.backend.test.case.model.collect_testcases lists them
CASES = [("bvlc_alexnet", 1e-3, 1e-7), ("densenet121", 2e-3, 1e-7), ("inception_v1", 1e-3, 1e-7),
         ("inception_v2", 1e-3, 1e-7), ("resnet50", 1e-3, 1e-7), ("shufflenet", 1e-3, 1e-7),
         ("squeezenet", 1e-3, 1e-7), ("vgg19", 1e-3, 1e-7), ("zfnet512", 1e-3, 1e-7)]
WITH_BN = ("densenet121", "inception_v2", "resnet50", "shufflenet")


def backend_inputs(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The inputs onnx's backend runner feeds a light model (``generate_dummy_data``, not random):
    every graph input that is not an initializer."""
    inits = {t.name for t in proto.graph.initializer}
    return {vi.name: Runner.generate_dummy_data(vi, seed=0, random=False)
            for vi in proto.graph.input if vi.name not in inits}


def expected_output(name: str) -> np.ndarray:
    return numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"light_{name}_output_0.pb")))


def run(proto: onnx.ModelProto, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def producers(proto: onnx.ModelProto) -> dict:
    return {o: n for n in proto.graph.node for o in n.output}


def with_weights(name: str) -> onnx.ModelProto:
    """The light model as an old export holds it: every ``ConstantOfShape`` fill (the light models'
    stand-in for trained weights) an initializer of the same values, listed as a graph input."""
    m = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in inits:
            shape = numpy_helper.to_array(inits[n.input[0]])
            value = numpy_helper.to_array(n.attribute[0].t).reshape(-1)[0]
            t = numpy_helper.from_array(np.full(shape, value, dtype=value.dtype), n.output[0])
            m.graph.initializer.append(t)
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    assert m.ir_version == 3
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("name, rtol, atol", CASES, ids=[c[0] for c in CASES])
def test_light_model_folds_and_matches_expected_output(name, rtol, atol):
    path = LIGHT / f"light_{name}.onnx"
    src = onnx.load(str(path))
    assert src.ir_version == 3 and all(t.name in {i.name for i in src.graph.input} for t in src.graph.initializer)
    res = compile(str(path))
    assert res.verification.status == "passed"
    out = res.proto
    onnx.checker.check_model(out, full_check=True)  # IR 3 would need every new initializer listed as an input
    assert out.ir_version == 4
    feeds = backend_inputs(src)
    assert [i.name for i in out.graph.input] == list(feeds)  # the weights are no longer inputs
    assert any("treated as constants" in n for n in res.notes)
    assert res.counts["fold_constants"] > 0

    # every node left whose inputs are all initializers is a fill the folding refuses to blow up: a
    # ConstantOfShape weight, or the Expand of a BN-scaled fill (kept small for onnxruntime to expand)
    inits = {t.name: t for t in out.graph.initializer}
    for n in out.graph.node:
        if n.input and all(i in inits for i in n.input if i):
            assert n.op_type in ("ConstantOfShape", "Expand"), (n.op_type, n.name)
            shape = numpy_helper.to_array(inits[n.input[-1]])
            assert int(np.prod(shape)) * 4 > GROWTH_MIN_BYTES, (n.output[0], shape)
    # every BatchNormalization after a Conv is folded into it, the Conv's weight a fill or not;
    # only densenet121's BNs after a Concat or a pooling stay (no fold reaches them)
    prod = producers(out)
    bn_in = [n for n in src.graph.node if n.op_type == "BatchNormalization"]
    src_prod = producers(src)
    after_conv = sum(1 for n in bn_in if src_prod[n.input[0]].op_type == "Conv")
    left = [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    assert not [n.name for n in left if prod[n.input[0]].op_type == "Conv"]
    assert len(left) == len(bn_in) - after_conv
    assert res.counts["fold_batchnorm_into_conv"] + res.counts["fold_batchnorm_into_conv_of_fill"] == after_conv
    if name in WITH_BN and name != "densenet121":
        assert not left and res.counts["fold_batchnorm_into_conv_of_fill"] > 0

    np.testing.assert_allclose(run(out, feeds), expected_output(name), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", WITH_BN)
def test_old_export_with_weights_folds_every_batchnorm_after_a_conv(name):
    """The weights as initializers listed as inputs, as IR 3 exports hold them: each BN after a Conv
    folds (densenet121's other BNs follow a Concat or a pooling, which no fold can reach)."""
    src = with_weights(name)
    bn_in = [n for n in src.graph.node if n.op_type == "BatchNormalization"]
    prod = producers(src)
    after_conv = sum(1 for n in bn_in if prod[n.input[0]].op_type == "Conv")
    res = compile(src)
    assert res.verification.status == "passed"
    out = res.proto
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == 4 and [i.name for i in out.graph.input] == list(backend_inputs(src))
    assert res.counts["fold_batchnorm_into_conv"] == after_conv
    left = Counter(n.op_type for n in out.graph.node)["BatchNormalization"]
    assert left == len(bn_in) - after_conv
    if name != "densenet121":
        assert left == 0
    rtol = dict((c[0], c[1]) for c in CASES)[name]
    np.testing.assert_allclose(run(out, backend_inputs(src)), expected_output(name), rtol=rtol, atol=1e-7)


def test_fold_initializer_inputs_false_keeps_them_overridable_and_the_output_valid():
    """An IR 3 model compiled with the initializer inputs kept: nothing of them folds, and the
    initializers rules create (constant_to_initializer) make the output IR 4, which onnx.checker
    accepts (IR 3 requires every initializer to be an input)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2,)).astype(np.float32)
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((2,), 2.0, np.float32)))
    g = helper.make_graph(
        [c, helper.make_node("Mul", ["w", "c"], ["wc"]), helper.make_node("Add", ["x", "wc"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])], initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    onnx.checker.check_model(m)

    kept = compile(m, fold_initializer_inputs=False)
    onnx.checker.check_model(kept.proto, full_check=True)
    assert kept.proto.ir_version == 4 and any("IR version raised from 3 to 4" in n for n in kept.notes)
    assert [i.name for i in kept.proto.graph.input] == ["x", "w"]
    assert [n.op_type for n in kept.proto.graph.node] == ["Mul", "Add"]  # w may be overridden: not folded
    other = np.array([5.0, -1.0], np.float32)
    x = np.array([1.0, 2.0], np.float32)
    np.testing.assert_allclose(run(kept.proto, {"x": x, "w": other}), x + other * 2)

    folded = compile(m)  # IR 3: the initializer is a constant, Mul(w, c) folds
    onnx.checker.check_model(folded.proto, full_check=True)
    assert [i.name for i in folded.proto.graph.input] == ["x"]
    assert [n.op_type for n in folded.proto.graph.node] == ["Add"]
    np.testing.assert_allclose(run(folded.proto, {"x": x}), x + w * 2, rtol=1e-6)


def bn_params_as_inputs() -> onnx.ModelProto:
    """conv_bn_model (IR 10) with the BatchNormalization statistics also listed as graph inputs:
    inputs with default values, which a caller may override."""
    m = conv_bn_model()
    inits = {t.name: t for t in m.graph.initializer}
    for name in ("gamma", "beta", "mean", "var"):
        m.graph.input.append(helper.make_tensor_value_info(name, inits[name].data_type, inits[name].dims))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_fold_initializer_inputs_api():
    m = bn_params_as_inputs()
    plain = compile(m)
    assert "fold_batchnorm_into_conv" not in plain.counts  # an overridable statistic is not a constant
    assert [i.name for i in plain.proto.graph.input] == ["x", "gamma", "beta", "mean", "var"]
    res = compile(m, fold_initializer_inputs=True)
    assert res.counts["fold_batchnorm_into_conv"] == 1
    assert res.proto.ir_version == 10 and [i.name for i in res.proto.graph.input] == ["x"]
    assert "BatchNormalization" not in [n.op_type for n in res.proto.graph.node]
    assert res.verification.status == "passed"


def test_cli_fold_initializer_inputs(tmp_path):
    path = save(bn_params_as_inputs(), tmp_path / "m.onnx")
    plain, folded = tmp_path / "plain.onnx", tmp_path / "folded.onnx"
    r = CliRunner().invoke(main, ["compile", str(path), "-o", str(plain), "-q"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(main, ["compile", str(path), "-o", str(folded), "--fold-initializer-inputs"])
    assert r.exit_code == 0, r.stderr
    assert "fold_batchnorm_into_conv" in r.stdout and "verified" in r.stdout
    a, b = onnx.load(str(plain)), onnx.load(str(folded))
    assert "BatchNormalization" in [n.op_type for n in a.graph.node]
    assert "BatchNormalization" not in [n.op_type for n in b.graph.node]
    assert [i.name for i in b.graph.input] == ["x"]
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(b, {"x": x}), run(a, {"x": x}), rtol=1e-4, atol=1e-5)


def test_constants_fold_with_the_model_opsets_semantics():
    """Unsqueeze-1 (opset 9) takes its axes as an attribute; the fold must evaluate that version,
    not today's Unsqueeze, which takes them as an input."""
    scale = np.arange(4, dtype=np.float32)
    g = helper.make_graph(
        [helper.make_node("Unsqueeze", ["s"], ["s3"], axes=[1, 2]), helper.make_node("Mul", ["x", "s3"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 2, 2]),
              helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 2, 2])],
        initializer=[numpy_helper.from_array(scale, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    res = compile(m)
    assert res.counts["fold_constants"] == 1
    assert [n.op_type for n in res.proto.graph.node] == ["Mul"]
    folded = {t.name: numpy_helper.to_array(t) for t in res.proto.graph.initializer}["s3"]
    np.testing.assert_array_equal(folded, scale.reshape(4, 1, 1))
