"""graft.compiler.driver.diff / `graft diff`: node matching, rule provenance, op and parameter deltas, CLI."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graft import ir
from graft.compiler import Const, Rule, Var, op, rewrite
from graft.compiler.driver.cli import main
from graft.compiler.driver.diff import diff_models
from graft.rules.fold_batchnorm import fold_batchnorm_into_conv

RULE = "fold_batchnorm_into_conv"


# --------------------------------------------------------------------------- ppocr-cls, BN folded
@pytest.fixture(scope="module")
def cls_a(ppocr_cls_path):
    return onnx.load(str(ppocr_cls_path))


@pytest.fixture(scope="module")
def cls_b(cls_a):
    model = ir.from_onnx(cls_a)
    res = rewrite(model, [fold_batchnorm_into_conv])
    assert res.counts[RULE] == 35
    return ir.to_onnx(model)


@pytest.fixture(scope="module")
def cls_diff(cls_a, cls_b):
    return diff_models(cls_a, cls_b)


@pytest.fixture(scope="module")
def cls_files(tmp_path_factory, cls_a, cls_b):
    d = tmp_path_factory.mktemp("diff")
    a, b = d / "cls.onnx", d / "cls.folded.onnx"
    onnx.save(cls_a, str(a))
    onnx.save(cls_b, str(b))
    return a, b


def _folded_pairs(proto):
    """(BN node, Conv node) for each BN whose input is a Conv output: computed from the proto alone."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    return [(n, producer[n.input[0]]) for n in proto.graph.node
            if n.op_type == "BatchNormalization" and producer[n.input[0]].op_type == "Conv"]


def _constant_elements(proto) -> int:
    return sum(numpy_helper.to_array(a.t).size for n in proto.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value")


def test_model_against_itself_is_empty(cls_a, cls_b):
    for m in (cls_a, cls_b):  # B carries provenance; matched nodes are not "created" again
        d = diff_models(m, m)
        assert d.identical
        assert d.removed == [] and d.added == [] and d.changed == [] and d.data["rules"] == []
        assert all(r["delta"] == 0 for r in d.data["ops"])
        assert d.data["a"] == d.data["b"]
        assert d.data["nodes"]["unchanged"] == len(m.graph.node)
        assert "identical" in d.to_text()


def test_fold_batchnorm_op_counts(cls_a, cls_b, cls_diff):
    ca = Counter(n.op_type for n in cls_a.graph.node)
    cb = Counter(n.op_type for n in cls_b.graph.node)
    assert cls_diff.op_delta("BatchNormalization") == -35
    assert cls_diff.op_delta("Constant") == -175  # 35 Conv weights + 35 × 4 BN statistics
    assert cls_diff.op_delta("Conv") == 0
    assert {r["op"]: (r["a"], r["b"]) for r in cls_diff.data["ops"]} == \
        {k: (ca[k], cb[k]) for k in ca | cb}
    assert [r["op"] for r in cls_diff.data["ops"]] == sorted(ca | cb)
    assert (cls_diff.data["a"]["nodes"], cls_diff.data["b"]["nodes"]) == (566, 356)


def test_fold_batchnorm_grouped_by_rule(cls_a, cls_diff):
    pairs = _folded_pairs(cls_a)
    assert len(pairs) == 35
    entry = cls_diff.rules[RULE]
    assert list(cls_diff.rules) == [RULE]
    assert entry["rewrites"] == 35
    assert entry["created"] == {"Conv": 35}
    assert entry["replaced"] == {"BatchNormalization": 35, "Conv": 35}
    assert set(entry["replaced_nodes"]) == {n.name for p in pairs for n in p}
    assert entry["intermediate"] == []
    # the folded Conv's weight and BN's 4 statistics were Constant nodes read by nothing else
    stat_inputs = {i for bn, conv in pairs for i in (*bn.input[1:], *conv.input[1:])}
    assert entry["dropped"] == {"Constant": 175}
    assert set(entry["dropped_nodes"]) == stat_inputs
    assert len(entry["created_initializers"]) == 70  # new weight + bias per Conv
    # every removed node is explained by the rule; every added node has its provenance
    assert Counter((n["rule"], n["how"]) for n in cls_diff.removed) == \
        {(RULE, "replaced"): 70, (RULE, "dropped"): 175}
    assert Counter((n["op"], n["rule"]) for n in cls_diff.added) == {("Conv", RULE): 35}


def test_fold_batchnorm_keeps_value_names(cls_a, cls_b, cls_diff):
    # The folded Conv's output inherits the BN output's name, so no reader changes.
    pairs = _folded_pairs(cls_a)
    bn_outs = {bn.output[0] for bn, _ in pairs}
    producers = {o: n for n in cls_b.graph.node for o in n.output}
    assert all(producers[o].op_type == "Conv" for o in bn_outs)
    assert all(dict((p.key, p.value) for p in producers[o].metadata_props)["graft.rule"] == RULE
               for o in bn_outs)
    assert cls_diff.rules[RULE]["rewired"] == 0
    assert cls_diff.changed == []


def test_fold_batchnorm_parameters(cls_a, cls_b, cls_diff):
    pairs = _folded_pairs(cls_a)
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in cls_a.graph.node
              if n.op_type == "Constant"}
    # per fold: BN's 4 statistics (C each) go; a bias (C) is added where the Conv had none
    delta = sum(-4 * consts[bn.input[1]].size + (consts[bn.input[1]].size if len(conv.input) < 3 else 0)
                for bn, conv in pairs)
    a, b = cls_diff.data["a"], cls_diff.data["b"]
    assert a["parameters"] == _constant_elements(cls_a) == 133_777
    assert b["parameters"] == a["parameters"] + delta == 127_369
    assert b["parameters"] == _constant_elements(cls_b) + sum(
        numpy_helper.to_array(t).size for t in cls_b.graph.initializer)
    const_bytes = sum(numpy_helper.to_array(x.t).nbytes for n in cls_a.graph.node if n.op_type == "Constant"
                      for x in n.attribute)
    assert a["bytes"] == const_bytes == 535_412
    assert b["bytes"] == a["bytes"] + 4 * delta  # the folded tensors are float32
    assert (a["initializers"], b["initializers"]) == (0, 70)
    assert (a["constant_nodes"], b["constant_nodes"]) == (308, 133)
    assert cls_diff.data["initializers"]["added"] == [t.name for t in cls_b.graph.initializer]


def test_rule_made_initializers_carry_provenance(cls_a, cls_b):
    first_bn, first_conv = _folded_pairs(cls_a)[0]
    meta = {t.name: {e.key: e.value for e in t.metadata_props} for t in cls_b.graph.initializer}
    assert len(meta) == 70
    assert all(m["graft.rule"] == RULE for m in meta.values())
    assert meta[f"{first_conv.input[1]}_folded"]["graft.replaced"] == f"{first_bn.name},{first_conv.name}"
    onnx.checker.check_model(cls_b, full_check=True)


def test_optimize_pipeline_is_explained_by_its_rules(cls_a):
    """Real pipeline: Constants become initializers, BNs fold, constants fold: each removal has a rule."""
    from graft.rules.pipelines import get_pipeline

    res = get_pipeline("optimize").run(ir.from_onnx(cls_a))
    b = ir.to_onnx(res.model)
    d = diff_models(cls_a, b)
    counts = res.stats.counts
    for name, entry in d.rules.items():
        assert entry["rewrites"] <= counts[name]
    assert d.rules[RULE]["rewrites"] == counts[RULE] == 35
    c2i = d.rules["constant_to_initializer"]
    assert c2i["created"] == {} and len(c2i["created_initializers"]) == c2i["rewrites"] > 0
    assert set(c2i["replaced"]) == {"Constant"}
    constants = [n for n in d.removed if n["op"] == "Constant"]
    assert len(constants) == 308 and all(n["rule"] for n in constants)
    # only rules that create nothing (they rewire readers to an existing value) leave no trace
    unexplained = {n["op"] for n in d.removed if not n["rule"]}
    assert unexplained <= {"Identity", "Reshape", "Cast", "Transpose", "Dropout", "CastLike"}


def test_check_runs_both_models(cls_a, cls_b):
    d = diff_models(cls_a, cls_b, check=True)
    (out,) = d.data["check"]["outputs"]
    assert out["output"] == out["output_b"] == cls_a.graph.output[0].name
    assert out["shape"] == [2, 2]
    assert out["max_abs"] < 1e-5 and out["cosine"] > 0.99999
    assert d.data["check"]["error"] is None
    assert d.data["check"]["inputs"] == {"x": [2, 3, 2, 2]}  # symbolic dims default to 2
    assert "output agreement (onnxruntime; generated inputs x[2,3,2,2])" in d.to_text()
    d = diff_models(cls_a, cls_b, check=True, dim_sizes={"?": 48})
    assert d.data["check"]["inputs"] == {"x": [2, 3, 48, 48]}
    assert d.data["check"]["outputs"][0]["max_abs"] < 1e-5


def test_json_schema(cls_diff):
    data = json.loads(json.dumps(cls_diff.to_json(), allow_nan=False))
    assert set(data) == {"schema", "a", "b", "identical", "ops", "nodes", "rules", "io", "initializers", "check"}
    assert data["schema"] == "graft.diff/1"
    assert set(data["a"]) == {"name", "nodes", "parameters", "bytes", "initializers", "constant_nodes"}
    assert set(data["nodes"]) == {"unchanged", "removed", "added", "changed"}
    assert set(data["nodes"]["removed"][0]) == {"graph", "name", "op", "outputs", "rule", "how"}
    assert set(data["nodes"]["added"][0]) == {"graph", "name", "op", "outputs", "rule"}
    assert data["nodes"]["changed"] == []  # folded values keep their names: no reader changes
    assert set(data["rules"][0]) == {"rule", "rewrites", "created", "replaced", "dropped", "rewired",
                                     "created_nodes", "replaced_nodes", "dropped_nodes", "created_initializers",
                                     "dropped_initializers", "intermediate"}
    assert set(data["io"]) == {"inputs", "outputs"}
    assert set(data["io"]["inputs"]) == {"removed", "added", "changed"}
    assert data["check"] is None


def test_text_is_short_and_deterministic(cls_a, cls_b, cls_diff):
    text = cls_diff.to_text()
    assert text == diff_models(cls_a, cls_b).to_text()
    assert RULE in text and "BatchNormalization×35" in text and "Constant×175" in text
    assert "-35" in text and "-175" in text
    assert "removed (no rule)" not in text  # everything is explained by the rule
    assert len(text.splitlines()) < 40


def test_accepts_ir_models_and_paths(cls_a, cls_files, cls_diff):
    a_path, b_path = cls_files
    for a, b in ((a_path, b_path), (ir.from_onnx(cls_a), str(b_path))):
        d = diff_models(a, b)
        assert d.data["ops"] == cls_diff.data["ops"]
        assert d.data["rules"] == cls_diff.data["rules"]
    with pytest.raises(TypeError, match="expected an onnx.ModelProto"):
        diff_models(42, cls_a)


# --------------------------------------------------------------------------- small graphs
def _model(nodes, inputs, outputs, inits=(), graph_name="g"):
    g = helper.make_graph(nodes, graph_name, inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_attribute_input_io_and_unnamed_node_changes():
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    a = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                helper.make_node("Relu", ["c"], ["r"]),  # unnamed: matched by op type + outputs
                helper.make_node("Sigmoid", ["r"], ["y"], name="sig")],
               [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])], [w])
    w2 = numpy_helper.from_array(np.zeros((1,), np.float32), "w2")
    b = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[0, 0, 0, 0]),
                helper.make_node("Relu", ["c"], ["r"]),
                helper.make_node("Tanh", ["r"], ["t"], name="tanh"),
                helper.make_node("Sigmoid", ["t"], ["y"], name="sig")],
               [_vi("x", ["N", 3, 8, 8])], [_vi("y", [1, 4, 6, 6]), _vi("r", None)], [w, w2])
    d = diff_models(a, b)
    assert not d.identical
    assert d.removed == []
    assert d.added == [{"graph": "main", "name": "tanh", "op": "Tanh", "outputs": ["t"], "rule": None}]
    by_name = {c["name"]: c for c in d.changed}
    assert set(by_name) == {"conv", "sig"}
    assert by_name["conv"]["attributes"] == [{"name": "pads", "a": "[1, 1, 1, 1]", "b": "[0, 0, 0, 0]"}]
    assert by_name["sig"]["inputs"] == [{"index": 0, "a": "r", "b": "t", "rewired": False}]
    assert not by_name["sig"]["rewired_only"]
    assert d.data["nodes"]["unchanged"] == 1
    assert d.op_delta("Tanh") == 1
    assert d.data["io"]["inputs"]["changed"] == [{"name": "x", "a": "float[1,3,8,8]", "b": "float[N,3,8,8]"}]
    assert d.data["io"]["outputs"]["added"] == ["r"]
    assert d.data["io"]["outputs"]["changed"] == [{"name": "y", "a": "float[1,4,8,8]", "b": "float[1,4,6,6]"}]
    assert d.data["initializers"] == {"removed": [], "added": ["w2"], "changed": []}
    assert d.data["b"]["parameters"] == d.data["a"]["parameters"] + 1 == 4 * 3 * 3 * 3 + 1
    text = d.to_text()
    for piece in ("added (no provenance)", "tanh", "pads: [1, 1, 1, 1] → [0, 0, 0, 0]", "input 0: r → t",
                  "float[N,3,8,8]"):
        assert piece in text


def test_constant_moved_to_initializer_by_another_tool():
    k = helper.make_tensor("k", TensorProto.FLOAT, [1], [2.0])
    a = _model([helper.make_node("Constant", [], ["k"], value=k), helper.make_node("Add", ["x", "k"], ["y"], name="add")],
               [_vi("x", [1])], [_vi("y", [1])])
    b = _model([helper.make_node("Add", ["x", "k"], ["y"], name="add")], [_vi("x", [1])], [_vi("y", [1])], [k])
    d = diff_models(a, b)
    assert d.removed == [{"graph": "main", "name": "k", "op": "Constant", "outputs": ["k"], "rule": None,
                          "how": "to_initializer"}]
    assert d.changed == [] and d.data["nodes"]["unchanged"] == 1
    assert d.data["a"]["parameters"] == d.data["b"]["parameters"] == 1
    text = d.to_text()
    assert "1 Constant nodes now initializers" in text and "removed (no rule)" not in text


def test_subgraph_nodes_are_diffed_in_their_graph():
    def if_model(then_op):
        then_g = helper.make_graph([helper.make_node(then_op, ["x"], ["t"], name="then_node")], "then",
                                   [], [_vi("t", [2])])
        else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="else_node")], "else",
                                   [], [_vi("e", [2])])
        cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
        return _model([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                      [cond, _vi("x", [2])], [_vi("y", [2])])

    d = diff_models(if_model("Relu"), if_model("Abs"))
    # same name, other op: one node changed (not a removal plus an addition)
    assert d.removed == [] and d.added == []
    assert d.changed == [{"graph": "main/if.then_branch", "name": "then_node", "op": "Relu", "op_b": "Abs",
                          "inputs": [], "attributes": [], "rewired_only": False}]
    assert d.data["nodes"]["unchanged"] == 2  # If itself (subgraph attributes are diffed as graphs) + Neg
    assert "op Relu → Abs" in d.to_text()
    assert d.op_delta("Relu") == -1 and d.op_delta("Abs") == 1


def test_chained_rules_name_the_intermediate_node():
    """A rule rewriting another rule's node: the first rule's A node is found through its initializer."""
    x, lo = Var("x"), Const("lo")
    relu_to_clip = Rule("relu_to_clip", op.Relu(x), lambda op, m: op.Clip(m[x], op.const(np.float32(0))))
    clip_to_max = Rule("clip_to_max", op.Clip(x, lo, name="clip"), lambda op, m: op.Max(m[x], m.value(lo)))
    a = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                helper.make_node("Neg", ["r"], ["y"], name="neg")], [_vi("x", [3])], [_vi("y", [3])])
    model = ir.from_onnx(a)
    res = rewrite(model, [relu_to_clip, clip_to_max])
    assert dict(res.counts) == {"relu_to_clip": 1, "clip_to_max": 1}
    b = ir.to_onnx(model)
    d = diff_models(a, b)
    rules = d.rules
    assert set(rules) == {"relu_to_clip", "clip_to_max"}
    clip_node = next(n.name for n in b.graph.node if n.op_type == "Max")
    assert rules["clip_to_max"]["created"] == {"Max": 1} and rules["clip_to_max"]["created_nodes"] == [clip_node]
    assert len(rules["clip_to_max"]["intermediate"]) == 1  # the Clip relu_to_clip made, gone from B
    assert rules["relu_to_clip"]["created"] == {} and len(rules["relu_to_clip"]["created_initializers"]) == 1
    assert rules["relu_to_clip"]["replaced_nodes"] == ["relu"]
    assert [(n["name"], n["rule"], n["how"]) for n in d.removed] == [("relu", "relu_to_clip", "replaced")]
    assert "also replaced nodes made earlier in the pipeline" in d.to_text()


# --------------------------------------------------------------------------- CLI
def test_cli_text_and_json(cls_files):
    a, b = cls_files
    runner = CliRunner(env={"COLUMNS": "160"})
    res = runner.invoke(main, ["diff", str(a), str(b)])
    assert res.exit_code == 0, res.output
    assert RULE in res.stdout and "BatchNormalization×35" in res.stdout and f"A: {a}" in res.stdout
    res = runner.invoke(main, ["diff", str(a), str(b), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == diff_models(a, b, names=(str(a), str(b))).to_json()


def test_cli_check_and_zoo_names(cls_files):
    a, b = cls_files
    runner = CliRunner(env={"COLUMNS": "160"})
    res = runner.invoke(main, ["diff", str(a), str(b), "--check", "--dim", "unused=3"])
    assert res.exit_code == 0, res.output
    assert "output agreement" in res.stdout and "save_infer_model/scale_0.tmp_1" in res.stdout
    res = runner.invoke(main, ["diff", "ppocr-cls", str(a), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["identical"] is True


def test_cli_check_that_cannot_run_fails(tmp_path, cls_files):
    a, _ = cls_files
    other = tmp_path / "other_input.onnx"
    onnx.save(_model([helper.make_node("Relu", ["u"], ["y"], name="relu")], [_vi("u", [2])], [_vi("y", [2])]),
              str(other))
    res = CliRunner().invoke(main, ["diff", str(a), str(other), "--check"])
    assert res.exit_code == 1
    assert "--check could not run both models" in res.stderr and "Traceback" not in res.output
    assert "op counts" in res.stdout  # the structural diff is still printed


def test_cli_does_not_import_torch(cls_files):
    import subprocess
    import sys

    a, b = cls_files
    code = ("import sys; from click.testing import CliRunner; from graft.compiler.driver.cli import main; "
            f"r = CliRunner().invoke(main, ['diff', {str(a)!r}, {str(b)!r}, '--check']); assert r.exit_code == 0; "
            f"r = CliRunner().invoke(main, ['explain', {RULE!r}, {str(a)!r}]); assert r.exit_code == 0; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_errors_name_the_file(tmp_path, cls_files):
    a, _ = cls_files
    runner = CliRunner()
    res = runner.invoke(main, ["diff", str(a), str(tmp_path / "nope.onnx")])
    assert res.exit_code == 1
    assert res.stderr.startswith("graft: error: ") and len(res.stderr.splitlines()) == 1
    assert "nope.onnx: no such file" in res.stderr and "Traceback" not in res.output
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    res = runner.invoke(main, ["diff", str(bad), str(a)])
    assert res.exit_code == 1
    assert "garbage.onnx" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(main, ["diff", str(a), str(a), "--dim", "batch"])
    assert res.exit_code == 1 and "graft: error: --dim batch: expected NAME=SIZE" in res.stderr
