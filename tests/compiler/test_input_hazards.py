"""`graft compile` never destroys what it reads, leaves nothing behind when killed while writing,
and reports bad inputs in one line naming the file, input or tensor (issue 9, parts 5 and 6)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from compile_models import REMOVE_MUL_ONE, conv_bn_model, rule_file, save
from graft.compiler.driver.api import compile
from graft.compiler.driver.cli import main
from graft.compiler.driver.user_rules import UserRuleFileError, load_rule_file
from graft.ir.onnx_io import ModelLoadError, exit_on_signals


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"GRAFT_DEBUG": ""})


def one_line_error(r, *needles: str) -> str:
    """The single ``graft: error:`` line of a failed run, holding every needle; exit 1, no traceback."""
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0]


@pytest.fixture
def model(tmp_path):
    return save(conv_bn_model(), tmp_path / "m.onnx")


def one_input_calibration(path: Path) -> Path:
    np.savez(path, x=np.random.default_rng(0).normal(size=(4, 1, 3, 8, 8)).astype(np.float32))
    return path


# --------------------------------------------------------------------------- -o names an input
def test_output_may_not_be_a_rule_file(model, tmp_path):
    rules = rule_file(tmp_path, REMOVE_MUL_ONE)
    before = rules.read_bytes()
    line = one_line_error(invoke("compile", model, "-o", rules, "--rules", rules), "--rules file", str(rules))
    assert "refusing to overwrite" in line
    assert rules.read_bytes() == before


def test_output_may_not_be_the_calibration_data(model, tmp_path):
    calib = one_input_calibration(tmp_path / "calib.npz")
    before = calib.read_bytes()
    one_line_error(invoke("compile", model, "-o", calib, "--quantize", "static", "--calibration", calib),
                   "--calibration file", str(calib))
    assert calib.read_bytes() == before


def test_output_may_not_be_a_file_of_the_calibration_folder(model, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    npy = folder / "x.npy"
    np.save(npy, np.zeros((1, 3, 8, 8), np.float32))
    before = npy.read_bytes()
    one_line_error(invoke("compile", model, "-o", npy, "--quantize", "static", "--calibration", folder),
                   "--calibration file", str(npy))
    assert npy.read_bytes() == before


def test_output_may_not_be_the_prune_calibration_data(model, tmp_path):
    calib = one_input_calibration(tmp_path / "taylor.npz")
    before = calib.read_bytes()
    one_line_error(invoke("compile", model, "-o", calib, "--prune", "0.5", "--prune-criterion", "taylor",
                          "--prune-calibration", calib), "--prune-calibration file", str(calib))
    assert calib.read_bytes() == before


def test_output_may_not_reach_a_rule_file_through_a_symlink_or_a_hardlink(model, tmp_path):
    rules = rule_file(tmp_path, REMOVE_MUL_ONE)
    before = rules.read_bytes()
    sym, hard = tmp_path / "sym.py", tmp_path / "hard.py"
    sym.symlink_to(rules)
    os.link(rules, hard)
    for out in (sym, hard):
        one_line_error(invoke("compile", model, "-o", out, "--rules", rules), "--rules file")
        assert rules.read_bytes() == before
    # and the other way round: the rule file given through the link, -o naming the file itself
    one_line_error(invoke("compile", model, "-o", rules, "--rules", hard), "--rules file")
    assert rules.read_bytes() == before


def test_output_may_not_be_the_torch_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "hazard_factory_mod.py"
    src.write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 2)\n")
    before = src.read_bytes()
    one_line_error(invoke("compile", "--torch", "hazard_factory_mod:make", "--input-shape", "1x4", "-o", src),
                   "--torch module file", "hazard_factory_mod.py")
    assert src.read_bytes() == before


def test_output_may_not_be_a_package_init_above_the_torch_module(tmp_path, monkeypatch):
    """`--torch pkg.mod:make` imports pkg/__init__.py too: -o may not name it either."""
    monkeypatch.chdir(tmp_path)
    pkg = tmp_path / "hazard_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("# the package\n")
    (pkg / "mod.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 2)\n")
    before = (pkg / "__init__.py").read_bytes()
    one_line_error(invoke("compile", "--torch", "hazard_pkg.mod:make", "--input-shape", "1x4", "-o",
                          pkg / "__init__.py"), "--torch module file", "__init__.py")
    assert (pkg / "__init__.py").read_bytes() == before


def test_output_may_not_reach_the_model_through_a_missing_folder_and_dotdot(model, tmp_path):
    """`-o missing/../m.onnx` does not exist for the kernel until the save creates `missing`, and
    then it is the input model."""
    before = model.read_bytes()
    out = f"{tmp_path}/missing/../{model.name}"
    one_line_error(invoke("compile", model, "-o", out), "is the input model")
    assert model.read_bytes() == before
    assert not (tmp_path / "missing").exists()


def test_output_data_file_may_not_be_an_input(model, tmp_path):
    """A large output writes its tensors to OUT.data: that file may not be one the command reads."""
    rules = rule_file(tmp_path, REMOVE_MUL_ONE, name="r.onnx.data")
    before = rules.read_bytes()
    one_line_error(invoke("compile", model, "-o", tmp_path / "r.onnx", "--rules", rules),
                   "tensor file", "--rules file")
    assert rules.read_bytes() == before
    assert not (tmp_path / "r.onnx").exists()


def test_the_check_runs_before_any_work(model, tmp_path):
    """A rule file that cannot even be imported is not read: the -o refusal comes first."""
    rules = tmp_path / "broken.py"
    rules.write_text("this is not python (\n")
    before = rules.read_bytes()
    one_line_error(invoke("compile", model, "-o", rules, "--rules", rules), "--rules file")
    assert rules.read_bytes() == before


# --------------------------------------------------------------------------- signals while writing
# Runs `graft compile` in a child process whose os.replace (the rename that publishes the
# output) first signals readiness and sleeps: the signal then arrives with the temporary file
# complete on disk, at the moment a real write of a large model is most exposed.
_CHILD = textwrap.dedent("""
    import os, sys, time
    ready, argv = sys.argv[1], sys.argv[2:]
    real_replace = os.replace

    def slow_replace(src, dst, *a, **k):
        if str(src).endswith(".tmp"):
            open(ready, "w").close()
            time.sleep(60)
        return real_replace(src, dst, *a, **k)

    os.replace = slow_replace
    from graft.compiler.driver.cli import main
    main(argv)
""")


def _kill_during_write(tmp_path: Path, sig: int, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(ready), "compile", *args, "-o",
                             str(out_dir / "model.out"), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "GRAFT_DEBUG": ""})
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never reached the write"
        time.sleep(0.05)
    assert any(p.name.endswith(".tmp") for p in out_dir.iterdir())  # the temporary file is there now
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out_dir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_during_the_write_leaves_no_temporary_file(tmp_path, model, sig):
    r, out_dir = _kill_during_write(tmp_path, sig, str(model))
    assert r.returncode == 128 + sig, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert list(out_dir.iterdir()) == []  # neither the temporary file nor a partial output


def test_a_signal_during_a_torch_target_write_leaves_no_temporary_file(tmp_path, model):
    r, out_dir = _kill_during_write(tmp_path, signal.SIGTERM, str(model), "--target", "torch")
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr)
    assert list(out_dir.iterdir()) == []


def test_exit_on_signals_takes_over_only_default_handlers_and_restores_them():
    def mine(signum, frame):
        pass

    old_term, old_hup = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, mine)
        with exit_on_signals():
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, mine)
            assert signal.getsignal(signal.SIGHUP) is mine  # a host program's handler stays
            with pytest.raises(SystemExit) as e:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs at the next bytecode boundary
            assert e.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is mine
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)


# --------------------------------------------------------------------------- one-line messages
def test_torch_module_with_a_syntax_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hazard_syntax_mod.py").write_text("import torch\n\ndef make(:\n    pass\n")
    one_line_error(invoke("compile", "--torch", "hazard_syntax_mod:make", "--input-shape", "1x4",
                          "-o", tmp_path / "o.onnx"), "hazard_syntax_mod.py:3", "SyntaxError")
    assert not (tmp_path / "o.onnx").exists()


def test_torch_module_that_raises_on_import(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hazard_raise_mod.py").write_text("x = 1\nraise RuntimeError('no GPU here')\n")
    one_line_error(invoke("compile", "--torch", "hazard_raise_mod:make", "--input-shape", "1x4",
                          "-o", tmp_path / "o.onnx"),
                   "hazard_raise_mod.py:2", "RuntimeError: no GPU here")
    assert not (tmp_path / "o.onnx").exists()


def test_torch_module_importing_a_missing_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hazard_missing_mod.py").write_text("import graft_no_such_package_xyz\n")
    line = one_line_error(invoke("compile", "--torch", "hazard_missing_mod:make", "-o", tmp_path / "o.onnx"),
                          "hazard_missing_mod.py:1", "graft_no_such_package_xyz")
    assert "run graft from the directory" not in line  # the module was found; its import is what failed


@pytest.mark.parametrize("what", ["random bytes", "truncated archive"])
def test_unreadable_npz_calibration_names_the_file(model, tmp_path, what):
    calib = tmp_path / "calib.npz"
    if what == "random bytes":
        calib.write_bytes(np.random.default_rng(0).bytes(1000))
    else:
        one_input_calibration(calib)
        calib.write_bytes(calib.read_bytes()[:-100])
    out = tmp_path / "o.onnx"
    line = one_line_error(invoke("compile", model, "-o", out, "--quantize", "static", "--calibration", calib),
                          str(calib), "not a readable numpy file")
    assert "internal error" not in line and "report it" not in line
    assert not out.exists()


def test_corrupt_npy_in_a_calibration_folder_names_the_file(model, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((1, 3, 8, 8), np.float32))
    (folder / "b.npy").write_bytes((folder / "a.npy").read_bytes()[:60])
    out = tmp_path / "o.onnx"
    line = one_line_error(invoke("compile", model, "-o", out, "--quantize", "static", "--calibration", folder),
                          str(folder / "b.npy"))
    assert "internal error" not in line
    assert not out.exists()


def test_unreadable_prune_calibration_names_the_file(tmp_path):
    from conftest import with_initializers

    rng = np.random.default_rng(0)
    m = with_initializers(onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w1)
            r = Relu (c)
            y = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (r, w2)
        }'''), w1=rng.normal(size=(8, 3, 3, 3)).astype(np.float32), w2=rng.normal(size=(4, 8, 3, 3)).astype(np.float32))
    path = save(m, tmp_path / "p.onnx")
    calib = tmp_path / "t.npz"
    calib.write_bytes(rng.bytes(500))
    line = one_line_error(invoke("compile", path, "-o", tmp_path / "o.onnx", "--prune", "0.5", "--prune-criterion",
                                 "taylor", "--prune-calibration", calib), "--prune", str(calib))
    assert "--quantize" not in line


def test_short_external_data_file_names_the_file_and_tensor(tmp_path):
    """One file per tensor without a ``length`` key: onnx reads each file to its end, so a file
    cut short loads without complaint and only failed later, blamed on a rule."""
    path = tmp_path / "ext.onnx"
    onnx.save_model(conv_bn_model(), str(path), save_as_external_data=True, size_threshold=0,
                    all_tensors_to_one_file=False)
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        keep = [(e.key, e.value) for e in t.external_data if e.key != "length"]
        del t.external_data[:]
        for k, v in keep:
            t.external_data.add(key=k, value=v)
    onnx.save_model(m, str(path))
    data = tmp_path / "w"  # onnx names each file after its tensor: w is the 4x3x3x3 float weight
    data.write_bytes(data.read_bytes()[:200])
    out = tmp_path / "o.onnx"
    line = one_line_error(invoke("compile", path, "-o", out), str(data), "tensor 'w'", "needs 432 bytes",
                          "200 were read")
    assert "rule" not in line
    assert not out.exists()


def test_truncated_shared_external_data_file_is_named(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save_model(conv_bn_model(), str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0, all_tensors_to_one_file=True)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:200])
    out = tmp_path / "o.onnx"
    one_line_error(invoke("compile", path, "-o", out), f"cannot read its external data from {data}")
    assert not out.exists()


def _relu(x: onnx.ValueInfoProto, y: onnx.ValueInfoProto) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", [x.name], [y.name])], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _no_elem_type(name: str) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto(name=name)
    vi.type.tensor_type.SetInParent()
    return vi


@pytest.mark.parametrize("x, y, named", [
    (onnx.ValueInfoProto(name="pixels"), helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
     "graph input 'pixels' has no type"),
    (_no_elem_type("pixels"), helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
     "graph input 'pixels' has no element type"),
    (helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [2]), onnx.ValueInfoProto(name="scores"),
     "graph output 'scores' has no type"),
    (helper.make_tensor_value_info("pixels", TensorProto.FLOAT, None), helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [2]), "graph input 'pixels' has no shape"),
], ids=["input without type", "input without element type", "output without type", "input without shape"])
def test_graph_input_or_output_without_a_type_is_named(tmp_path, x, y, named):
    path = tmp_path / "untyped.onnx"
    onnx.save_model(_relu(x, y), str(path))
    out = tmp_path / "o.onnx"
    one_line_error(invoke("compile", path, "-o", out), str(path), named)
    assert not out.exists()
    with pytest.raises(ModelLoadError, match=f"input model: {named}"):
        compile(_relu(x, y))


@pytest.mark.parametrize("statement, new", [
    ("from compiler import Rule, Var, op", "from graft.compiler import Rule, Var, op"),
    ("import ir", "from graft import ir"),
    ("from rules.fold_batchnorm import RULES", "from graft.rules.fold_batchnorm import RULES"),
    ("import compiler.engine as eng", "import graft.compiler.engine as eng"),
    # modules of the old compiler package moved into its layers: the hint names where they are now
    ("from compiler.pattern import Var", "from graft.compiler.engine.pattern import Var"),
    ("import compiler.passes as ps", "import graft.compiler.engine.passes as ps"),
    ("from compiler.api import compile", "from graft.compiler.driver.api import compile"),
])
def test_rule_file_with_the_old_import_names(model, tmp_path, monkeypatch, statement, new):
    rules = tmp_path / "old_rules.py"
    rules.write_text(f"import numpy as np\n{statement}\n")
    out = tmp_path / "o.onnx"
    # from anywhere but a source checkout the old names do not resolve at all (here the repository
    # and its tests/ folder, which holds an ir/ folder, are on sys.path: take them off)
    repo = os.path.realpath(Path(__file__).parents[2])
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not os.path.realpath(p or ".").startswith(repo)])
    for name in ("compiler", "ir", "rules"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke("compile", model, "-o", out, "--rules", rules), f"{rules}:2", f"`{new}`",
                          "moved into the graft package")
    assert not out.exists()
    assert line


def test_old_import_names_are_refused_from_a_source_checkout_too(monkeypatch, tmp_path):
    """In graft's source folder `import compiler` finds the folder itself (a second copy of graft
    under the old name); the rule file gets the same one-line error as anywhere else."""
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.syspath_prepend(str(repo))
    rules = tmp_path / "old_rules.py"
    rules.write_text("from compiler import Rule, Var, op\nx = Var('x')\nr = Rule('r', op.Relu(x), lambda op, m: m[x])\n")
    with pytest.raises(UserRuleFileError, match=r"old_rules.py:1: the module 'compiler' moved .*"
                                                r"`from graft.compiler import Rule, Var, op`"):
        load_rule_file(rules)
