"""Run the ONNX backend node tests through ONNX→torch (``ir.from_onnx`` → ``ir.to_torch``).

The cases are generated in memory from the installed ``onnx`` package
(``onnx.backend.test.case.node.collect_testcases``: one single-node model, its
inputs and the reference outputs of ``onnx.reference`` per case; the
``*_expanded`` cases are the same op written as its function body). Outputs are
compared with the ONNX runner's own check
(``onnx.backend.test.runner.Runner.assert_similar_outputs``: same count, shape and
dtype, then ``assert_allclose`` with the case's ``rtol``/``atol``, 1e-3/1e-7).

Each case ends in one of four outcomes:

- ``pass``: the GraphModule's outputs match.
- ``refused``: ``from_onnx`` or ``to_torch`` raised a clean error before anything ran
  (:class:`graft.ir.torch_backend.TorchBackendError` / :class:`graft.ir.ModelLoadError`).
- ``crash``: the module raised while running.
- ``mismatch``: it ran and gave different outputs.

Shared by ``tests/ir/test_onnx_torch_conformance.py`` and ``bench/bench_onnx_torch_conformance.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import warnings
from pathlib import Path

import numpy as np
import onnx

EXPECTED_FAILURES = Path(__file__).with_name("onnx_torch_expected_failures.txt")


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str  # pass | refused | crash | mismatch
    detail: str = ""


# The model tests shipped as files inside the onnx package (old opsets: legacy attributes such as
# `broadcast`, `is_test`, `consumed_inputs`). `real` and `light` need downloaded weights: not used.
DATA_KINDS = ("simple", "pytorch-converted", "pytorch-operator")


@functools.cache
def node_cases() -> tuple:
    """Every node test case of the installed onnx, sorted by name."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the case generators overflow float8 casts on purpose
        cases = node.collect_testcases(None)
    return tuple(sorted(cases, key=lambda c: c.name))


def _read_proto(path: Path, type_proto):
    """One input/output file of a data-dir case, read as the ONNX runner reads it."""
    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return onnx.numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return onnx.numpy_helper.to_optional(opt)
    t = onnx.TensorProto()
    t.ParseFromString(data)
    return onnx.numpy_helper.to_array(t)


@functools.cache
def data_cases() -> tuple:
    """The model tests stored as files in the installed onnx (``DATA_KINDS``), named ``kind/test_name``."""
    from onnx.backend.test.case.test_case import TestCase
    from onnx.backend.test.loader import DATA_DIR, load_model_tests

    out = []
    for kind in DATA_KINDS:
        for t in load_model_tests(DATA_DIR, kind):
            d = Path(t.model_dir)
            model = onnx.load(d / "model.onnx")
            sets = []
            for ds in sorted(d.glob("test_data_set_*")):
                ins = [_read_proto(ds / f"input_{i}.pb", model.graph.input[i].type)
                       for i in range(len(list(ds.glob("input_*.pb"))))]
                outs = [_read_proto(ds / f"output_{i}.pb", model.graph.output[i].type)
                        for i in range(len(list(ds.glob("output_*.pb"))))]
                sets.append((ins, outs))
            out.append(TestCase(name=f"{kind}/{t.name}", model_name=t.model_name, url=None, model_dir=str(d),
                                model=model, data_sets=sets, kind=kind, rtol=t.rtol, atol=t.atol))
    return tuple(sorted(out, key=lambda c: c.name))


def all_cases() -> tuple:
    """Node cases, then the data-dir cases."""
    return node_cases() + data_cases()


def normalize(x):
    """Case data as numpy (TensorProto for the 4-bit, 2-bit and float8 types → an ml_dtypes array)."""
    if isinstance(x, onnx.TensorProto):
        return onnx.numpy_helper.to_array(x)
    return x


def to_torch(arr):
    """A numpy array (ml_dtypes included) as a torch tensor of the same element type."""
    import torch

    arr = np.asarray(arr)
    name = arr.dtype.name
    views = {"bfloat16": (np.int16, torch.bfloat16), "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
             "float8_e4m3fnuz": (np.uint8, torch.float8_e4m3fnuz), "float8_e5m2": (np.uint8, torch.float8_e5m2),
             "float8_e5m2fnuz": (np.uint8, torch.float8_e5m2fnuz),
             "float8_e8m0fnu": (np.uint8, torch.float8_e8m0fnu)}
    if name in views:
        raw, dt = views[name]
        return torch.from_numpy(np.ascontiguousarray(arr).view(raw).reshape(arr.shape).copy()).view(dt)
    if arr.dtype == object or arr.dtype.kind in "US":
        raise TypeError(f"input of numpy dtype {arr.dtype} has no torch equivalent")
    if name in ("int4", "uint4", "int2", "uint2", "float4_e2m1fn"):
        raise TypeError(f"input of numpy dtype {arr.dtype} has no torch equivalent")
    return torch.from_numpy(np.array(arr, copy=True))


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, reduced-precision float types as their ml_dtypes."""
    import ml_dtypes
    import torch

    t = t.detach().cpu()
    views = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
             torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
             torch.float8_e4m3fnuz: (torch.uint8, ml_dtypes.float8_e4m3fnuz),
             torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
             torch.float8_e5m2fnuz: (torch.uint8, ml_dtypes.float8_e5m2fnuz),
             torch.float8_e8m0fnu: (torch.uint8, ml_dtypes.float8_e8m0fnu)}
    if t.dtype in views:
        raw, dt = views[t.dtype]
        return t.contiguous().view(raw).numpy().view(dt)
    return t.numpy()


def compare(expected, outputs, case) -> str | None:
    """None when ``outputs`` match ``expected`` under the ONNX runner's check with the case's tolerances,
    else why not."""
    from onnx.backend.test.runner import Runner

    ref = [normalize(o) for o in expected]
    try:
        Runner.assert_similar_outputs(ref, outputs, rtol=case.rtol, atol=case.atol)
    except (AssertionError, TypeError, AttributeError) as e:  # sequences meet tensors: a mismatch too
        return " ".join(str(e).split())[:300]
    return None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:300]


def run_graft(case) -> Outcome:
    """One case through ``ir.from_onnx`` → ``ir.to_torch`` → the GraphModule."""
    import torch

    from graft import ir
    from graft.ir.torch_backend import TorchBackendError

    try:
        gm = ir.to_torch(ir.from_onnx(case.model))
    except (TorchBackendError, ir.ModelLoadError) as e:
        return Outcome("refused", _first_line(e))
    for inputs, expected in case.data_sets:
        try:
            args = [to_torch(normalize(x)) for x in inputs]
        except TypeError as e:  # a graph input the module accepted but torch cannot hold: the module's fault
            return Outcome("crash", _first_line(e))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = gm(*args)
            out = list(out) if isinstance(out, (tuple, list)) else [out]
            got = [to_numpy(o) for o in out]
        except Exception as e:  # noqa: BLE001 - any run-time error is the outcome being measured
            return Outcome("crash", _first_line(e))
        why = compare(expected, got, case)
        if why is not None:
            return Outcome("mismatch", why)
    return Outcome("pass")


STATUSES = ("refused", "mismatch")  # what the expected-failures file may list; a crash is never expected
_NO_REASON = "REASON?"


def read_expected_failures(path: Path = EXPECTED_FAILURES) -> dict[str, tuple[str, str]]:
    """``{case name: (status, reason)}`` from the expected-failures file (``name  status  # reason`` per line).

    Raises:
        ValueError: a malformed line, an unknown status, a missing reason, or a case listed twice
            (file and line in the message).
    """
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, sep, reason = line.partition("#")
        fields, reason = head.split(), reason.strip()
        if len(fields) != 2 or fields[1] not in STATUSES:
            raise ValueError(f"{path}:{i}: expected 'case_name  refused|mismatch  # reason', got {line!r}")
        if not sep or not reason or reason == _NO_REASON:
            raise ValueError(f"{path}:{i}: {fields[0]!r} needs a reason after '#' (why it does not pass)")
        if fields[0] in out:
            raise ValueError(f"{path}:{i}: {fields[0]!r} is listed twice")
        out[fields[0]] = (fields[1], reason)
    return out


def refusal_reason(detail: str) -> str:
    """A short reason from a refusal message: its first listed problem (``Op: why``)."""
    import re

    m = re.search(r"- (.+?) \(node '[^']*'(?: in module '[^']*')?\): (.*?)(?: - |$)", detail)
    if m:
        return f"{m.group(1)}: {m.group(2)}".strip()
    m = re.search(r"- (graph (?:input|output) .*?)(?: - |$)", detail)
    return m.group(1).strip() if m else detail.partition(": ")[2][:120]


HEADER = """\
# ONNX backend test cases that ONNX→torch (graft.ir.from_onnx → graft.ir.to_torch) does not pass.
# Checked by tests/ir/test_onnx_torch_conformance.py: every case of the installed onnx not listed here
# must pass; every case listed must end exactly as listed (a listed case that starts passing fails the
# test, so this list stays true).
#
#   case_name  refused   # to_torch refuses the model before anything runs (op / attribute / type named)
#   case_name  mismatch  # it runs, and the output differs from the reference for the reason given
#
# Regenerate after changing the torch backend: .venv/bin/python -m tests.ir.onnx_conformance --update
# (reasons of `mismatch` lines are kept; a new one gets REASON? and the test fails until it is written).
"""


def update_expected(path: Path = EXPECTED_FAILURES) -> dict[str, int]:
    """Run every case and rewrite the expected-failures file from the outcomes; returns the status counts."""
    import collections

    old = read_expected_failures(path) if path.exists() else {}
    lines, counts = [], collections.Counter()
    for case in all_cases():
        o = run_graft(case)
        counts[o.status] += 1
        if o.status == "pass":
            continue
        if o.status == "refused":
            reason = refusal_reason(o.detail)
        else:
            prev = old.get(case.name)
            reason = prev[1] if prev and prev[0] == o.status else _NO_REASON
        lines.append(f"{case.name}  {o.status}  # {reason}")
    path.write_text(HEADER + "\n".join(lines) + "\n")
    return dict(counts)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--update"]:
        raise SystemExit("usage: python -m tests.ir.onnx_conformance --update")
    print(update_expected())
