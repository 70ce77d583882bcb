"""Rewrite-speed benchmark: graft against the onnxscript rewriter (issue 2, "Speed").

Models are synthetic residual stacks built with ``onnx.helper``: each block is
``h' = Add(Relu(BatchNormalization(Conv(h))), h)`` (4 nodes, ``channels``
channels, 1×1 kernels so a 100k-node model stays ~10 MB). Every block offers one
Conv→BatchNormalization fold, so both tools do the same 1 rewrite per 4 nodes.

Measured per model size (best of ``--repeat`` runs, wall clock, ``time.perf_counter``):

- ``graft µs/node``: the rewrite phase alone (``compiler.rewrite`` with every built-in
  rule, ``rules.all_rules()``) on an IR model already in memory, divided by the
  node count before rewriting.
- ``onnxscript µs/node``: ``RewriteRuleSet.apply_to_model`` with onnxscript's three
  BatchNormalization fusion rules, on an ``onnx_ir`` model already in memory.
- ``compile / load+save``: in-process ``load → optimize pipeline → save`` over a
  plain ``onnx.load`` + ``onnx.save`` of the same file.
- ``process s``: fresh processes: ``graft compile M -o out --no-verify``,
  ``graft compile M -o out`` (verification on), and ``python -c`` doing onnxscript
  ``onnx.load → rewriter.rewrite(BN rules) → onnx.save``.
- linearity: rewrite time at 10× the nodes over the time at 1× (target ≤ 12).

Targets (issue 2): ≤ 20 µs/node at 10k nodes; ``graft compile --no-verify`` at 10k
nodes ≤ ½ the onnxscript process; with verification, ≤ the onnxscript process.

Usage::

    .venv/bin/python bench/bench_rewrite.py                       # 1k, 10k, 100k nodes
    .venv/bin/python bench/bench_rewrite.py --sizes 1000 10000 --repeat 5 --json out.json
    .venv/bin/python bench/bench_rewrite.py --no-process          # skip the subprocess timings
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NODES_PER_BLOCK = 4
TARGET_US_PER_NODE = 20.0
TARGET_LINEARITY = 12.0

# The onnxscript side of the whole-process comparison: load, BN fusion, save.
ONNXSCRIPT_PROCESS = """\
import sys, onnx
from onnxscript import rewriter
from onnxscript.rewriter.rules.common import (fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule)
m = onnx.load(sys.argv[1])
m = rewriter.rewrite(m, pattern_rewrite_rules=[fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule])
onnx.save(m, sys.argv[2])
"""


# --------------------------------------------------------------------------- models
def build_model(num_nodes: int, channels: int = 8, size: int = 4, seed: int = 0) -> onnx.ModelProto:
    """A Conv→BatchNormalization→Relu residual stack of about ``num_nodes`` nodes.

    Args:
        num_nodes: rounded down to a multiple of 4 (at least one block).
        channels: Conv in/out channels (weights ``[channels, channels, 1, 1]`` float32).
        size: spatial size of the input ``x: float32[1, channels, size, size]``.
        seed: numpy seed for weights and BN statistics (variance in [0.5, 1.5]).

    Returns:
        An opset-17 ``ModelProto`` with input ``x`` and one output of the same shape;
        node names ``conv{i}``, ``bn{i}``, ``relu{i}``, ``add{i}``.
    """
    blocks = max(1, num_nodes // NODES_PER_BLOCK)
    rng = np.random.default_rng(seed)
    c = channels
    nodes, inits = [], []
    h = "x"
    for i in range(blocks):
        params = {
            f"w{i}": rng.standard_normal((c, c, 1, 1)) * (0.5 / np.sqrt(c)),
            f"b{i}": rng.standard_normal(c) * 0.1,
            f"gamma{i}": rng.uniform(0.5, 1.5, c),
            f"beta{i}": rng.standard_normal(c) * 0.1,
            f"mean{i}": rng.standard_normal(c) * 0.1,
            f"var{i}": rng.uniform(0.5, 1.5, c),
        }
        inits += [numpy_helper.from_array(a.astype(np.float32), k) for k, a in params.items()]
        nodes += [
            helper.make_node("Conv", [h, f"w{i}", f"b{i}"], [f"conv{i}_out"], name=f"conv{i}"),
            helper.make_node("BatchNormalization", [f"conv{i}_out", f"gamma{i}", f"beta{i}", f"mean{i}",
                                                    f"var{i}"], [f"bn{i}_out"], name=f"bn{i}"),
            helper.make_node("Relu", [f"bn{i}_out"], [f"relu{i}_out"], name=f"relu{i}"),
            helper.make_node("Add", [f"relu{i}_out", h], [f"h{i}"], name=f"add{i}"),
        ]
        h = f"h{i}"
    shape = [1, c, size, size]
    graph = helper.make_graph(nodes, "residual_conv_bn_relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


# --------------------------------------------------------------------------- rules
def builtin_rules() -> tuple[list, list[str]]:
    """(every built-in rule that exists now, rule modules not written yet).

    ``rules.all_rules()`` when all of ``rules.RULE_MODULES`` import; otherwise the
    rules of the modules that do, so the benchmark runs while modules are in progress.
    """
    import rules

    found, missing = [], []
    for mod in rules.RULE_MODULES:
        try:
            found.extend(importlib.import_module(mod).RULES)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            missing.append(mod)
    if not missing:
        found = rules.all_rules()
    return found, missing


def onnxscript_bn_rules():
    from onnxscript.rewriter.rules.common import (fuse_batchnorm_into_conv_rule,
                                                  fuse_batchnorm_into_conv_transpose_rule,
                                                  fuse_batchnorm_into_gemm_rule)

    return [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule]


# --------------------------------------------------------------------------- timing
def _best(fn, repeat: int) -> tuple[float, object]:
    """Best wall time of ``fn()`` over ``repeat`` runs; fn returns (seconds, payload)."""
    best, payload = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t, payload = fn()
        best = min(best, t)
    return best, payload


def time_graft_rewrite(proto: onnx.ModelProto, rule_list, repeat: int) -> tuple[float, dict]:
    import ir
    from compiler import RuleSet, rewrite

    ruleset = RuleSet(rule_list)

    def once():
        model = ir.from_onnx(proto)
        t0 = time.perf_counter()
        res = rewrite(model, ruleset)
        t = time.perf_counter() - t0
        bn_left = sum(1 for n in model.graph if n.op_type == "BatchNormalization")
        return t, {"rewrites": res.rewrites, "bn_left": bn_left, "counts": dict(res.counts),
                   "nodes_after": len(model.graph)}

    return _best(once, repeat)


def time_onnxscript_rewrite(proto: onnx.ModelProto, repeat: int) -> tuple[float, dict]:
    from onnxscript import ir as osir
    from onnxscript.rewriter import pattern

    ruleset = pattern.RewriteRuleSet(onnxscript_bn_rules())

    def once():
        model = osir.serde.deserialize_model(proto)
        t0 = time.perf_counter()
        count = ruleset.apply_to_model(model)
        t = time.perf_counter() - t0
        bn_left = sum(1 for n in model.graph if n.op_type == "BatchNormalization")
        return t, {"rewrites": count, "bn_left": bn_left}

    return _best(once, repeat)


def _compile_in_process(src: Path, dst: Path, rule_list) -> str:
    """load → optimize pipeline → save; returns a label of the path taken."""
    import ir

    try:
        from compiler.passes import get_pipeline
        pipeline = get_pipeline("optimize")
    except (ImportError, KeyError):
        pipeline = None
    model = ir.load(src)
    if pipeline is None:
        # The pipeline layer is not written yet: the rewrite with all rules stands in for it.
        from compiler import rewrite

        rewrite(model, rule_list)
        label = "ir.load → rewrite(all rules) → ir.save"
    else:
        model = pipeline(model).model
        label = "ir.load → optimize pipeline → ir.save"
    ir.save(model, dst)
    return label


def time_compile_ratio(src: Path, workdir: Path, rule_list, repeat: int) -> tuple[float, float, str]:
    """(compile seconds, onnx.load+save seconds, label)."""
    dst = workdir / "inproc.onnx"
    dst_plain = workdir / "plain.onnx"

    def compile_once():
        t0 = time.perf_counter()
        label = _compile_in_process(src, dst, rule_list)
        return time.perf_counter() - t0, label

    def plain_once():
        t0 = time.perf_counter()
        onnx.save(onnx.load(str(src)), str(dst_plain))
        return time.perf_counter() - t0, None

    t_compile, label = _best(compile_once, repeat)
    t_plain, _ = _best(plain_once, repeat)
    return t_compile, t_plain, label


def _run(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def graft_executable() -> Path | None:
    """The ``graft`` console script next to this interpreter, if its compile command works."""
    exe = Path(sys.executable).parent / "graft"
    if not exe.exists():
        found = shutil.which("graft")
        if found is None:
            return None
        exe = Path(found)
    _, proc = _run([str(exe), "compile", "--help"])
    return exe if proc.returncode == 0 else None


def time_processes(src: Path, workdir: Path, graft: Path | None, repeat: int) -> dict:
    """Wall seconds of whole processes (best of ``repeat``); None where not available."""
    out = workdir / "proc_out.onnx"

    def timed(cmd, label):
        best = None
        for _ in range(repeat):
            if out.exists():
                out.unlink()
            t, proc = _run(cmd)
            if proc.returncode != 0:
                raise RuntimeError(f"{label} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                                   f"{proc.stderr.strip()[-2000:]}")
            bn_left = count_ops(onnx.load(str(out), load_external_data=False), "BatchNormalization")
            if bn_left:
                raise RuntimeError(f"{label}: {bn_left} BatchNormalization nodes left in {out}")
            best = t if best is None else min(best, t)
        return best

    res = {"graft_no_verify_s": None, "graft_verify_s": None}
    if graft is not None:
        res["graft_no_verify_s"] = timed([str(graft), "compile", str(src), "-o", str(out), "--no-verify"],
                                         "graft compile --no-verify")
        res["graft_verify_s"] = timed([str(graft), "compile", str(src), "-o", str(out)], "graft compile")
    res["onnxscript_s"] = timed([sys.executable, "-c", ONNXSCRIPT_PROCESS, str(src), str(out)],
                                "onnxscript process")
    return res


def startup_times(graft: Path | None, repeat: int = 5) -> dict:
    """Seconds for ``python -c 'import compiler.cli'`` and ``graft --help``; whether torch got imported."""
    probe = "import sys, compiler.cli; print('torch' in sys.modules)"
    t_imp, proc = _best(lambda: _run([sys.executable, "-c", probe]), repeat)
    res = {"import_cli_s": t_imp if proc.returncode == 0 else None,
           "cli_imports_torch": proc.stdout.strip() == "True" if proc.returncode == 0 else None,
           "python_bare_s": _best(lambda: _run([sys.executable, "-c", "pass"]), repeat)[0],
           "graft_help_s": None}
    if graft is not None:
        res["graft_help_s"] = _best(lambda: _run([str(graft), "--help"]), repeat)[0]
    return res


# --------------------------------------------------------------------------- report
def _fmt(x, spec=".2f", suffix=""):
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    rows = report["rows"]
    t = Table(title=f"rewrite phase and in-process compile — {report['machine']}")
    for col in ("nodes", "graft µs/node", "onnxscript µs/node", "graft speed-up", "graft compile / onnx load+save"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["nodes"]), _fmt(r["graft_us_per_node"], ".1f"), _fmt(r["onnxscript_us_per_node"], ".1f"),
                  _fmt(r["onnxscript_us_per_node"] / r["graft_us_per_node"], ".1f", "×"),
                  _fmt(r["compile_ratio"], ".1f", "×"))
    console.print(t)
    t = Table(title="whole process, seconds (graft compile vs onnxscript load → BN fusion → save)")
    for col in ("nodes", "graft --no-verify", "graft (verify)", "onnxscript", "no-verify / onnxscript",
                "verify / onnxscript"):
        t.add_column(col, justify="right")
    for r in rows:
        p = r.get("process") or {}
        os_s = p.get("onnxscript_s")
        nv, v = p.get("graft_no_verify_s"), p.get("graft_verify_s")
        t.add_row(str(r["nodes"]), _fmt(nv), _fmt(v), _fmt(os_s),
                  _fmt(nv / os_s if nv and os_s else None), _fmt(v / os_s if v and os_s else None))
    console.print(t)
    lin = Table(title="linearity of the rewrite phase (time ratio for 10× the nodes; target ≤ 12)")
    for col in ("from → to", "graft", "onnxscript"):
        lin.add_column(col, justify="right")
    for item in report["linearity"]:
        lin.add_row(f"{item['from']} → {item['to']}", _fmt(item["graft"], ".2f", "×"),
                    _fmt(item["onnxscript"], ".2f", "×"))
    console.print(lin)
    s = report.get("startup") or {}
    console.print(f"start-up: python -c pass {_fmt(s.get('python_bare_s'), '.3f')} s, "
                  f"import compiler.cli {_fmt(s.get('import_cli_s'), '.3f')} s "
                  f"(imports torch: {s.get('cli_imports_torch')}), graft --help {_fmt(s.get('graft_help_s'), '.3f')} s")
    console.print(f"graft rules: {report['rule_count']} ({', '.join(report['rule_modules'])})"
                  + (f"; not written yet: {', '.join(report['missing_rule_modules'])}"
                     if report["missing_rule_modules"] else ""))
    console.print(f"in-process compile path: {report['compile_path']}")


def machine_description() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run(sizes: list[int], repeat: int, repeat_large: int, processes: bool, channels: int) -> dict:
    rule_list, missing = builtin_rules()
    graft = graft_executable() if processes else None
    report = {"machine": machine_description(), "rule_count": len(rule_list),
              "rule_modules": sorted({r.replacement.__module__ for r in rule_list}),
              "missing_rule_modules": missing, "graft_cli": str(graft) if graft else None,
              "rows": [], "linearity": []}
    with tempfile.TemporaryDirectory(prefix="graft-bench-") as d:
        work = Path(d)
        for n in sizes:
            rep = repeat if n <= 10_000 else repeat_large
            proto = build_model(n, channels=channels)
            nodes = len(proto.graph.node)
            src = work / f"residual_{nodes}.onnx"
            onnx.save(proto, str(src))
            t_graft, g_info = time_graft_rewrite(proto, rule_list, rep)
            t_os, o_info = time_onnxscript_rewrite(proto, rep)
            for who, info in (("graft", g_info), ("onnxscript", o_info)):
                if info["bn_left"]:
                    raise RuntimeError(f"{who} left {info['bn_left']} BatchNormalization nodes at {nodes} nodes")
            t_comp, t_plain, label = time_compile_ratio(src, work, rule_list, rep)
            report["compile_path"] = label
            row = {"nodes": nodes, "bytes": src.stat().st_size, "repeat": rep,
                   "graft_rewrite_s": t_graft, "graft_us_per_node": t_graft / nodes * 1e6,
                   "graft_rewrites": g_info["rewrites"], "graft_counts": g_info["counts"],
                   "nodes_after": g_info["nodes_after"],
                   "onnxscript_rewrite_s": t_os, "onnxscript_us_per_node": t_os / nodes * 1e6,
                   "onnxscript_rewrites": o_info["rewrites"],
                   "compile_s": t_comp, "onnx_load_save_s": t_plain, "compile_ratio": t_comp / t_plain,
                   "process": time_processes(src, work, graft, rep) if processes else None}
            report["rows"].append(row)
            print(f"[{nodes} nodes] graft {row['graft_us_per_node']:.1f} µs/node, "
                  f"onnxscript {row['onnxscript_us_per_node']:.1f} µs/node", file=sys.stderr)
    rows = sorted(report["rows"], key=lambda r: r["nodes"])
    for a, b in zip(rows, rows[1:]):
        scale = b["nodes"] / a["nodes"]
        report["linearity"].append({
            "from": a["nodes"], "to": b["nodes"], "node_ratio": scale,
            "graft": b["graft_rewrite_s"] / a["graft_rewrite_s"],
            "onnxscript": b["onnxscript_rewrite_s"] / a["onnxscript_rewrite_s"]})
    if processes:
        report["startup"] = startup_times(graft)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                    help="approximate node counts (rounded down to a multiple of 4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement up to 10k nodes (best kept)")
    ap.add_argument("--repeat-large", type=int, default=1, help="runs per measurement above 10k nodes")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--no-process", action="store_true", help="skip the whole-process timings")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args(argv)
    report = run(args.sizes, args.repeat, args.repeat_large, not args.no_process, args.channels)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
