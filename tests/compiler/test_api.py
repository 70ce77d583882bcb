"""compiler.compile: results, statistics, verification, blame and error reporting."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from graft import compiler
from graft import ir
from graft.compiler import RuleError
from graft.compiler.driver.api import (CompileError, CompileResult, InvalidOutputError, NumericMismatchError, compile,
                          default_dim_sizes, model_stats)
from graft.compiler.driver.user_rules import UserRuleFileError, load_rule_file
from compile_models import (BAD_DTYPE, DROP_MUL, INVALID_GRAPH, RAISES_AT_IMPORT, RAISES_IN_REWRITE, REMOVE_MUL_ONE,
                            WRONG_DIV, conv_bn_model, custom_domain_model, rule_file, save)
from conftest import assert_same_outputs, parse_model


@pytest.fixture(scope="module")
def small():
    return conv_bn_model()


@pytest.fixture(scope="module")
def small_result(small):
    return compile(small)


def test_compile_is_exposed_lazily():
    assert compiler.compile is compile
    assert compiler.CompileResult is CompileResult


def test_compile_small_model(small, small_result):
    r = small_result
    assert r.pipeline == "optimize" and r.target == "onnx" and r.source == "ModelProto"
    assert r.counts["fold_batchnorm_into_conv"] == 1 and r.counts["remove_identity"] == 1
    assert [n.op_type for n in r.proto.graph.node] == ["Conv", "Relu", "Div", "Mul"]
    # 6 nodes → 4; constants: w 108 + b 4 + BN 4×4 + 2 scalars = 130 → w' 108 + b' 4 + 2 scalars = 114
    assert (r.before.nodes, r.after.nodes) == (6, 4)
    assert (r.before.parameters, r.after.parameters) == (130, 114)
    assert (r.before.bytes, r.after.bytes) == (520, 456)
    assert r.ok and r.verification.status == "passed"
    assert r.verification.inputs == {"x": (1, 3, 8, 8)}
    [out] = r.outputs
    assert out.name == "y" and out.max_abs <= 1e-4 and out.cosine > 0.999999
    assert set(r.stop_reasons) == {"optimize/cleanup/cleanup_rules", "optimize/fold_batchnorm", "optimize/fuse",
                                   "optimize/cleanup#2/cleanup_rules"}
    assert {"load", "pipeline", "check", "verify", "total"} <= set(r.timings)
    conv = r.proto.graph.node[0]
    assert {e.key: e.value for e in conv.metadata_props}["graft.rule"] == "fold_batchnorm_into_conv"
    assert_same_outputs(small, r.proto, atol=1e-4)


def test_save_is_atomic_and_loadable(small_result, tmp_path):
    out = tmp_path / "sub" / "out.onnx"
    small_result.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx"]
    again = onnx.load(str(out))
    onnx.checker.check_model(again, full_check=True)
    assert [n.op_type for n in again.graph.node] == ["Conv", "Relu", "Div", "Mul"]


def test_report_is_short_and_complete(small_result):
    text = small_result.report()
    for piece in ("fold_batchnorm_into_conv", "remove_identity", "nodes", "parameters", "bytes",
                  "max abs", "cosine", "verified", "pipeline optimize"):
        assert piece in text, piece
    assert "6" in text and "4" in text and "-33.3%" in text
    assert len(text.splitlines()) <= 16


def test_inputs_of_every_kind(small, tmp_path):
    path = save(small, tmp_path / "m.onnx")
    by_path = compile(path)
    model = ir.from_onnx(small)
    n_before = len(model.graph)
    by_ir = compile(model)
    assert len(model.graph) == n_before  # the caller's IR model is not edited
    assert by_path.proto.SerializeToString() == by_ir.proto.SerializeToString()
    assert by_path.source == str(path)
    with pytest.raises(TypeError, match="takes a path"):
        compile(42)


def test_pipeline_none_and_verify_off(small):
    r = compile(small, pipeline="none")
    assert r.counts == {} and r.before.nodes == r.after.nodes == 6
    assert r.verification.status == "passed" and r.outputs[0].max_abs == 0.0
    r = compile(small, pipeline=None, verify=False)
    assert r.verification.status == "off" and r.outputs == []
    with pytest.raises(KeyError, match="known pipelines"):
        compile(small, pipeline="optimise")
    with pytest.raises(ValueError, match="target must be"):
        compile(small, target="tflite")


def test_example_inputs_dict_and_sequence(small):
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    a = compile(small, example_inputs={"x": x})
    b = compile(small, example_inputs=(x,))
    assert a.outputs[0].max_abs == b.outputs[0].max_abs
    with pytest.raises(ValueError, match="lacks graph input"):
        compile(small, example_inputs={"z": x})
    with pytest.raises(ValueError, match="2 example input"):
        compile(small, example_inputs=(x, x))


def test_symbolic_dims_get_sizes():
    proto = parse_model("""<ir_version: 10, opset_import: ["" : 17]>
    g (float[batch, seq, 4] x, float[N, 4] z) => (float[batch, seq, 4] y) {
        y = Relu (x)
    }""")
    assert default_dim_sizes(proto) == ({"batch": 2, "seq": 32, "N": 2}, 2)
    assert default_dim_sizes(proto, {"seq": 5})[0] == {"batch": 2, "seq": 5, "N": 2}
    r = compile(proto, dim_sizes={"seq": 7})
    assert r.verification.inputs == {"x": (2, 7, 4), "z": (2, 4)}


def test_half_precision_output_gets_a_roundoff_tolerance():
    """An fp16 model whose BN folds rounds once where the input rounded twice: the default atol (1e-4)
    is raised to 8 fp16 roundoffs at the outputs' magnitude; an fp32 model keeps 1e-4."""
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float16[1, 3, 8, 8] x) => (float16[1, 16, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w)
            y = BatchNormalization (c, gamma, beta, mean, var)
        }""")
    rng = np.random.default_rng(3)
    for name, shape in (("w", (16, 3, 3, 3)), ("gamma", (16,)), ("beta", (16,)), ("mean", (16,)), ("var", (16,))):
        arr = rng.uniform(0.5, 2.0, shape) if name in ("gamma", "var") else rng.normal(size=shape) * 2
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr.astype(np.float16), name))
    res = compile(proto)
    v = res.verification
    assert v.status == "passed" and res.counts["fold_batchnorm_into_conv"] == 1
    assert 1e-4 < v.atol < 1.0  # 8 * 2**-11 * max|y|
    assert all(o.max_abs <= v.atol for o in v.outputs)
    assert compile(conv_bn_model()).verification.atol == 1e-4


def test_model_stats_counts_constant_nodes():
    proto = parse_model("""<ir_version: 10, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
        c = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
        y = Add (x, c)
    }""")
    s = model_stats(ir.from_onnx(proto))
    assert (s.nodes, s.parameters, s.bytes) == (2, 3, 12)
    r = compile(proto, pipeline="cleanup")
    assert r.counts["constant_to_initializer"] == 1
    assert (r.after.nodes, r.after.parameters, r.after.bytes) == (1, 3, 12)


# --------------------------------------------------------------------------- blame
def test_wrong_rule_is_blamed_by_provenance(small, tmp_path):
    rules = load_rule_file(rule_file(tmp_path, WRONG_DIV))
    with pytest.raises(NumericMismatchError) as ei:
        compile(small, rules=rules)
    e = ei.value
    assert "div_to_mul_wrong" in str(e) and "output 'y'" in str(e)
    b = e.blame
    # BN folding created values earlier in the graph and agrees: the Div rewrite is the first to diverge
    assert b.rule == "div_to_mul_wrong" and b.op_type == "Mul" and b.original == "d"
    assert b.compared >= 3 and b.max_abs > 1.0 and b.shapes == ((1, 4, 8, 8), (1, 4, 8, 8))
    r = e.result
    assert r.verification.status == "failed" and not r.ok and r.counts["fold_batchnorm_into_conv"] == 1
    text = r.report()
    assert "DIFFERS" in text and "div_to_mul_wrong" in text


def test_rule_that_creates_no_node_is_blamed_from_the_rewrite_log(small, tmp_path):
    rules = load_rule_file(rule_file(tmp_path, DROP_MUL))
    with pytest.raises(NumericMismatchError) as ei:
        compile(small, rules=rules)
    assert ei.value.blame.rule == "drop_mul_wrong"
    assert "drop_mul_wrong" in str(ei.value)


def test_correct_user_rule_passes(small, tmp_path):
    # Mul by 3 is kept; a RULES list is honoured
    rules = load_rule_file(rule_file(tmp_path, REMOVE_MUL_ONE))
    assert [r.name for r in rules] == ["remove_mul_one"]
    r = compile(small, rules=rules)
    assert r.counts["remove_mul_one"] == 0 and r.ok


def test_blame_on_a_real_model(ppocr_cls_path, tmp_path):
    rules = load_rule_file(rule_file(tmp_path, WRONG_DIV))
    with pytest.raises(NumericMismatchError) as ei:
        compile(ppocr_cls_path, rules=rules)
    b = ei.value.blame
    assert b.rule == "div_to_mul_wrong" and b.op_type == "Mul"
    ref = onnx.load(str(ppocr_cls_path))
    producers = {o: n.op_type for n in ref.graph.node for o in n.output}
    assert producers[b.original] == "Div"


# --------------------------------------------------------------------------- invalid results, rule errors
def test_invalid_graph_names_the_rule_verifier(small, tmp_path):
    rules = load_rule_file(rule_file(tmp_path, INVALID_GRAPH))
    with pytest.raises(InvalidOutputError) as ei:
        compile(small, rules=rules)
    assert [r for r, _ in ei.value.rules] == ["relu_to_bad_conv"]
    assert "relu_to_bad_conv" in str(ei.value) and "no output written" in str(ei.value)


def test_invalid_graph_names_the_rule_checker(small, tmp_path):
    rules = load_rule_file(rule_file(tmp_path, BAD_DTYPE))
    with pytest.raises(InvalidOutputError, match="onnx.checker.*relu_to_bad_add") as ei:
        compile(small, rules=rules)
    assert ei.value.rules[0][0] == "relu_to_bad_add"


def test_rule_raising_names_rule_and_node(small, tmp_path):
    rules = load_rule_file(rule_file(tmp_path, RAISES_IN_REWRITE))
    with pytest.raises(RuleError, match=r"rule 'broken_relu' \(.*my_rules.py:\d+\).*ValueError: this rule is "
                                        r"broken.*Relu node"):
        compile(small, rules=rules)


def test_rule_file_import_error_names_file_and_line(tmp_path):
    p = rule_file(tmp_path, RAISES_AT_IMPORT)
    with pytest.raises(UserRuleFileError, match=rf"{p}:5: importing the rule file raised ZeroDivisionError"):
        load_rule_file(p)
    (tmp_path / "syntax.py").write_text("from graft.compiler import Rule\ndef f(:\n")
    with pytest.raises(UserRuleFileError, match=r"syntax.py:2: .*SyntaxError"):
        load_rule_file(tmp_path / "syntax.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(UserRuleFileError, match="defines no graft.compiler.Rule"):
        load_rule_file(tmp_path / "empty.py")
    (tmp_path / "badlist.py").write_text("RULES = [1]\n")
    with pytest.raises(UserRuleFileError, match=r"RULES\[0\] is int"):
        load_rule_file(tmp_path / "badlist.py")
    with pytest.raises(UserRuleFileError, match="no such rule file"):
        load_rule_file(tmp_path / "missing.py")
    (tmp_path / "typo.py").write_text("from graft.compiler import Rule, Var, op\nx = Var('x')\n"
                                      "r = Rule('r', op.Reluu(x), lambda op, m: m[x])\n")
    with pytest.raises(UserRuleFileError, match=r"typo.py:3: invalid rule: .*unknown ONNX op 'Reluu'.*'Relu'"):
        load_rule_file(tmp_path / "typo.py")


def test_custom_domain_op_is_kept_and_verification_says_why_skipped():
    proto = custom_domain_model()
    r = compile(proto)
    ops = [(n.domain, n.op_type) for n in r.proto.graph.node]
    assert ops == [("my.domain", "Scale"), ("", "Relu")]
    assert r.counts["remove_identity"] == 1
    assert r.verification.status == "skipped" and r.ok
    assert "onnxruntime cannot load the input model" in r.verification.reason
    assert "my.domain" in r.verification.reason
    assert "verification skipped" in r.report()


def test_faults_the_input_already_has_are_notes_not_errors(tmp_path):
    """Declared output shape [2, 3] contradicts Relu's [2, 4]: strict full_check fails on the input too."""
    proto = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 3] y) { i = Identity (x)
        y = Relu (i) }""")
    onnx.checker.check_model(proto)
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(proto, full_check=True)
    r = compile(proto)
    assert r.counts["remove_identity"] == 1 and r.verification.status == "passed"
    assert len(r.notes) == 1 and "fails on the input model too" in r.notes[0]
    assert "note: onnx.checker full_check fails on the input model too" in r.report()
    # a rule breaking the graph further is still an error
    rules = load_rule_file(rule_file(tmp_path, INVALID_GRAPH))
    with pytest.raises(InvalidOutputError, match="relu_to_bad_conv"):
        compile(proto, rules=rules)


def test_torch_module_to_torch_target():
    import torch  # torch is a test dependency; this never skips in the test env
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    r = compile(net, example_inputs=(x,), target="torch")
    assert isinstance(r.module, torch.fx.GraphModule) and r.proto is None
    assert r.verification.status == "passed" and not r.verification.generated
    # named as the captured graph names them (Sequential.forward's argument), not by position
    assert r.verification.inputs == {"input": (2, 3, 8, 8)}
    assert [o.name for o in r.verification.outputs] == [v.name for v in r.model.graph.outputs]
    with torch.no_grad():
        got = r.module(x)
        got = got[0] if isinstance(got, (tuple, list)) else got
        assert torch.allclose(got, net(x), atol=1e-4)
    with pytest.raises(CompileError, match="needs example_inputs"):
        compile(net)


def test_inputs_the_model_cannot_take_skip_verification_with_a_hint():
    """Reshape to [2, 3] needs N = 6: generated N = 2 cannot run; dim_sizes fixes it."""
    proto = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17]>
    g (float[N] x) => (float[2, 3] y) {
        s = Constant <value = int64[2] {2, 3}> ()
        i = Identity (x)
        y = Reshape (i, s) }""")
    r = compile(proto)
    assert r.verification.status == "skipped" and r.ok
    assert "cannot run the input model on generated inputs x[2]" in r.verification.reason
    assert "--dim" in r.verification.reason
    r = compile(proto, dim_sizes={"N": 6})
    assert r.verification.status == "passed" and r.verification.inputs == {"x": (6,)}


def test_structural_blame_helpers():
    from graft.compiler import Rule, Var, op
    from graft.compiler.driver.blame import rules_failing_checker, rules_in_message
    from graft.compiler.engine.passes import RewritePass

    x = Var("x")
    # Relu has no attribute 'alpha': the node alone fails onnx.checker.check_node
    bad = Rule("identity_to_bad_relu", op.Identity(x), lambda op, m: op.Relu(m[x], _name="bad_relu", alpha=1.0))
    model = ir.from_onnx(conv_bn_model())
    assert RewritePass([bad], "r")(model).stats.counts["identity_to_bad_relu"] == 1
    proto = ir.to_onnx(model)
    assert rules_failing_checker(model, proto) == [("identity_to_bad_relu", "bad_relu")]
    assert rules_in_message(model, "Unrecognized attribute: alpha. Name: bad_relu OpType: Relu") == \
        [("identity_to_bad_relu", "bad_relu")]
    assert rules_in_message(model, "node bad_relu_2 is fine") == []  # whole names only


def test_bfloat16_torch_model_is_verified_at_its_own_precision():
    import torch
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).bfloat16().eval()
    r = compile(lin, example_inputs=(torch.randn(4, 16).bfloat16(),), target="torch")
    assert r.verification.status == "passed"
    # a few bf16 roundoffs (2^-8) at the outputs' magnitude, not the fp32 atol
    assert 1e-4 < r.verification.atol < 0.2
    assert r.verification.outputs[0].max_abs <= r.verification.atol



DIV_MODEL = """
<ir_version: 10, opset_import: ["" : 17]>
agraph (float[2, 3] x) => (float[2, 3] y) {
    c = Constant <value = float[1] {4.0}> ()
    y = Div (x, c)
}
"""


def test_rules_may_be_given_as_rule_file_paths_mixed_with_rules():
    from pathlib import Path

    from conftest import parse_model
    from graft.compiler import Rule, Var, op

    example = Path(__file__).resolve().parents[2] / "examples" / "custom_rule.py"
    x = Var("x")
    neg_neg = Rule("neg_neg", op.Neg(op.Neg(x)), lambda op, m: op.Identity(m[x]))
    res = compile(parse_model(DIV_MODEL), pipeline="none", rules=[str(example), neg_neg])
    assert res.counts["div_to_mul"] == 1
    assert [n.op_type for n in res.proto.graph.node] == ["Mul"]
    assert res.verification.status == "passed"


def test_save_refuses_to_overwrite_the_input_model(tmp_path, ppocr_cls_path):
    import shutil

    src = tmp_path / "cls.onnx"
    shutil.copy(ppocr_cls_path, src)
    before = src.read_bytes()
    res = compile(str(src), pipeline="cleanup", verify=False)
    with pytest.raises(CompileError, match="is the input model"):
        res.save(src)
    assert src.read_bytes() == before
    res.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").exists()
