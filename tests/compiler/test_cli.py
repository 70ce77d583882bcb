"""`graft compile` and `graft rules`: success paths, user rule files, and every kind of bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from graft.compiler.driver.cli import main
from compile_models import (DROP_MUL, INVALID_GRAPH, RAISES_AT_IMPORT, RAISES_IN_REWRITE, WRONG_DIV,
                            checker_failing_model, conv_bn_model, custom_domain_model, cycle_model, rule_file, save)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_RULE = REPO / "examples" / "custom_rule.py"


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env or {"GRAFT_DEBUG": ""})


@pytest.fixture
def small_path(tmp_path):
    return save(conv_bn_model(), tmp_path / "small.onnx")


def test_compile_writes_output_and_prints_summary(small_path, tmp_path):
    out = tmp_path / "out" / "small.opt.onnx"
    r = invoke("compile", small_path, "-o", out)
    assert r.exit_code == 0, r.output + r.stderr
    assert r.stderr == ""
    for piece in ("fold_batchnorm_into_conv", "nodes", "verified", f"wrote {out}"):
        assert piece in r.stdout, piece
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert [n.op_type for n in m.graph.node] == ["Conv", "Relu", "Div", "Mul"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.opt.onnx"]  # no temporary left
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600


def test_cli_writes_the_bytes_the_api_saves(small_path, tmp_path):
    """`graft compile` writes the serialization onnx.checker checked; it must equal a fresh save."""
    from graft.compiler import compile as graft_compile

    out = tmp_path / "cli.onnx"
    r = invoke("compile", small_path, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    res = graft_compile(str(small_path))
    res.save(tmp_path / "api.onnx")
    assert out.read_bytes() == (tmp_path / "api.onnx").read_bytes()
    res.proto.graph.node[0].name = "edited"  # save() serializes the proto as it is now
    res.save(tmp_path / "edited.onnx")
    assert onnx.load(str(tmp_path / "edited.onnx")).graph.node[0].name == "edited"


def test_compile_zoo_name_with_example_rule(tmp_path):
    out = tmp_path / "cls.onnx"
    r = invoke("compile", "ppocr-cls", "-o", out, "--rules", EXAMPLE_RULE, "-q")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    m = onnx.load(str(out))
    ops = [n.op_type for n in m.graph.node]
    assert "Div" not in ops and "BatchNormalization" not in ops
    made = [n for n in m.graph.node if {e.key: e.value for e in n.metadata_props}.get("graft.rule") == "div_to_mul"]
    assert len(made) == 18 and all(n.op_type == "Mul" for n in made)


def test_pipeline_none_runs_only_user_rules(small_path, tmp_path):
    out = tmp_path / "o.onnx"
    r = invoke("compile", small_path, "-o", out, "--pipeline", "none", "--rules", EXAMPLE_RULE)
    assert r.exit_code == 0, r.stderr
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops == ["Conv", "BatchNormalization", "Identity", "Relu", "Mul", "Mul"]
    assert "div_to_mul" in r.stdout and "fold_batchnorm" not in r.stdout


def test_dim_option_sets_generated_input_sizes(tmp_path):
    from conftest import parse_model

    p = save(parse_model("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[batch, seq] x) => (float[batch, seq] y) { i = Identity (x)
        y = Relu (i) }"""), tmp_path / "dyn.onnx")
    r = invoke("compile", p, "-o", tmp_path / "o.onnx", "--dim", "batch=3", "--dim", "seq=5")
    assert r.exit_code == 0, r.stderr
    assert "x[3, 5]" in r.stdout


def test_custom_domain_is_kept_and_verification_skipped(tmp_path):
    p = save(custom_domain_model(), tmp_path / "custom.onnx")
    out = tmp_path / "o.onnx"
    r = invoke("compile", p, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "verification skipped" in r.stdout and "my.domain" in r.stdout
    nodes = onnx.load(str(out)).graph.node
    assert [(n.domain, n.op_type) for n in nodes] == [("my.domain", "Scale"), ("", "Relu")]


def test_numeric_mismatch_blames_rule_and_no_verify_writes(small_path, tmp_path):
    rules = rule_file(tmp_path, WRONG_DIV)
    out = tmp_path / "o.onnx"
    r = invoke("compile", small_path, "-o", out, "--rules", rules)
    assert r.exit_code == 1 and not out.exists()
    assert "div_to_mul_wrong" in r.stderr and "--no-verify" in r.stderr
    assert "DIFFERS" in r.stdout  # the summary still shows the disagreement
    r = invoke("compile", small_path, "-o", out, "--rules", rules, "--no-verify")
    assert r.exit_code == 0 and out.exists()
    assert "numeric verification off" in r.stdout


def _bad_inputs(tmp_path: Path, small_path: Path) -> dict:
    """name → (argv after 'compile', text the error must contain)."""
    real = Path(__import__("graft.ir.zoo", fromlist=["zoo"]).ppocr_path("ppocr-cls")).read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(real[: len(real) // 2])
    (tmp_path / "notes.onnx").write_text("these are my notes, not a model\n")
    save(checker_failing_model(), tmp_path / "checker.onnx")
    save(cycle_model(), tmp_path / "cycle.onnx")
    return {
        "missing file": ([tmp_path / "nope.onnx"], "nope.onnx: no such file"),
        "truncated file": ([tmp_path / "trunc.onnx"], "trunc.onnx: not a readable ONNX model"),
        "text file": ([tmp_path / "notes.onnx"], "notes.onnx: not a readable ONNX model"),
        "checker": ([tmp_path / "checker.onnx"], "checker.onnx: fails onnx.checker: Node(bad_conv)"),
        "cycle": ([tmp_path / "cycle.onnx"], "cycle.onnx: graph has a cycle: relu_a -> relu_b -> relu_a"),
        "rule import": ([small_path, "--rules", rule_file(tmp_path, RAISES_AT_IMPORT, "imp.py")],
                        "imp.py:5: importing the rule file raised ZeroDivisionError"),
        "rule raises": ([small_path, "--rules", rule_file(tmp_path, RAISES_IN_REWRITE, "raises.py")],
                        "rule 'broken_relu'"),
        "invalid graph": ([small_path, "--rules", rule_file(tmp_path, INVALID_GRAPH, "invalid.py")],
                          "caused by rule 'relu_to_bad_conv'"),
        "wrong numbers": ([small_path, "--rules", rule_file(tmp_path, DROP_MUL, "drop.py")],
                          "rule 'drop_mul_wrong' is the first to diverge"),
        "unknown pipeline": ([small_path, "--pipeline", "optimise"], "no pipeline named 'optimise'"),
        "bad dim": ([small_path, "--dim", "batch"], "--dim batch: expected NAME=SIZE"),
        "missing rule file": ([small_path, "--rules", tmp_path / "none.py"], "none.py: no such rule file"),
        "same rule twice": ([small_path, "--rules", EXAMPLE_RULE, "--rules", EXAMPLE_RULE],
                            "rule 'div_to_mul'"),
    }


def test_bad_inputs_fail_cleanly(tmp_path, small_path):
    cases = _bad_inputs(tmp_path, small_path)
    for name, (args, needle) in cases.items():
        fresh = tmp_path / f"fresh_{len(name)}.onnx"
        r = invoke("compile", *args, "-o", fresh)
        assert r.exit_code == 1, (name, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("graft: error: "), (name, r.stderr)
        assert needle in lines[0], (name, lines[0])
        assert "Traceback" not in r.stderr + r.stdout, name
        assert not fresh.exists(), name
        existing = tmp_path / "existing.onnx"
        existing.write_bytes(b"KEEP ME")
        r = invoke("compile", *args, "-o", existing)
        assert r.exit_code == 1 and existing.read_bytes() == b"KEEP ME", name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_refuses_to_overwrite_input(small_path):
    before = small_path.read_bytes()
    r = invoke("compile", small_path, "-o", small_path)
    assert r.exit_code == 1 and "refusing to overwrite" in r.stderr
    assert small_path.read_bytes() == before


def test_graft_debug_shows_traceback(tmp_path):
    r = invoke("compile", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx", env={"GRAFT_DEBUG": "1"})
    assert r.exit_code == 1
    assert "graft: error:" in r.stderr
    small = save(conv_bn_model(), tmp_path / "s.onnx")
    r = invoke("compile", small, "-o", tmp_path / "o.onnx", "--rules", rule_file(tmp_path, RAISES_IN_REWRITE),
               env={"GRAFT_DEBUG": "1"})
    assert r.exit_code == 1 and "Traceback" in r.stderr and "ValueError: this rule is broken" in r.stderr


def test_rules_lists_builtins_and_pipelines():
    from graft import rules

    r = invoke("rules")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    for rule in rules.all_rules():
        line = next(ln for ln in lines if ln.split()[:1] == [rule.name])
        root = rule.roots[0]
        assert line.split()[1] == ("*" if root.is_wildcard else
                                   f"{root.domain}::{root.op_type}" if root.domain else root.op_type)
    assert any(ln.split()[:1] == ["fold_batchnorm_into_conv"] and "BatchNormalization" in ln for ln in lines)
    assert "pipelines:" in lines
    opt = next(ln for ln in lines if ln.split()[:1] == ["optimize"])
    assert "cleanup → fold_batchnorm → fuse → cleanup" in opt
    r = invoke("rules", "--rules", EXAMPLE_RULE)
    assert r.exit_code == 0 and any(ln.split()[:2] == ["div_to_mul", "Div"] for ln in r.stdout.splitlines())


def test_console_script_in_a_real_process(tmp_path):
    """The installed `graft` script: success, a one-line error with exit 1, and no torch import."""
    graft = Path(sys.executable).with_name("graft")
    small = save(conv_bn_model(), tmp_path / "s.onnx")
    env = {k: v for k, v in os.environ.items() if k != "GRAFT_DEBUG"}
    ok = subprocess.run([str(graft), "compile", str(small), "-o", str(tmp_path / "o.onnx")],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and (tmp_path / "o.onnx").exists()
    for closed in (">&-", "2>&-"):  # a closed standard stream is not an error (Python sets it to None)
        quiet = subprocess.run(["bash", "-c", f'"$0" compile "$1" -o "$2" -q {closed}', str(graft), str(small),
                                str(tmp_path / "c.onnx")], capture_output=closed == "2>&-", env=env, timeout=120)
        assert quiet.returncode == 0, quiet
        onnx.checker.check_model(onnx.load(str(tmp_path / "c.onnx")), full_check=True)
    # stdout that cannot take the summary: a reader that left (exit 1 without a word, as rich and click
    # do on a broken pipe; the file is written) or a full disk (one line)
    gone = subprocess.run(["bash", "-c", '"$0" compile "$1" -o "$2" | true; exit ${PIPESTATUS[0]}', str(graft),
                           str(small), str(tmp_path / "gone.onnx")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert gone.returncode == 1 and gone.stderr == "" and (tmp_path / "gone.onnx").exists(), gone
    if os.path.exists("/dev/full"):
        full = subprocess.run(["bash", "-c", '"$0" compile "$1" -o "$2" > /dev/full', str(graft), str(small),
                               str(tmp_path / "full.onnx")], capture_output=True, text=True, env=env, timeout=120)
        assert full.returncode == 1 and full.stderr.count("\n") == 1, full
        assert "could not print the summary (No space left on device)" in full.stderr
        assert (tmp_path / "full.onnx").exists()
    bad = subprocess.run([str(graft), "compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("graft: error: ")
    code = ("import sys; from graft.compiler.driver.cli import main\n"
            f"try: main(['compile', {str(small)!r}, '-o', {str(tmp_path / 'p.onnx')!r}, '-q'])\n"
            "except SystemExit as e: assert e.code == 0, e.code\n"
            "print('torch' in sys.modules)")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "False"


def test_example_compile_real_model_runs(tmp_path, capsys):
    import runpy

    example = runpy.run_path(str(REPO / "examples" / "compile_real_model.py"), run_name="example")
    out = tmp_path / "cls.onnx"
    assert example["main"](["compile_real_model.py", "ppocr-cls", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fold_batchnorm_into_conv" in text and "verified" in text and f"wrote {out}" in text
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_example_custom_rule_is_short_and_loads():
    from graft.compiler.driver.user_rules import load_rule_file

    assert len(EXAMPLE_RULE.read_text().splitlines()) <= 15
    assert [r.name for r in load_rule_file(EXAMPLE_RULE)] == ["div_to_mul"]


def test_internal_errors_are_one_line_too(tmp_path, small_path, monkeypatch):
    import graft.compiler.driver.api

    def broken(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'graph'")

    monkeypatch.setattr(graft.compiler.driver.api, "compile", broken)
    r = invoke("compile", small_path, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 1 and not (tmp_path / "o.onnx").exists()
    assert r.stderr.count("\n") == 1
    assert "internal error AttributeError" in r.stderr and "GRAFT_DEBUG=1" in r.stderr


def test_python_dash_m_graft_is_the_cli(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "graft", "rules"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "fold_batchnorm_into_conv" in r.stdout and "optimize" in r.stdout
