"""The rewrite benchmark (bench/bench_rewrite.py) at a tiny size: its models are right and so is graft's rewrite.

No timing is asserted here: speed numbers live in bench/README.md.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from graft import ir
from graft import rules
from graft.compiler import RuleSet, rewrite
from conftest import assert_same_outputs

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_rewrite.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rewrite", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_model_builder_shape(bench):
    m = bench.build_model(40, channels=4, size=3)
    onnx.checker.check_model(m, full_check=True)
    assert len(m.graph.node) == 40
    assert [n.op_type for n in m.graph.node[:4]] == ["Conv", "BatchNormalization", "Relu", "Add"]
    assert bench.count_ops(m, "BatchNormalization") == 10
    # the residual input of block 1 is block 0's output
    assert list(m.graph.node[7].input) == ["relu1_out", "h0"]
    assert len(bench.build_model(3).graph.node) == 4  # at least one block


def test_all_rules_fold_every_batchnorm(bench):
    proto = bench.build_model(40, channels=4)
    model = ir.from_onnx(proto)
    res = rewrite(model, RuleSet(rules.all_rules()))
    assert res.counts["fold_batchnorm_into_conv"] == 10
    out = ir.to_onnx(model)
    assert bench.count_ops(out, "BatchNormalization") == 0
    assert bench.count_ops(out, "Conv") == 10
    assert len(out.graph.node) == 30
    assert_same_outputs(proto, out, atol=1e-5)


def test_deep_model_stays_verifiable(bench):
    """gamma/beta scale with depth, so a deep stack's output stays O(1) and folding keeps it within 1e-5."""
    import numpy as np

    proto = bench.build_model(2000, channels=4, size=2)
    model = ir.from_onnx(proto)
    rewrite(model, RuleSet(rules.all_rules()))
    res = assert_same_outputs(proto, ir.to_onnx(model), atol=1e-5)
    assert np.isfinite(res[0].max_abs)


def test_run_tiny_report(bench, tmp_path):
    """The benchmark end to end at 40 nodes, whole-process timings included (graft CLI and onnxscript)."""
    report = bench.run([40], repeat=1, repeat_large=1, processes=True, channels=4)
    (row,) = report["rows"]
    assert row["nodes"] == 40 and row["nodes_after"] == 30
    assert row["graft_rewrites"] == 10 and row["onnxscript_rewrites"] == 10
    assert row["graft_us_per_node"]["wall"] > 0 and row["compile_ratio"] > 0
    assert row["graft_bn_only_us_per_node"]["cpu"] > 0
    assert report["missing_rule_modules"] == []
    assert report["rule_count"] == len(rules.all_rules())
    procs = row["process"]
    assert set(procs) == {"graft_no_verify", "graft_verify", "onnxscript"}
    assert all(t is not None and t.wall > 0 for t in procs.values())
    assert report["startup"]["cli_imports_torch"] is False
    names = [t["target"] for t in bench.targets(report)]
    assert names == []  # no 10k row, no second size: no target applies to this run
    out = tmp_path / "r.json"
    bench.main(["--sizes", "8", "16", "--repeat", "1", "--no-process", "--json", str(out)])
    import json

    data = json.loads(out.read_text())
    assert [r["nodes"] for r in data["rows"]] == [8, 16]
    assert data["linearity"][0]["node_ratio"] == 2.0


def test_cli_import_does_not_import_torch():
    code = "import sys, graft.compiler.driver.cli; assert 'torch' not in sys.modules, 'graft.compiler.driver.cli imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_targets_judge_wall_and_cpu_separately(bench):
    S = bench.Seconds
    report = {
        "rows": [{"nodes": 10_000, "graft_us_per_node": {"wall": 25.0, "cpu": 18.0},
                  "process": {"graft_no_verify": S(1.0, 0.9), "graft_verify": S(2.5, 1.9), "onnxscript": S(2.0, 2.0)}}],
        "linearity": [{"from": 10_000, "to": 100_000, "node_ratio": 10.0, "graft": {"wall": 13.0, "cpu": 11.0}}],
    }
    got = {t["target"].split(" (")[0] if "nodes ≤" in t["target"] else t["target"]: t for t in bench.targets(report)}
    rewrite = got["rewrite phase ≤ 20 µs/node at 10k nodes (all rules)"]
    assert (rewrite["met_wall"], rewrite["met_cpu"]) == (False, True)
    no_verify = got["graft compile --no-verify ≤ ½ onnxscript process at 10k"]
    assert (no_verify["met_wall"], no_verify["met_cpu"], no_verify["cpu"]) == (True, True, "0.45×")
    verify = got["graft compile (verification on) ≤ onnxscript process at 10k"]
    assert (verify["met_wall"], verify["met_cpu"]) == (False, True)
    lin = got["10× nodes ≤ 12.0× rewrite time"]
    assert (lin["met_wall"], lin["met_cpu"]) == (False, True)
