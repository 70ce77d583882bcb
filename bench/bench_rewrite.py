"""Rewrite-speed benchmark: graft against the onnxscript rewriter (issue 2, "Speed").

Models are synthetic residual stacks built with ``onnx.helper``: each block is
``h' = Add(Relu(BatchNormalization(Conv(h))), h)`` (4 nodes, ``channels``
channels, 1×1 kernels so a 100k-node model stays ~10 MB). Every block offers one
Conv→BatchNormalization fold, so both tools do the same 1 rewrite per 4 nodes.

Measured per model size, best of ``--repeat`` runs; wall clock (``time.perf_counter``)
and CPU time (``time.process_time`` in process, user + system of a child process)
are each kept at their minimum, since other processes on a shared machine inflate
wall time:

- ``graft µs/node``: the rewrite phase alone (``compiler.rewrite`` with every built-in
  rule, ``rules.all_rules()``) on an IR model already in memory, divided by the
  node count before rewriting.
- ``graft µs/node (BN rules)``: the same with only ``graft.rules.fold_batchnorm`` (its five
  BatchNormalization folds), the like-for-like comparison with onnxscript.
- ``onnxscript µs/node``: ``RewriteRuleSet.apply_to_model`` with onnxscript's three
  BatchNormalization fusion rules, on an ``onnx_ir`` model already in memory.
- ``compile / load+save``: in-process ``load → optimize pipeline → save`` over a
  plain ``onnx.load`` + ``onnx.save`` of the same file.
- ``process s``: fresh processes, run in turn: ``graft compile M -o out --no-verify -q``,
  ``graft compile M -o out -q`` (numeric verification in onnxruntime on), and
  ``python -c`` doing onnxscript ``onnx.load → rewriter.rewrite(BN rules) → onnx.save``.
  Each output is checked to hold no BatchNormalization.
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
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
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
        seed: numpy seed for weights and BN statistics (variance in [0.5, 1.5]; gamma and
            beta scaled by 1 / blocks so the output stays O(1) whatever the depth).

    Returns:
        An opset-17 ``ModelProto`` with input ``x`` and one output of the same shape;
        node names ``conv{i}``, ``bn{i}``, ``relu{i}``, ``add{i}``.
    """
    blocks = max(1, num_nodes // NODES_PER_BLOCK)
    rng = np.random.default_rng(seed)
    c = channels
    # Each block adds Relu(BN(...)) to h, so h would grow geometrically with depth; BN's
    # gamma and beta are divided by the block count so the output stays O(1) at any depth
    # and numeric verification (absolute tolerance) stays meaningful.
    step = 1.0 / blocks
    nodes, inits = [], []
    h = "x"
    for i in range(blocks):
        params = {
            f"w{i}": rng.standard_normal((c, c, 1, 1)) / np.sqrt(c),
            f"b{i}": rng.standard_normal(c) * 0.1,
            f"gamma{i}": rng.uniform(0.5, 1.5, c) * step,
            f"beta{i}": rng.standard_normal(c) * 0.1 * step,
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
    from graft import rules

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
@dataclass
class Seconds:
    """Wall-clock and CPU seconds (user + system) of one measurement."""

    wall: float
    cpu: float

    def best(self, other: "Seconds | None") -> "Seconds":
        return self if other is None else Seconds(min(self.wall, other.wall), min(self.cpu, other.cpu))


def _best(fn, repeat: int) -> tuple[Seconds, object]:
    """Fastest wall and fastest CPU time of ``fn()`` over ``repeat`` runs (each kept separately,
    so a run slowed by other processes on the machine does not count); fn returns (Seconds, payload)."""
    best, payload = None, None
    for _ in range(repeat):
        gc.collect()
        t, payload = fn()
        best = t.best(best)
    return best, payload


class _Clock:
    """Times the ``with`` block in this process: ``perf_counter`` and ``process_time``."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = Seconds(time.perf_counter() - self._w, time.process_time() - self._c)


def time_graft_rewrite(proto: onnx.ModelProto, rule_list, repeat: int) -> tuple[Seconds, dict]:
    from graft import ir
    from graft.compiler import RuleSet, rewrite

    ruleset = RuleSet(rule_list)

    def once():
        model = ir.from_onnx(proto)
        with _Clock() as clock:
            res = rewrite(model, ruleset)
        bn_left = sum(1 for n in model.graph if n.op_type == "BatchNormalization")
        return clock.seconds, {"rewrites": res.rewrites, "bn_left": bn_left, "counts": dict(res.counts),
                               "nodes_after": len(model.graph)}

    return _best(once, repeat)


def time_onnxscript_rewrite(proto: onnx.ModelProto, repeat: int) -> tuple[Seconds, dict]:
    from onnxscript import ir as osir
    from onnxscript.rewriter import pattern

    ruleset = pattern.RewriteRuleSet(onnxscript_bn_rules())

    def once():
        model = osir.serde.deserialize_model(proto)
        with _Clock() as clock:
            count = ruleset.apply_to_model(model)
        bn_left = sum(1 for n in model.graph if n.op_type == "BatchNormalization")
        return clock.seconds, {"rewrites": count, "bn_left": bn_left}

    return _best(once, repeat)


def _compile_in_process(src: Path, dst: Path, rule_list) -> tuple[str, dict]:
    """load → optimize pipeline → save, in this process.

    Returns:
        (a label of the path taken, wall seconds per phase: load, the pipeline's passes
        summed by kind, check, save; empty when the compile layer does not exist yet)."""
    try:
        from graft.compiler.driver.api import compile as graft_compile
    except ImportError:
        graft_compile = None
    if graft_compile is None:
        # The compile layer is not written yet: load → rewrite with all rules → save stands in for it.
        from graft import ir
        from graft.compiler import rewrite

        model = ir.load(src)
        rewrite(model, rule_list)
        ir.save(model, dst)
        return "ir.load → rewrite(all rules) → ir.save", {}
    res = graft_compile(str(src), pipeline="optimize", verify=False)
    t0 = time.perf_counter()
    res.save(dst)
    phases = {"load": res.timings.get("load", 0.0)}
    for rec in res.passes:
        kind = rec.name.rsplit("/", 1)[-1].split("#")[0]
        kind = kind if rec.kind != "rewrite" else "rewrite passes"
        phases[kind] = phases.get(kind, 0.0) + rec.seconds
    phases["check"] = res.timings.get("check", 0.0)
    phases["save"] = time.perf_counter() - t0
    phases["other"] = max(0.0, res.timings.get("total", 0.0) - sum(v for k, v in phases.items() if k != "save"))
    return "compiler.compile(path, pipeline='optimize', verify=False).save(out)", phases


def time_compile_ratio(src: Path, workdir: Path, rule_list, repeat: int) -> tuple[Seconds, Seconds, tuple]:
    """(in-process compile, onnx.load + onnx.save of the same file, (label, phases) of the last compile)."""
    dst, dst_plain = workdir / "inproc.onnx", workdir / "plain.onnx"

    def compile_once():
        with _Clock() as clock:
            label = _compile_in_process(src, dst, rule_list)
        return clock.seconds, label

    def plain_once():
        with _Clock() as clock:
            onnx.save(onnx.load(str(src)), str(dst_plain))
        return clock.seconds, None

    t_compile, info = _best(compile_once, repeat)
    t_plain, _ = _best(plain_once, repeat)
    return t_compile, t_plain, info


def _run(cmd: list[str]) -> tuple[Seconds, subprocess.CompletedProcess]:
    """Run ``cmd``; its wall time and the CPU time (user + system) the child used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Seconds(wall, cpu), proc


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


def time_processes(src: Path, workdir: Path, graft: Path | None, repeat: int) -> dict[str, Seconds | None]:
    """Whole processes, best of ``repeat``, run in turn so that machine load hits all alike.

    Raises:
        RuntimeError: a process failed or left BatchNormalization nodes in its output.
    """
    out = workdir / "proc_out.onnx"
    cmds = {}
    if graft is not None:
        cmds["graft_no_verify"] = [str(graft), "compile", str(src), "-o", str(out), "--no-verify", "-q"]
        cmds["graft_verify"] = [str(graft), "compile", str(src), "-o", str(out), "-q"]
    cmds["onnxscript"] = [sys.executable, "-c", ONNXSCRIPT_PROCESS, str(src), str(out)]
    best: dict[str, Seconds | None] = {"graft_no_verify": None, "graft_verify": None, "onnxscript": None}
    for _ in range(repeat):
        for key, cmd in cmds.items():
            if out.exists():
                out.unlink()
            t, proc = _run(cmd)
            if proc.returncode != 0:
                raise RuntimeError(f"{key} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                                   f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
            bn_left = count_ops(onnx.load(str(out), load_external_data=False), "BatchNormalization")
            if bn_left:
                raise RuntimeError(f"{key}: {bn_left} BatchNormalization nodes left in {out}")
            best[key] = t.best(best[key])
    return best


def startup_times(graft: Path | None, repeat: int = 5) -> dict:
    """Seconds for ``python -c pass``, ``python -c 'import graft.compiler.driver.cli'`` and ``graft --help``,
    and whether importing the CLI imports torch."""
    probe = "import sys, graft.compiler.driver.cli; print('torch' in sys.modules)"
    t_imp, proc = _best(lambda: _run([sys.executable, "-c", probe]), repeat)
    res = {"python_bare": _best(lambda: _run([sys.executable, "-c", "pass"]), repeat)[0],
           "import_cli": t_imp if proc.returncode == 0 else None,
           "cli_imports_torch": proc.stdout.strip() == "True" if proc.returncode == 0 else None,
           "graft_help": None}
    if graft is not None:
        res["graft_help"] = _best(lambda: _run([str(graft), "--help"]), repeat)[0]
    return res


# --------------------------------------------------------------------------- report
def _fmt(x, spec=".2f", suffix=""):
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _ratio(a: Seconds | None, b: Seconds | None, attr: str) -> float | None:
    return getattr(a, attr) / getattr(b, attr) if a is not None and b is not None else None


def targets(report: dict) -> list[dict]:
    """The issue's targets as {target, wall, cpu, met_wall, met_cpu}, judged on wall-clock time and,
    separately, on CPU time (the steadier figure on a machine shared with other jobs)."""
    rows = {r["nodes"]: r for r in report["rows"]}
    out = []
    r10 = rows.get(10_000)
    if r10 is not None:
        us = r10["graft_us_per_node"]
        out.append({"target": f"rewrite phase ≤ {TARGET_US_PER_NODE:.0f} µs/node at 10k nodes (all rules)",
                    "wall": f"{us['wall']:.1f} µs/node", "cpu": f"{us['cpu']:.1f} µs/node",
                    "met_wall": us["wall"] <= TARGET_US_PER_NODE, "met_cpu": us["cpu"] <= TARGET_US_PER_NODE})
        p = r10.get("process") or {}
        osx = p.get("onnxscript")
        for label, key, limit in (("graft compile --no-verify ≤ ½ onnxscript process at 10k", "graft_no_verify", 0.5),
                                  ("graft compile (verification on) ≤ onnxscript process at 10k", "graft_verify", 1.0)):
            w, c = _ratio(p.get(key), osx, "wall"), _ratio(p.get(key), osx, "cpu")
            out.append({"target": label, "wall": f"{_fmt(w)}×", "cpu": f"{_fmt(c)}×",
                        "met_wall": None if w is None else w <= limit, "met_cpu": None if c is None else c <= limit})
    for item in report["linearity"]:
        k = item["node_ratio"]
        limit = TARGET_LINEARITY / 10 * k
        g = item["graft"]
        out.append({"target": f"{k:.0f}× nodes ≤ {limit:.1f}× rewrite time ({item['from']} → {item['to']})",
                    "wall": f"{g['wall']:.2f}×", "cpu": f"{g['cpu']:.2f}×",
                    "met_wall": g["wall"] <= limit, "met_cpu": g["cpu"] <= limit})
    return out


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    rows = report["rows"]
    t = Table(title=f"rewrite phase and in-process compile — {report['machine']}")
    for col in ("nodes", "graft µs/node (all rules)", "graft cpu", "graft µs/node (BN rules)", "graft cpu ",
                "onnxscript µs/node (BN rules)", "onnxscript cpu", "graft compile / onnx load+save"):
        t.add_column(col, justify="right")
    for r in rows:
        g, gb, o = r["graft_us_per_node"], r["graft_bn_only_us_per_node"], r["onnxscript_us_per_node"]
        t.add_row(str(r["nodes"]), _fmt(g["wall"], ".1f"), _fmt(g["cpu"], ".1f"), _fmt(gb["wall"], ".1f"),
                  _fmt(gb["cpu"], ".1f"), _fmt(o["wall"], ".1f"), _fmt(o["cpu"], ".1f"),
                  _fmt(r["compile_ratio"], ".1f", "×"))
    console.print(t)
    t = Table(title="whole process, seconds wall (cpu): graft compile vs onnxscript load → BN fusion → save")
    for col in ("nodes", "graft --no-verify", "graft (verify)", "onnxscript", "no-verify / onnxscript",
                "verify / onnxscript"):
        t.add_column(col, justify="right")
    for r in rows:
        p = r.get("process") or {}
        nv, v, osx = p.get("graft_no_verify"), p.get("graft_verify"), p.get("onnxscript")
        cell = lambda s: "n/a" if s is None else f"{s.wall:.2f} ({s.cpu:.2f})"  # noqa: E731
        rcell = lambda a: "n/a" if a is None or osx is None else \
            f"{_ratio(a, osx, 'wall'):.2f} ({_ratio(a, osx, 'cpu'):.2f})"  # noqa: E731
        t.add_row(str(r["nodes"]), cell(nv), cell(v), cell(osx), rcell(nv), rcell(v))
    console.print(t)
    phase_names = list(dict.fromkeys(k for r in rows for k in r.get("compile_phases_s") or {}))
    if phase_names:
        t = Table(title="in-process compile (verify=False), wall seconds per phase (last run)")
        for col in ("nodes", *phase_names):
            t.add_column(col, justify="right")
        for r in rows:
            ph = r.get("compile_phases_s") or {}
            t.add_row(str(r["nodes"]), *(_fmt(ph.get(k), ".3f") for k in phase_names))
        console.print(t)
    lin = Table(title="linearity of the rewrite phase: time ratio between sizes (target: ≤ 12× for 10× the nodes)")
    for col in ("from → to", "graft", "graft cpu", "onnxscript", "onnxscript cpu"):
        lin.add_column(col, justify="right")
    for item in report["linearity"]:
        lin.add_row(f"{item['from']} → {item['to']}", _fmt(item["graft"]["wall"], ".2f", "×"),
                    _fmt(item["graft"]["cpu"], ".2f", "×"), _fmt(item["onnxscript"]["wall"], ".2f", "×"),
                    _fmt(item["onnxscript"]["cpu"], ".2f", "×"))
    console.print(lin)
    tt = Table(title="targets (issue 2)")
    for col in ("target", "wall", "met (wall)", "cpu", "met (cpu)"):
        tt.add_column(col)
    yes = {True: "yes", False: "NO", None: "n/a"}
    for t_ in targets(report):
        tt.add_row(t_["target"], t_["wall"], yes[t_["met_wall"]], t_["cpu"], yes[t_["met_cpu"]])
    console.print(tt)
    s = report.get("startup") or {}
    sec = lambda x: "n/a" if x is None else f"{x.wall:.3f} s"  # noqa: E731
    console.print(f"start-up: python -c pass {sec(s.get('python_bare'))}, python -c 'import graft.compiler.driver.cli' "
                  f"{sec(s.get('import_cli'))} (imports torch: {s.get('cli_imports_torch')}), "
                  f"graft --help {sec(s.get('graft_help'))}")
    console.print(f"graft rules: {report['rule_count']} from {', '.join(report['rule_modules'])}"
                  + (f"; not written yet: {', '.join(report['missing_rule_modules'])}"
                     if report["missing_rule_modules"] else ""))
    console.print(f"in-process compile: {report.get('compile_path')}")


def machine_description() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"load average {load:.1f} at start")


def _jsonable(x):
    if isinstance(x, Seconds):
        return asdict(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def run(sizes: list[int], repeat: int, repeat_large: int, processes: bool, channels: int) -> dict:
    rule_list, missing = builtin_rules()
    # the like-for-like comparison with onnxscript's three BN fusions: graft's BN-folding rules alone
    bn_rules = [r for r in rule_list if r.replacement.__module__ == "graft.rules.fold_batchnorm"]
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
            t_graft_bn, _ = time_graft_rewrite(proto, bn_rules, rep)
            t_os, o_info = time_onnxscript_rewrite(proto, rep)
            for who, info in (("graft", g_info), ("onnxscript", o_info)):
                if info["bn_left"]:
                    raise RuntimeError(f"{who} left {info['bn_left']} BatchNormalization nodes at {nodes} nodes")
            t_comp, t_plain, (label, phases) = time_compile_ratio(src, work, rule_list, rep)
            report["compile_path"] = label
            per_node = lambda t: {"wall": t.wall / nodes * 1e6, "cpu": t.cpu / nodes * 1e6}  # noqa: E731
            row = {"nodes": nodes, "bytes": src.stat().st_size, "repeat": rep,
                   "graft_rewrite_s": t_graft, "graft_us_per_node": per_node(t_graft),
                   "graft_rewrites": g_info["rewrites"], "graft_counts": g_info["counts"],
                   "graft_bn_only_rewrite_s": t_graft_bn, "graft_bn_only_us_per_node": per_node(t_graft_bn),
                   "nodes_after": g_info["nodes_after"],
                   "onnxscript_rewrite_s": t_os, "onnxscript_us_per_node": per_node(t_os),
                   "onnxscript_rewrites": o_info["rewrites"],
                   "compile_s": t_comp, "onnx_load_save_s": t_plain, "compile_ratio": t_comp.wall / t_plain.wall,
                   "compile_phases_s": phases,
                   "process": time_processes(src, work, graft, rep) if processes else None}
            report["rows"].append(row)
            print(f"[{nodes} nodes] rewrite: graft {row['graft_us_per_node']['wall']:.1f} µs/node, "
                  f"onnxscript {row['onnxscript_us_per_node']['wall']:.1f} µs/node", file=sys.stderr)
    rows = sorted(report["rows"], key=lambda r: r["nodes"])
    for a, b in zip(rows, rows[1:]):
        report["linearity"].append({
            "from": a["nodes"], "to": b["nodes"], "node_ratio": b["nodes"] / a["nodes"],
            "graft": {k: getattr(b["graft_rewrite_s"], k) / getattr(a["graft_rewrite_s"], k) for k in ("wall", "cpu")},
            "onnxscript": {k: getattr(b["onnxscript_rewrite_s"], k) / getattr(a["onnxscript_rewrite_s"], k)
                           for k in ("wall", "cpu")}})
    if processes:
        report["startup"] = startup_times(graft, repeat=max(1, repeat))
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
        args.json.write_text(json.dumps(_jsonable(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
