"""ONNX→torch conformance: graft against onnx2torch on the same ONNX backend test cases.

    .venv/bin/python bench/bench_onnx_torch_conformance.py              # counts per tool
    .venv/bin/python bench/bench_onnx_torch_conformance.py --by-op      # and the cases each tool fails, by op
    .venv/bin/python bench/bench_onnx_torch_conformance.py --only graft

The cases are every node test of the installed onnx (``onnx.backend.test.case.node``, generated in
memory) plus the model tests shipped inside the package (``simple``, ``pytorch-converted``,
``pytorch-operator``); each output is checked with the ONNX runner's comparison and the case's own
tolerances (rtol 1e-3, atol 1e-7), exactly as ``tests/ir/test_onnx_torch_conformance.py`` does.
Outcomes: pass; refused (the converter raised before running); crash (raised while running); mismatch
(ran, wrong output). Prints a table; asserts nothing.

onnx2torch (``pip install --no-deps onnx2torch``, so torch stays as pinned) imports torchvision for
its NonMaxSuppression and RoiAlign converters. Without torchvision installed this script puts a module
named ``torchvision`` in ``sys.modules`` whose ``ops`` functions raise, so onnx2torch imports and every
other converter is measured; those two ops then count as onnx2torch crashes (the script says so).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
import types
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ lives in the repository root

from tests.ir.onnx_conformance import (Outcome, all_cases, compare, normalize, run_graft, to_numpy,  # noqa: E402
                                       to_torch)


def _import_onnx2torch() -> tuple[object | None, str]:
    """onnx2torch's ``convert`` and a note on how it was imported (or None and why not)."""
    note = ""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        def missing(*_a, **_k):
            raise RuntimeError("torchvision is not installed")
        tv = types.ModuleType("torchvision")
        tv.ops = types.ModuleType("torchvision.ops")
        tv.ops.nms = tv.ops.box_convert = tv.ops.roi_align = missing
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, tv.ops
        note = "torchvision is not installed: onnx2torch's NonMaxSuppression and RoiAlign count as crashes"
    try:
        from onnx2torch import convert
    except ImportError as e:
        return None, f"onnx2torch not importable ({e}); install with: pip install --no-deps onnx2torch==1.5.15"
    return convert, note


def run_onnx2torch(convert, case) -> Outcome:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = convert(case.model)
    except Exception as e:  # noqa: BLE001 - a converter refusing is the outcome being measured
        return Outcome("refused", f"{type(e).__name__}: {e}"[:200])
    for inputs, expected in case.data_sets:
        try:
            args = [to_torch(normalize(x)) for x in inputs]
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = gm(*args)
            out = list(out) if isinstance(out, (tuple, list)) else [out]
            got = [to_numpy(o) if isinstance(o, torch.Tensor) else o for o in out]
        except Exception as e:  # noqa: BLE001
            return Outcome("crash", f"{type(e).__name__}: {e}"[:200])
        why = compare(expected, got, case)
        if why is not None:
            return Outcome("mismatch", why)
    return Outcome("pass")


def _op(case) -> str:
    ops = [n.op_type for n in case.model.graph.node]
    return ops[0] if len(ops) == 1 else f"{case.name.split('/')[0] if '/' in case.name else 'graph'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["graft", "onnx2torch"])
    ap.add_argument("--by-op", action="store_true", help="list the cases each tool does not pass, grouped by op")
    args = ap.parse_args()

    t0 = time.perf_counter()
    cases = all_cases()
    print(f"{len(cases)} cases ({sum('/' not in c.name for c in cases)} node tests + "
          f"{sum('/' in c.name for c in cases)} model tests) generated in {time.perf_counter() - t0:.1f} s")
    tools = {}
    if args.only != "onnx2torch":
        tools["graft"] = run_graft
    if args.only != "graft":
        convert, note = _import_onnx2torch()
        if note:
            print(note)
        if convert is not None:
            tools["onnx2torch 1.5.15"] = lambda c, convert=convert: run_onnx2torch(convert, c)
    results = {}
    for name, fn in tools.items():
        t0 = time.perf_counter()
        results[name] = {c.name: fn(c) for c in cases}
        print(f"{name}: ran in {time.perf_counter() - t0:.1f} s")
    print()
    n_node = sum("/" not in c.name for c in cases)
    print(f"| tool | pass | refused | crash | mismatch | of | node tests passed (of {n_node}) |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        n = collections.Counter(o.status for o in res.values())
        node_pass = sum(o.status == "pass" for k, o in res.items() if "/" not in k)
        print(f"| {name} | {n['pass']} | {n['refused']} | {n['crash']} | {n['mismatch']} | {len(res)} | {node_pass} |")
    if len(results) == 2:
        a, b = results.values()
        both = sum(a[k].status == "pass" and b[k].status == "pass" for k in a)
        only_a = sum(a[k].status == "pass" and b[k].status != "pass" for k in a)
        only_b = sum(a[k].status != "pass" and b[k].status == "pass" for k in a)
        na, nb = results
        print(f"\nboth pass {both}; only {na} {only_a}; only {nb} {only_b}")
        if args.by_op:
            print(f"\npassed by {nb} but not {na}:")
            for k in sorted(k for k in a if a[k].status != "pass" and b[k].status == "pass"):
                print(f"  {k}: {a[k].status} {a[k].detail[:120]}")
    if args.by_op:
        by_case = {c.name: c for c in cases}
        for name, res in results.items():
            groups = collections.defaultdict(list)
            for k, o in res.items():
                if o.status != "pass":
                    groups[(o.status, _op(by_case[k]))].append(k)
            print(f"\n{name}: not passing, by outcome and op")
            for (status, op), ks in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                print(f"  {len(ks):4d} {status:8s} {op}")


if __name__ == "__main__":
    main()
