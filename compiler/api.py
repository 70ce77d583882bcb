"""``compiler.compile``: load → pipeline → check → numeric verification → result.

::

    from compiler import compile
    res = compile("model.onnx", pipeline="optimize")   # or a zoo name, a ModelProto, an ir.Model
    print(res.report())
    res.save("model.opt.onnx")                         # atomic

A compile that produces an invalid model raises :class:`InvalidOutputError`
naming the rule(s) whose nodes are involved; one whose outputs drift beyond
``atol`` raises :class:`NumericMismatchError` naming the first rule whose value
diverges (see :mod:`compiler.blame`). Both carry the partial result.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import ir
from compiler import numeric
from compiler.blame import Blame, find_blame, rules_failing_checker, rules_in_message
from compiler.numeric import OutputAgreement
from compiler.passes import PassRecord, Pipeline
from compiler.rewriter import StopReason

# Sizes for symbolic dims when the caller gives none: batch-like (axis 0) dims small,
# others large enough for strided convolutions and pooling (32 = 2^5).
BATCH_DIM = 2
OTHER_DIM = 32


class CompileError(Exception):
    """A compile that cannot produce a trustworthy result. ``.result`` holds what was computed."""

    def __init__(self, message: str, result: "CompileResult | None" = None):
        super().__init__(message)
        self.result = result


class InvalidOutputError(CompileError):
    """The pipeline produced a model that fails ``ir.verify`` / ``onnx.checker`` / onnxruntime.

    Attributes:
        rules: [(rule, node name)] implicated by provenance.
    """

    def __init__(self, message: str, result=None, rules=()):
        super().__init__(message, result)
        self.rules = list(rules)


class NumericMismatchError(CompileError):
    """An output differs from the input model's beyond tolerance. ``.blame`` names the rule."""

    def __init__(self, message: str, result=None, blame: Blame | None = None):
        super().__init__(message, result)
        self.blame = blame


@dataclass
class ModelStats:
    """Size of a model: nodes (subgraphs included), parameters (elements) and bytes of constant data.

    Constant data is initializers plus ``Constant``-node tensors, so turning Constant nodes
    into initializers does not count as growth.
    """

    nodes: int
    parameters: int
    bytes: int


def model_stats(model: ir.Model) -> ModelStats:
    nodes = params = nbytes = 0
    for g in model.all_graphs():
        nodes += len(g)
        for v in g.initializers.values():
            params += v.const.size
            nbytes += v.const.nbytes
        for n in g:
            t = n.attrs.get("value") if n.op_type == "Constant" and n.domain == "" else None
            if isinstance(t, ir.Tensor):
                params += t.size
                nbytes += t.nbytes
    return ModelStats(nodes, params, nbytes)


@dataclass
class Verification:
    """Numeric verification outcome.

    Attributes:
        status: ``"passed"``, ``"failed"``, ``"skipped"`` (could not run; ``reason`` says why) or ``"off"``.
        outputs: per-output agreement (max abs, max rel, cosine) against the input model.
        atol, rtol: the tolerance applied (an output passes when max abs <= atol or max rel <= rtol).
        inputs: input name → shape used.
        blame: the first diverging rule when ``status == "failed"``.
    """

    status: str
    reason: str = ""
    outputs: list[OutputAgreement] = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0
    inputs: dict[str, tuple] = field(default_factory=dict)
    blame: Blame | None = None


@dataclass
class CompileResult:
    """What :func:`compile` produced.

    Attributes:
        model: the compiled IR model.
        proto: the output ``onnx.ModelProto`` (target ``onnx``), checker-valid.
        module: the ``torch.fx.GraphModule`` (target ``torch``).
        source: where the model came from (path, zoo name, or a type name).
        pipeline: the pipeline that ran.
        counts: rule → rewrites, summed over passes.
        stop_reasons: rewrite pass → :class:`StopReason`.
        passes: per-pass records (time, changes).
        before, after: :class:`ModelStats`.
        verification: :class:`Verification`.
        timings: phase → seconds (load, pipeline, check, verify, total).
    """

    model: ir.Model
    proto: onnx.ModelProto | None
    module: Any
    target: str
    source: str
    pipeline: str
    counts: Counter
    stop_reasons: dict[str, StopReason]
    passes: list[PassRecord]
    before: ModelStats
    after: ModelStats
    verification: Verification
    timings: dict[str, float]

    @property
    def outputs(self) -> list[OutputAgreement]:
        return self.verification.outputs

    @property
    def ok(self) -> bool:
        return self.verification.status != "failed"

    def save(self, path: str | os.PathLike) -> None:
        """Write the ONNX output atomically (temporary file, then rename; nothing left on failure).

        Raises:
            CompileError: the target is not ``onnx``.
        """
        if self.proto is None:
            raise CompileError(f"{path}: this compile targeted {self.target!r}; only an ONNX result can be "
                               f"saved as .onnx (use target='onnx')")
        from ir.onnx_io import save_proto

        save_proto(self.proto, path)

    def report(self, width: int = 100) -> str:
        """The short rich-rendered summary (see :mod:`compiler.report`)."""
        from compiler.report import render_text

        return render_text(self, width=width)


# --------------------------------------------------------------------------- loading
def _is_torch_module(obj) -> bool:
    torch = sys.modules.get("torch")  # a torch module cannot exist unless torch is imported
    return torch is not None and isinstance(obj, torch.nn.Module)


def _torch_entry(name: str):
    try:
        return getattr(ir, name)
    except ImportError as e:
        side = "frontend (ir/torch_frontend.py)" if name == "from_torch" else "backend (ir/torch_backend.py)"
        raise CompileError(f"the torch {side} is not available in this build ({e}); "
                           f"compile ONNX models, or install a graft with torch support") from None


def _load(model_or_path, example_inputs):
    """(source label, reference proto or None, what onnxruntime loads for the reference, fresh IR model,
    torch module or None)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not path.exists() and isinstance(model_or_path, str):
            from compiler import zoo

            if model_or_path in zoo.NAMES:
                path = zoo.resolve(model_or_path)
        from ir.onnx_io import load_proto

        proto = load_proto(path, check=False)
        _check_file(path)
        return str(model_or_path), proto, str(path), _from_proto(proto, str(path)), None
    if isinstance(model_or_path, onnx.ModelProto):
        from ir.onnx_io import check_proto

        check_proto(model_or_path, where="input model")
        return "ModelProto", model_or_path, model_or_path, _from_proto(model_or_path, "input model"), None
    if isinstance(model_or_path, ir.Model):
        proto = ir.to_onnx(model_or_path)  # compile a copy: the caller's model is not edited
        return "ir.Model", proto, proto, _from_proto(proto, "input model"), None
    if _is_torch_module(model_or_path):
        if example_inputs is None:
            raise CompileError("compiling a torch model needs example_inputs (a tuple of tensors) to capture it")
        args = example_inputs if isinstance(example_inputs, tuple) else tuple(example_inputs) \
            if isinstance(example_inputs, list) else (example_inputs,)
        model = _torch_entry("from_torch")(model_or_path, args)
        return type(model_or_path).__name__, None, None, model, model_or_path
    raise TypeError(f"compile() takes a path, zoo name, onnx.ModelProto, ir.Model or torch.nn.Module, "
                    f"got {type(model_or_path).__name__}")


def _check_file(path: Path) -> None:
    """``onnx.checker`` on the file itself: faster than on the parsed proto, and external data stays put."""
    from ir.onnx_io import ModelLoadError

    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelLoadError(f"{path}: fails onnx.checker: {_first_line(e)}") from None


def _from_proto(proto, where):
    from ir.onnx_io import ModelLoadError

    try:
        return ir.from_onnx(proto)
    except ModelLoadError as e:
        raise ModelLoadError(f"{where}: {e}") from None


# --------------------------------------------------------------------------- feeds
def default_dim_sizes(proto: onnx.ModelProto, dim_sizes: dict[str, int] | None = None) -> tuple[dict, int]:
    """(named dim → size, size for unnamed dims) for generated inputs.

    Named symbolic dims seen at axis 0 get :data:`BATCH_DIM`, others :data:`OTHER_DIM`;
    ``dim_sizes`` overrides. Unnamed unknown dims get BATCH_DIM when they only occur at
    axis 0, else OTHER_DIM.
    """
    sizes = dict(dim_sizes or {})
    unnamed_axes = set()
    inits = {t.name for t in proto.graph.initializer}
    for vi in proto.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if d.dim_param:
                want = BATCH_DIM if axis == 0 else OTHER_DIM
                if d.dim_param not in (dim_sizes or {}):
                    sizes[d.dim_param] = min(sizes.get(d.dim_param, want), want)
            else:
                unnamed_axes.add(axis)
    return sizes, BATCH_DIM if unnamed_axes <= {0} else OTHER_DIM


def _feeds(proto, example_inputs, dim_sizes, seed) -> dict[str, np.ndarray]:
    names = [vi.name for vi in proto.graph.input if vi.name not in {t.name for t in proto.graph.initializer}]
    if example_inputs is None:
        sizes, default = default_dim_sizes(proto, dim_sizes)
        return numeric.make_inputs(proto, seed=seed, dim_sizes=sizes, default_dim=default)
    if isinstance(example_inputs, dict):
        missing = [n for n in names if n not in example_inputs]
        if missing:
            raise ValueError(f"example_inputs lacks graph input(s) {missing}; the model's inputs are {names}")
        return {n: _to_numpy(example_inputs[n]) for n in names}
    seq = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if len(seq) != len(names):
        raise ValueError(f"{len(seq)} example input(s) given, the model has {len(names)}: {names}")
    return {n: _to_numpy(x) for n, x in zip(names, seq)}


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:400]


# --------------------------------------------------------------------------- compile
def compile(model_or_path, example_inputs=None, pipeline: str | Pipeline | None = "optimize", target: str = "onnx",
            rules=None, verify: bool = True, atol: float = 1e-4, dim_sizes: dict[str, int] | None = None, *,
            rtol: float = 0.0, seed: int = 0) -> CompileResult:
    """Compile a model with a pipeline (plus optional user rules) and check the result.

    Args:
        model_or_path: an ``.onnx`` path, a zoo name (``ppocr-cls``, ``minilm``, ...), an
            ``onnx.ModelProto``, an ``ir.Model`` (not modified), or a ``torch.nn.Module``.
        example_inputs: inputs for verification (dict name → array, or a sequence in graph-input
            order); required for torch modules (used to capture them). Default: random inputs
            from the input types (seeded), symbolic dims sized by :func:`default_dim_sizes`.
        pipeline: a registered pipeline name (``optimize``, ``cleanup``, ``none``), a
            :class:`Pipeline`, or None for no pipeline.
        target: ``"onnx"`` (a ModelProto) or ``"torch"`` (a ``torch.fx.GraphModule``).
        rules: user rules (a RuleSet or a list of Rule), run as their own pass after the pipeline.
        verify: run both models in onnxruntime and compare outputs. Structural checks
            (``ir.verify`` and ``onnx.checker`` full_check) run always.
        atol, rtol: an output passes when its max abs error <= atol or max rel error <= rtol.
        dim_sizes: sizes for named symbolic input dims, e.g. ``{"batch": 1, "seq": 128}``.
        seed: seed of the generated inputs.

    Returns:
        a :class:`CompileResult`.

    Raises:
        ir.ModelLoadError: missing/unreadable/invalid input file (names the file).
        compiler.RuleError: a rule raised during rewriting (names the rule and node).
        InvalidOutputError: the result fails ir.verify / onnx.checker / cannot run in onnxruntime
            while the input could (names the rules whose nodes are involved).
        NumericMismatchError: an output differs beyond tolerance (names the first diverging rule).
        CompileError: torch paths without the torch frontend/backend, other unusable requests.
        KeyError: unknown pipeline name.
    """
    if target not in ("onnx", "torch"):
        raise ValueError(f"target must be 'onnx' or 'torch', got {target!r}")
    from rules.pipelines import with_user_rules

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    pipe = with_user_rules(pipeline, rules)  # fail on a bad pipeline name before loading anything
    t = time.perf_counter()
    source, ref_proto, ref_src, model, torch_module = _load(model_or_path, example_inputs)
    timings["load"] = time.perf_counter() - t
    before = model_stats(model)

    t = time.perf_counter()
    pres = pipe(model)
    timings["pipeline"] = time.perf_counter() - t
    stats = pres.stats

    result = CompileResult(model, None, None, target, source, pipe.name, stats.counts, stats.stop_reasons,
                           stats.passes, before, model_stats(model), Verification("off"), timings)
    t = time.perf_counter()
    out_proto, out_bytes = _check_structure(model, result)
    timings["check"] = time.perf_counter() - t
    if target == "onnx":
        result.proto = out_proto
    else:
        result.module = _torch_entry("to_torch")(model)

    t = time.perf_counter()
    if verify:
        if torch_module is not None:
            result.verification = _verify_torch(torch_module, example_inputs, result, atol, rtol)
        else:
            result.verification = _verify_onnx(ref_proto, ref_src, out_proto, out_bytes, model, example_inputs,
                                               dim_sizes, seed, stats.rewrites, atol, rtol, result)
    timings["verify"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    v = result.verification
    if v.status == "failed":
        bad = [o for o in v.outputs if not o.within(atol, rtol)]
        worst = max(bad, key=lambda o: o.max_abs)
        where = f"; {v.blame.describe()}" if v.blame else \
            ("; no intermediate value could be tied to a rule" if result.counts else "")
        raise NumericMismatchError(
            f"output {worst.name!r} differs from the input model's by max abs {worst.max_abs:.3g} "
            f"(atol {atol:g}){where}", result, v.blame)
    return result


def _check_structure(model: ir.Model, result: CompileResult) -> tuple[onnx.ModelProto, bytes | None]:
    """``ir.verify`` then ``onnx.checker`` (full_check); failures name the rules involved.

    Returns the output proto and its serialization (None over 2 GiB), reused to run it.
    """
    from ir.onnx_io import PROTOBUF_LIMIT, ModelLoadError, check_proto

    try:
        ir.verify(model)
    except ir.VerifyError as e:
        raise _invalid("fails ir.verify", str(e), model, None, result) from None
    proto = ir.to_onnx(model)
    data = proto.SerializeToString() if proto.ByteSize() <= PROTOBUF_LIMIT else None
    try:
        if data is not None:
            onnx.checker.check_model(data, full_check=True)
        else:
            check_proto(proto, where="compiled model", full=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise _invalid("fails onnx.checker", _first_line(e), model, proto, result) from None
    except ModelLoadError as e:
        raise _invalid("fails onnx.checker", str(e).removeprefix("compiled model: fails onnx.checker: "),
                       model, proto, result) from None
    return proto, data


def _invalid(what: str, detail: str, model, proto, result) -> InvalidOutputError:
    involved = rules_in_message(model, detail)
    if not involved and proto is not None:
        involved = rules_failing_checker(model, proto)
    if involved:
        names = sorted({r for r, _ in involved})
        nodes = ", ".join(f"{n!r}" for _, n in involved[:5])
        who = f"rule{'s' if len(names) > 1 else ''} {', '.join(repr(r) for r in names)} (node{'s' if len(involved) > 1 else ''} {nodes})"
    elif result.counts:
        who = "one of the rules that fired: " + ", ".join(f"{r!r}" for r in sorted(result.counts))
    else:
        who = "no rule fired, so the pipeline's function passes"
    return InvalidOutputError(f"the compiled model {what}: {detail} — caused by {who}; no output written "
                              f"(fix or drop the rule)", result, involved)


def _verify_onnx(ref_proto, ref_src, out_proto, out_bytes, model, example_inputs, dim_sizes, seed, rewrites,
                 atol, rtol, result) -> Verification:
    v = Verification("skipped", atol=atol, rtol=rtol)
    try:
        feeds = _feeds(ref_proto, example_inputs, dim_sizes, seed)
    except ValueError as e:
        v.reason = f"cannot generate inputs: {_first_line(e)}"
        return v
    v.inputs = {k: tuple(a.shape) for k, a in feeds.items()}
    try:
        sess = numeric._session(ref_src)
    except Exception as e:  # noqa: BLE001 — ORT raises several types; the input model is the one at fault
        v.reason = f"onnxruntime cannot load the input model: {_first_line(e)}"
        return v
    try:
        names = [o.name for o in sess.get_outputs()]
        ref_out = dict(zip(names, sess.run(names, feeds)))
    except Exception as e:  # noqa: BLE001
        shapes = ", ".join(f"{k}{list(s)}" for k, s in v.inputs.items())
        v.reason = (f"onnxruntime cannot run the input model on generated inputs {shapes}: {_first_line(e)} "
                    f"(set symbolic dim sizes with --dim name=size / dim_sizes, or pass example inputs)")
        return v
    del sess
    try:
        with _runnable(out_proto, out_bytes) as src:
            out = numeric.run(src, feeds)
    except Exception as e:  # noqa: BLE001
        raise _invalid("does not run in onnxruntime (the input model does)", _first_line(e), model, out_proto,
                       result) from None
    v.outputs = [numeric.agreement(ref_out[name], out.get(name, np.array(np.nan)), name) for name in ref_out]
    if all(o.within(atol, rtol) for o in v.outputs):
        v.status = "passed"
        return v
    v.status = "failed"
    v.blame = find_blame(ref_proto, model, out_proto, feeds, rewrites, atol=max(atol, 1e-6))
    return v


@contextlib.contextmanager
def _runnable(proto: onnx.ModelProto, data: bytes | None):
    """What onnxruntime loads: the bytes, or (over 2 GiB) a temporary file with external data."""
    if data is not None:
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="graft-verify-") as d:
        path = os.path.join(d, "model.onnx")
        onnx.save_model(proto, path, save_as_external_data=True, location="model.onnx.data")
        yield path


def _verify_torch(module, example_inputs, result, atol, rtol) -> Verification:
    import torch

    v = Verification("skipped", atol=atol, rtol=rtol)
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    v.inputs = {f"arg{i}": tuple(a.shape) for i, a in enumerate(args) if hasattr(a, "shape")}
    with torch.no_grad():
        ref = _flatten(module(*args))
        if result.module is not None:
            got = _flatten(result.module(*args))
        else:
            names = [vi.name for vi in result.proto.graph.input
                     if vi.name not in {t.name for t in result.proto.graph.initializer}]
            try:
                got = list(numeric.run(result.proto, {n: _to_numpy(a) for n, a in zip(names, args)}).values())
            except Exception as e:  # noqa: BLE001
                raise _invalid("does not run in onnxruntime", _first_line(e), result.model, result.proto,
                               result) from None
    v.outputs = [numeric.agreement(_to_numpy(a), _to_numpy(b), f"output{i}") for i, (a, b) in enumerate(zip(ref, got))]
    if len(ref) != len(got):
        v.status, v.reason = "failed", f"the torch model returns {len(ref)} outputs, the compiled one {len(got)}"
        return v
    v.status = "passed" if all(o.within(atol, rtol) for o in v.outputs) else "failed"
    return v


def _flatten(out) -> list:
    if isinstance(out, (tuple, list)):
        return [y for x in out for y in _flatten(x)]
    if isinstance(out, dict):
        return [y for x in out.values() for y in _flatten(x)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _flatten(out.to_tuple())
    return [out]
