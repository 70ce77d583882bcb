"""`graft explain RULE MODEL`: matches with their bindings, nearest misses with reasons, rule lookup."""
from __future__ import annotations

import textwrap

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from graft import ir
from graft.compiler import explain
from graft.compiler.driver.cli import main
from graft.rules.fold_batchnorm import fold_batchnorm_into_conv
from conftest import with_initializers

RULE = "fold_batchnorm_into_conv"


def _run(*args):
    # wide enough that no table cell wraps: the assertions read whole reasons
    return CliRunner(env={"COLUMNS": "250"}).invoke(main, ["explain", *map(str, args)])


@pytest.fixture(scope="module")
def miss_model(tmp_path_factory):
    """Two BNs the rule must refuse: one whose Conv output is also read by a Relu (it escapes the
    pattern), one that follows a Relu instead of a Conv."""
    rng = np.random.default_rng(0)
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] c2, float[1,4,8,8] z) {
          c = Conv <pads=[1,1,1,1]> (x, w)
          y = BatchNormalization (c, s, b, m, v)
          c2 = Relu (c)
          x2 = Conv <pads=[1,1,1,1]> (x, w2)
          r = Relu (x2)
          z = BatchNormalization (r, s, b, m, v)
        }""")
    f32 = np.float32
    with_initializers(m, w=rng.standard_normal((4, 3, 3, 3)).astype(f32),
                      w2=rng.standard_normal((4, 3, 3, 3)).astype(f32), s=rng.random(4).astype(f32) + 0.5,
                      b=rng.standard_normal(4).astype(f32), m=rng.standard_normal(4).astype(f32),
                      v=rng.random(4).astype(f32) + 0.5)
    path = tmp_path_factory.mktemp("explain") / "bn_misses.onnx"
    onnx.save(m, str(path))
    return path


def test_api_finds_all_35_folds(ppocr_cls_path):
    hits, misses = explain(ir.load(ppocr_cls_path), fold_batchnorm_into_conv)
    assert (len(hits), len(misses)) == (35, 0)
    assert {m.root.op_type for m in hits} == {"BatchNormalization"}
    assert all(m.conv.op_type == "Conv" for m in hits)


def test_cli_lists_matches_with_bound_values(ppocr_cls_path):
    res = _run(RULE, ppocr_cls_path, "--max", "3")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "35 BatchNormalization nodes tried; 35 match, 0 miss" in out
    assert "pattern: BatchNormalization(Conv(x, w, b?), gamma, beta, mean, var)" in out
    assert "matches (35)" in out and "… and 32 more" in out
    # the first match: node names and the values each pattern variable bound
    assert "bn=BatchNormalization@0" in out and "conv=Conv@0" in out
    assert "x=x, w=conv1_weights, b=-, gamma=conv1_bn_scale, beta=conv1_bn_offset, mean=conv1_bn_mean, " \
           "var=conv1_bn_variance" in out
    assert "nearest misses" not in out


def test_cli_nearest_misses_with_reasons(miss_model):
    res = _run(RULE, miss_model)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "2 BatchNormalization nodes tried; 0 match, 2 miss" in out
    lines = [ln for ln in out.splitlines() if ln.lstrip()[:2] in ("1 ", "2 ")]
    assert len(lines) == 2
    # nearest first: the escaping Conv matched the whole pattern, then was refused
    assert lines[0].lstrip().startswith("1 ") and "2/2, refused" in lines[0]
    assert "output 'c' of Conv node (output 'c') is also used by Relu node (output 'c2') outside the " \
           "pattern" in lines[0]
    assert "Conv (output 'c')" in lines[0]
    assert "1/2 pattern nodes" in lines[1]
    assert "pattern wants Conv here, found Relu (output 'r')" in lines[1]
    assert lines[1].rstrip().endswith("Relu (output 'r')")


def test_cli_rule_from_file(tmp_path, miss_model):
    rules_py = tmp_path / "my_rules.py"
    rules_py.write_text(textwrap.dedent("""
        from graft.compiler import Rule, Var, op

        x = Var("x")
        relu_after_conv = Rule("relu_after_conv", op.Relu(op.Conv(x, Var("w"), name="conv"), name="relu"),
                               lambda op, m: op.Relu(m[x]))
    """))
    res = _run("relu_after_conv", miss_model, "--rules", rules_py)
    assert res.exit_code == 0, res.output
    assert "2 Relu nodes tried; 1 match, 1 miss" in res.stdout
    # r = Relu(x2) matches; c2 = Relu(c) does not: c is also read by a BatchNormalization
    assert "relu=(output 'r')" in res.stdout and "conv=(output 'x2')" in res.stdout and "x=x, w=w2" in res.stdout
    assert "output 'c' of Conv node (output 'c') is also used by BatchNormalization node (output 'y')" \
        in res.stdout
    # a built-in rule is still found when --rules is given
    res = _run(RULE, miss_model, "--rules", rules_py)
    assert res.exit_code == 0 and "0 match, 2 miss" in res.stdout


def test_cli_unknown_rule_names_close_ones(tmp_path, ppocr_cls_path):
    res = _run("fold_batchnorm_into_cnov", ppocr_cls_path)
    assert res.exit_code == 1
    assert "no built-in rule named 'fold_batchnorm_into_cnov'" in res.stderr
    assert "did you mean" in res.stderr and RULE in res.stderr
    assert "Traceback" not in res.output
    rules_py = tmp_path / "r.py"
    rules_py.write_text("from graft.compiler import Rule, Var, op\n"
                        "x = Var('x')\n"
                        "mine = Rule('my_relu', op.Relu(x), lambda op, m: op.Relu(m[x]))\n")
    res = _run("my_rleu", ppocr_cls_path, "--rules", rules_py)
    assert res.exit_code == 1
    assert f"no rule named 'my_rleu' in {rules_py} (it defines my_relu)" in res.stderr
    assert "did you mean my_relu" in res.stderr


def test_cli_bad_inputs_are_one_line_errors(tmp_path, ppocr_cls_path):
    res = _run(RULE, tmp_path / "missing.onnx")
    assert res.exit_code == 1 and "missing.onnx: no such file" in res.stderr
    bad = tmp_path / "bad_rules.py"
    bad.write_text("from graft.compiler import Rule\n\ndef broken(:\n")
    res = _run(RULE, ppocr_cls_path, "--rules", bad)
    assert res.exit_code == 1 and f"{bad}:3" in res.stderr and "SyntaxError" in res.stderr
    raising = tmp_path / "raising.py"
    raising.write_text("from graft.compiler import Rule, Var, op\n"
                       "x = Var('x')\n"
                       "def check(m):\n"
                       "    raise ValueError('boom')\n"
                       "r = Rule('raising_check', op.Relu(x), lambda op, m: op.Relu(m[x]), check=check)\n")
    res = _run("raising_check", ppocr_cls_path, "--rules", raising)
    assert res.exit_code == 1
    assert "rule 'raising_check'" in res.stderr and "check raised ValueError: boom" in res.stderr
    assert "Traceback" not in res.output
