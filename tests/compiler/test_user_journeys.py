"""A new user's mistakes, one regression test each: every one ends in one line naming the file,
rule or input and what to do, exit status 1, and no output written (nothing of the user's lost)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from compile_models import DROP_MUL, conv_bn_model, rule_file, save
from graft.compiler.driver.api import NumericMismatchError, compile
from graft.compiler.driver.cli import main
from graft.compiler.driver.user_rules import UserRuleFileError, load_rule_file
from conftest import parse_model, with_initializers


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"GRAFT_DEBUG": ""})


def one_line_error(r, needle: str) -> str:
    assert r.exit_code == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft: error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0]


@pytest.fixture
def small_path(tmp_path):
    return save(conv_bn_model(), tmp_path / "small.onnx")


def if_model() -> onnx.ModelProto:
    """y = If(cond, then: Relu(x), else: Neg(x)) with a scalar bool graph input ``cond``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    branch = lambda op, out: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["x"], [out], name=f"{op.lower()}_in_branch")], f"{op}_branch", [],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 4])])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("Relu", "t"),
                            else_branch=branch("Neg", "e"))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


# --------------------------------------------------------------------------- rule files
def test_rule_file_mistakes_are_named(tmp_path):
    cases = {
        "RULES = 5\n": "RULES is int 5; it must be a list of graft.compiler.Rule",
        "import sys\nsys.exit(3)\n": "called sys.exit(3) while being imported",
    }
    for i, (body, needle) in enumerate(cases.items()):
        p = tmp_path / f"r{i}.py"
        p.write_text(body)
        with pytest.raises(UserRuleFileError, match=r"r\d\.py"):
            load_rule_file(p)
        with pytest.raises(UserRuleFileError) as e:
            load_rule_file(p)
        assert needle in str(e.value)
    (tmp_path / "rules_dir").mkdir()
    with pytest.raises(UserRuleFileError, match="is a directory, expected a .py rule file"):
        load_rule_file(tmp_path / "rules_dir")


def test_rule_code_that_exits_or_raises_while_matching(small_path, tmp_path):
    out = tmp_path / "o.onnx"
    exits = rule_file(tmp_path, """
        import sys
        x = Var("x")

        def replacement(op, m):
            sys.exit(0)

        relu_exit = Rule("relu_exit", op.Relu(x), replacement)
        """, "exits.py")
    line = one_line_error(invoke("compile", small_path, "-o", out, "--rules", exits), "exits.py:8 called sys.exit(0)")
    assert "no output written" in line and not out.exists()
    # a Const predicate runs inside the matcher: its exception is the rule file's, not "internal"
    pred = rule_file(tmp_path, """
        x, c = Var("x"), Const("c", where=lambda a: a.no_such_attribute)
        bad_pred = Rule("bad_pred", op.Div(x, c), lambda op, m: op.Mul(m[x], m[c]))
        """, "pred.py")
    line = one_line_error(invoke("compile", small_path, "-o", out, "--rules", pred), "pred.py:4 raised AttributeError")
    assert "internal error" not in line and not out.exists()


def test_user_rule_may_not_take_a_pipeline_rules_name(small_path, tmp_path):
    out = tmp_path / "o.onnx"
    clash = rule_file(tmp_path, """
        x = Var("x")
        remove_identity = Rule("remove_identity", op.Relu(x), lambda op, m: op.Relu(m[x]))
        """, "clash.py")
    one_line_error(invoke("compile", small_path, "-o", out, "--rules", clash),
                   "rule 'remove_identity' (")
    assert not out.exists()
    from graft.rules.pipelines import with_user_rules
    from graft.rules import cleanup

    # the built-in Rule object itself may run again; with no pipeline the name is free
    assert len(with_user_rules("optimize", cleanup.RULES[:1]).passes) == 5
    r = invoke("compile", small_path, "-o", out, "--rules", clash, "--pipeline", "none", "-q", "--no-verify")
    assert r.exit_code == 0, r.stderr


# --------------------------------------------------------------------------- -o and --dim
def test_output_may_not_be_the_inputs_external_data(tmp_path):
    m = conv_bn_model()
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save_model(m, str(d / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    data = (d / "m.onnx.data").read_bytes()
    for target in (d / "m.onnx.data", d / "m.onnx"):
        one_line_error(invoke("compile", d / "m.onnx", "-o", target), "refusing to overwrite")
    one_line_error(invoke("compile", d / "m.onnx", "-o", d / "m.onnx"), "is the input model")
    assert (d / "m.onnx.data").read_bytes() == data
    r = invoke("compile", d / "m.onnx", "-o", d / "fine.onnx", "-q")
    assert r.exit_code == 0, r.stderr


def test_missing_external_data_file_is_named(tmp_path):
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save_model(conv_bn_model(), str(d / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    (d / "m.onnx.data").unlink()
    line = one_line_error(invoke("compile", d / "m.onnx", "-o", tmp_path / "o.onnx"),
                          "cannot read its external data")
    assert "m.onnx.data" in line and not (tmp_path / "o.onnx").exists()


def test_output_under_a_file_fails_before_compiling(small_path, tmp_path):
    line = one_line_error(invoke("compile", small_path, "-o", small_path / "sub" / "o.onnx"),
                          "is a file, not a folder")
    assert str(small_path) in line
    assert small_path.is_file()


def test_unknown_dim_name_is_an_error(tmp_path):
    p = save(parse_model("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[batch, 4] x) => (float[batch, 4] y) { y = Relu (x) }"""), tmp_path / "dyn.onnx")
    line = one_line_error(invoke("compile", p, "-o", tmp_path / "o.onnx", "--dim", "btach=3"),
                          "--dim: dim 'btach' is not a dim of any graph input")
    assert "x[batch, 4]" in line and not (tmp_path / "o.onnx").exists()
    r = invoke("compile", p, "-o", tmp_path / "o.onnx", "--dim", "batch=3")
    assert r.exit_code == 0 and "x[3, 4]" in r.stdout
    res = compile(str(p), dim_sizes={"btach": 3})  # the API notes it (and the report shows the note)
    assert any("'btach' is not a dim of any graph input" in n for n in res.notes)
    assert "note: dim 'btach'" in res.report()
    r = invoke("compile", p, "-o", tmp_path / "o.onnx", "--atol", "-1")
    assert r.exit_code == 2 and "--atol" in r.stderr


# --------------------------------------------------------------------------- Python API
def test_api_refuses_bad_arguments_instead_of_skipping(small_path):
    for kw, needle in [({"dim_sizes": {"batch": -3}}, "positive integer"),
                       ({"dim_sizes": {"batch": "x"}}, "positive integer"),
                       ({"atol": -1.0}, "atol must be a number >= 0"),
                       ({"example_inputs": {"x": np.ones((1, 3, 8, 8))}}, "is float64[1, 3, 8, 8], the model's input is float32"),
                       ({"example_inputs": {"x": np.ones((1, 3, 4, 4), np.float32)}}, "has shape [1, 3, 4, 4]")]:
        with pytest.raises(ValueError) as e:
            compile(str(small_path), **kw)
        assert needle in str(e.value), (kw, str(e.value))
    ok = compile(str(small_path), example_inputs={"x": np.ones((1, 3, 8, 8), np.float32)})
    assert ok.verification.status == "passed" and not ok.verification.generated


def test_api_takes_a_rule_file_path(small_path, tmp_path):
    with pytest.raises(NumericMismatchError, match="drop_mul_wrong"):
        compile(str(small_path), rules=str(rule_file(tmp_path, DROP_MUL)))


# --------------------------------------------------------------------------- If with a bool input
def test_bool_scalar_inputs_are_verified_on_both_branches(tmp_path):
    p = save(if_model(), tmp_path / "if.onnx")
    res = compile(str(p))
    assert res.verification.status == "passed" and res.verification.inputs == {"cond": (), "x": (2, 4)}
    for op_type in ("Relu", "Neg"):  # whichever branch the generated cond takes, the other is run too
        broken = rule_file(tmp_path, f"""
            x = Var("x")
            broken_{op_type.lower()} = Rule("broken_{op_type.lower()}", op.{op_type}(x), lambda op, m: op.Abs(m[x]))
            """, f"{op_type}.py")
        with pytest.raises(NumericMismatchError) as e:
            compile(str(p), pipeline="none", rules=str(broken))
        assert e.value.blame.rule == f"broken_{op_type.lower()}"
        assert f"rule 'broken_{op_type.lower()}', which rewrote the subgraph(s) of If node 'if'" in str(e.value)


# --------------------------------------------------------------------------- graft diff --check
def _model(body: str, out_shape: str = "1, 4", **consts) -> onnx.ModelProto:
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[{out_shape}] y) {{ r = Relu (x)
        {body} }}"""
    return with_initializers(onnx.parser.parse_model(text), **{k: np.asarray(v, np.float32) for k, v in consts.items()})


def test_diff_check_fails_on_disagreement_and_json_stays_strict(tmp_path):
    a = save(_model("y = Mul (r, c)", c=np.ones(4)), tmp_path / "a.onnx")
    cases = {
        "num": (_model("y = Mul (r, c)", c=np.full(4, 3.0)), None, "differs by max abs"),
        "nan": (_model("y = Div (r, c)", c=np.zeros(4)), "nonfinite", "has NaN/inf in one model"),  # 0/0
        "shape": (_model("y = ReduceSum <keepdims = 1> (r)", "1, 1"), "shape", "has shape [1, 1] in B, [1, 4] in A"),
    }
    for name, (model, problem, needle) in cases.items():
        b = save(model, tmp_path / f"{name}.onnx")
        r = CliRunner().invoke(main, ["diff", str(a), str(b), "--check", "--json"])
        one_line_error(r, needle)
        data = json.loads(r.stdout)  # strict JSON: no NaN/Infinity tokens
        (o,) = data["check"]["outputs"]
        assert o["problem"] == problem and o["within_atol"] is False and data["check"]["atol"] == 1e-4
        text = CliRunner(env={"COLUMNS": "160"}).invoke(main, ["diff", str(a), str(b), "--check"]).stdout
        verdict = {None: "DIFFERS (atol 0.0001)", "nonfinite": "NaN/inf DIFFER", "shape": "SHAPE DIFFERS"}[problem]
        assert verdict in text, text
    r = CliRunner().invoke(main, ["diff", str(a), str(tmp_path / "num.onnx"), "--check", "--atol", "10"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(main, ["diff", str(a), str(a), "--check"])
    assert r.exit_code == 0 and " ok" in r.stdout


# --------------------------------------------------------------------------- quiet runs, explain
def test_quiet_compile_still_warns_when_not_verified(tmp_path):
    from compile_models import custom_domain_model

    p = save(custom_domain_model(), tmp_path / "custom.onnx")
    r = invoke("compile", p, "-o", tmp_path / "o.onnx", "-q")
    assert r.exit_code == 0 and r.stdout == ""
    assert r.stderr.startswith("graft: warning: verification skipped: onnxruntime cannot load the input model")
    assert len(r.stderr.strip().splitlines()) == 1
    loop = rule_file(tmp_path, """
        x = Var("x")
        relu_forever = Rule("relu_forever", op.Relu(x), lambda op, m: op.Relu(m[x]))
        """, "loop.py")
    r = invoke("compile", save(conv_bn_model(), tmp_path / "s.onnx"), "-o", tmp_path / "o.onnx", "-q",
               "--rules", loop)
    assert r.exit_code == 0 and "graft: warning: iteration limit reached in optimize/user_rules" in r.stderr


def test_empty_output_path_and_explain_on_a_cycle(tmp_path, small_path):
    one_line_error(invoke("compile", small_path, "-o", ""), "give the path of the file to write")
    bad = tmp_path / "bad.py"
    bad.write_text("RULES = 5\n")
    r = invoke("rules", "--rules", bad)
    one_line_error(r, "RULES is int 5")
    assert r.stdout == ""  # no half listing before the error
    from compile_models import cycle_model

    p = save(cycle_model(), tmp_path / "cycle.onnx")
    one_line_error(invoke("explain", "remove_identity", p), "graph has a cycle: relu_a -> relu_b -> relu_a")


def test_rule_may_emit_contrib_ops_of_a_new_domain(tmp_path):
    """x * Sigmoid(x) -> com.microsoft QuickGelu(x, alpha=1): the model gains the opset import."""
    p = save(parse_model("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) { s = Sigmoid (x)
        y = Mul (x, s) }"""), tmp_path / "silu.onnx")
    silu = rule_file(tmp_path, """
        x = Var("x")
        silu = Rule("silu_to_quickgelu", op.Mul(x, op.Sigmoid(x)),
                    lambda op, m: op.domain("com.microsoft").QuickGelu(m[x], alpha=1.0))
        """, "silu.py")
    res = compile(str(p), pipeline="none", rules=str(silu))
    assert res.verification.status == "passed" and res.counts["silu_to_quickgelu"] == 1
    assert [(n.domain, n.op_type) for n in res.proto.graph.node] == [("com.microsoft", "QuickGelu")]
    assert {o.domain: o.version for o in res.proto.opset_import} == {"": 17, "com.microsoft": 1}
