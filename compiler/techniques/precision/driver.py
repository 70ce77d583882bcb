"""``convert_precision(model, "fp16")``: measure, decide, apply the rules, check, report.

1. Refuse what cannot work: a type the model's opset cannot express for its ops (bfloat16 before
   opset 13/22) — the error names the ops and the opset needed; bfloat16 for onnxruntime, which has
   no CPU kernels for it (asked of onnxruntime, :mod:`~graft.compiler.techniques.precision.runtime`).
2. Measure the float32 model on calibration data or generated inputs (marked as such):
   ranges, saturable constants, the inputs of reduction nodes
   (:mod:`~graft.compiler.techniques.precision.ranges`).
3. Decide per node (:mod:`~graft.compiler.techniques.precision.analysis`) into a
   :class:`~graft.rules.precision.PrecisionPlan`, and apply the precision rules
   (:mod:`graft.rules.precision`) to a copy of the model, to a fixed point; then dead code, original
   names back where they are free, and, without ``keep_io_types``, graph inputs and outputs in the
   target type.
4. Run the converted model on the same feeds. An output that is inf/NaN where float32's is finite
   is traced back, through the values that became non-finite, to the node where it started; that
   node stays float32 (``range exceeds fp16 (overflowed ...)``) and steps 3–4 repeat (at most
   ``max_rounds`` times).
5. Report: nodes converted and kept (with reasons), Casts, size, saturated constants, denormal
   weights, float32 outputs that were already non-finite on the data, accuracy against float32.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from graft import ir
from graft.ir.dtypes import DataType
from graft.rules.precision import BOUNDARY, KEY_META, PRECISION_META, SHORT_NAMES, TYPE_NAMES, PrecisionError, node_key
from graft.compiler.techniques.precision import evaluate as evaluation
from graft.compiler.techniques.precision.analysis import Analysis, analyse
from graft.compiler.techniques.precision.apply import apply_plan, constant_bytes
from graft.compiler.techniques.precision.ranges import measure, session
from graft.compiler.techniques.precision.report import OutputError, PrecisionReport
from graft.compiler.techniques.precision.reductions import is_reduction
from graft.compiler.techniques.precision.support import node_support

PRECISIONS = {"fp16": DataType.FLOAT16, "float16": DataType.FLOAT16,
              "bf16": DataType.BFLOAT16, "bfloat16": DataType.BFLOAT16}


def parse_precision(precision: str) -> DataType:
    """``fp16``/``float16`` → FLOAT16, ``bf16``/``bfloat16`` → BFLOAT16.

    Raises:
        ValueError: anything else (the message lists the accepted names).
    """
    t = PRECISIONS.get(str(precision).lower())
    if t is None:
        raise ValueError(f"precision must be 'fp16' or 'bf16', got {precision!r}")
    return t


@dataclass
class PrecisionResult:
    """The converted model, its report, the analysis behind it and the rule counts."""

    model: ir.Model
    report: PrecisionReport
    analysis: Analysis
    counts: dict
    seconds: dict = field(default_factory=dict)

    def summary(self) -> str:
        return self.report.render()

    def verification_skip(self, target: str, torch_input: bool) -> str | None:
        """Why a float32 comparison in onnxruntime (``compile``'s verification) cannot run this result,
        or None when it can. ``target``: ``onnx``/``torch``; ``torch_input``: compiled from a torch module."""
        kind = self.report.target
        if not self.report.keep_io_types:
            return (f"graph inputs and outputs are {kind} (keep_io_types off); the precision report compared "
                    f"the outputs with float32's")
        if kind == "bfloat16" and (target == "onnx" or not torch_input):
            return ("onnxruntime has no bfloat16 CPU kernels; the precision report measured the outputs"
                    + (" with the torch backend" if self.report.accuracy is not None else " (not measured)"))
        return None


# --------------------------------------------------------------------------- helpers
def _check_opset(model: ir.Model, target: DataType) -> None:
    """Refuse a type the model's opset cannot express for most of its float nodes (bfloat16 before opset
    13 for arithmetic, 22 for Conv and pooling). A few such nodes (Range takes float16 only from
    opset 27) just stay float32, with the opset that would allow them in their reason."""
    needs: dict[str, int] = {}
    limited = convertible = 0
    for n in model.all_nodes():
        sup = node_support(n, model, target)
        if sup is None:
            continue
        if sup.kind == "keep" and sup.needs_opset is not None:
            needs[n.op_type] = max(needs.get(n.op_type, 0), sup.needs_opset)
            limited += 1
        elif sup.kind != "keep":
            convertible += 1
    if needs and limited > convertible:
        by_opset: dict[int, list[str]] = {}
        for op, v in sorted(needs.items()):
            by_opset.setdefault(v, []).append(op)
        parts = "; ".join(f"{', '.join(ops)} from opset {v}" for v, ops in sorted(by_opset.items()))
        raise PrecisionError(f"{SHORT_NAMES[target]} at opset {model.opset}: {limited} of {limited + convertible} float "
                             f"nodes cannot take it; the ONNX schemas allow {TYPE_NAMES[target]} "
                             f"for {parts}; convert the model to opset {max(needs.values())} first (onnx.version_converter), "
                             f"or use {'fp16' if target == DataType.BFLOAT16 else 'bf16'}")


def _feeds(model: ir.Model, calibration, dim_sizes, seed: int, samples: int | None):
    from graft.compiler.techniques import numeric

    if calibration is not None:
        from graft.compiler.techniques.calibration import as_calibration_data
        from graft.compiler.techniques.calibration.data import CalibrationDataError

        data = as_calibration_data(calibration, model)
        feeds = []
        for f in data:
            feeds.append(f)
            if len(feeds) >= (samples or 32):
                break
        if not feeds:
            raise CalibrationDataError(f"{data.source}: holds no samples")
        return feeds, data.source, data.synthetic
    samples = samples or 4
    proto = ir.to_onnx(model, stub_initializers_over=1 << 16)
    sizes, default = numeric.default_dim_sizes(proto, dim_sizes)
    real = {v.name for v in model.graph.inputs if v.const is None}  # stubbed initializers are inputs of `proto`
    feeds = [{k: a for k, a in numeric.make_inputs(proto, seed=seed + i, dim_sizes=sizes, default_dim=default).items()
              if k in real} for i in range(samples)]
    return feeds, f"generated from the input types (seed {seed})", True


# --------------------------------------------------------------------------- entry point
def convert_precision(model: ir.Model, precision: str = "fp16", *, calibration=None, exclude=None,
                      keep_io_types: bool = True, dim_sizes: dict[str, int] | None = None, seed: int = 0,
                      samples: int | None = None, headroom: float = 4.0, reduction_tolerance: float | None = None,
                      runtime: str | None = "onnxruntime", evaluate: bool = True, backend: str | None = None,
                      eval_samples: int = 4, max_rounds: int = 8) -> PrecisionResult:
    """Convert the float32 ``model`` to float16 or bfloat16 where it is safe (module doc).

    Args:
        model: an IR model (not edited, except that its value types are inferred).
        precision: ``fp16`` or ``bf16``.
        calibration: representative inputs (.npz, directory of .npy, iterable of feeds); default:
            ``samples`` generated inputs, which the report marks as not representative.
        exclude: node names, op types or name globs kept in float32 (``user block list``).
        keep_io_types: graph inputs and outputs stay float32 (the default), else they take the type.
        dim_sizes: sizes of symbolic input dims for generated inputs.
        samples: how many feeds are used: generated ones (default 4), or the first of ``calibration``
            (default: up to 32).
        headroom: activations may reach the type's largest finite value / ``headroom``.
        reduction_tolerance: largest accepted measured error of a reduction node (default 16 roundoffs).
        runtime: ``"onnxruntime"``: the output must load in onnxruntime CPU (bfloat16 cannot: error);
            None: no runtime check (a model for another runtime, e.g. bf16 for CUDA or TensorRT).
        evaluate: run the converted model on the feeds (overflow tracing and the accuracy report).
        backend: what runs it: ``"torch"`` (computes in the lower type; the default when torch is
            installed) or ``"onnxruntime"`` (float16 only; its CPU provider computes most float16 ops in
            float32, see :mod:`~graft.compiler.techniques.precision.evaluate`).
        eval_samples: how many of the feeds the converted model runs on (float16 on a CPU is slow).
        max_rounds: conversion rounds (each traced overflow costs one).

    Returns:
        a :class:`PrecisionResult`.

    Raises:
        ValueError: unknown precision, ``headroom`` < 1.
        PrecisionError: the opset cannot express the type for the model's ops; the runtime has no
            kernels for it; outputs still overflow after ``max_rounds``.
        graft.compiler.techniques.calibration.CalibrationDataError: calibration data that does not fit.
    """
    from graft.ir.shapes import infer_shapes

    target = parse_precision(precision)
    if not headroom >= 1:
        raise ValueError(f"headroom must be >= 1, got {headroom!r}")
    if backend not in (None, *evaluation.BACKENDS):
        raise ValueError(f"backend must be None, 'torch' or 'onnxruntime', got {backend!r}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    infer_shapes(model)
    _check_opset(model, target)
    if target == DataType.BFLOAT16 and runtime == "onnxruntime":
        _check_runtime(model, target, keep_io_types)  # raises unless onnxruntime loads every bfloat16 op
    if backend is None:
        backend = "torch" if evaluation.torch_available() else "onnxruntime"
    if target == DataType.BFLOAT16 and runtime != "onnxruntime" and backend == "onnxruntime":
        evaluate = False  # nothing here can run it
    seconds["checks"] = time.perf_counter() - t0

    t = time.perf_counter()
    feeds, source, synthetic = _feeds(model, calibration, dim_sizes, seed, samples)
    capture = {v.name for n in model.graph if is_reduction(n) for v in n.inputs
               if v is not None and v.dtype == DataType.FLOAT and v.constant() is None}
    try:
        meas = measure(model, feeds, target, source=source, synthetic=synthetic, capture=capture)
    except RuntimeError as e:
        raise PrecisionError(f"cannot measure ranges: {e}") from None
    seconds["measure"] = time.perf_counter() - t

    report = PrecisionReport(TYPE_NAMES[target], keep_io_types, source, synthetic, samples=len(feeds))
    out_names = {v.name for v in model.graph.outputs}
    report.fp32_nonfinite = {k: n for k, n in meas.nonfinite.items() if k in out_names}
    force_keep: dict[str, str] = {}
    t = time.perf_counter()
    rounds, outs = 0, None
    while True:
        rounds += 1
        an = analyse(model, target, meas, exclude=exclude, headroom=headroom,
                     reduction_tolerance=reduction_tolerance, keep_io_types=keep_io_types, force_keep=force_keep)
        low, counts = apply_plan(model, an, keep_io_types)
        if not evaluate:
            break
        outs = _run_or_fall_back(low, feeds[:eval_samples], backend, report)
        if outs is None:
            break
        bad = [(k, name) for k, (ref, got) in enumerate(zip(meas.outputs, outs)) for name in ref
               if evaluation.newly_bad(got[name], ref[name])]
        if not bad:
            break
        if not _keep_overflow(model, low, feeds, bad[0], report.backend_name, force_keep, source, target, meas,
                              rounds >= max_rounds):
            k, name = bad[0]
            raise PrecisionError(f"output {name!r} has inf/NaN in {SHORT_NAMES[target]} where float32's is finite "
                                 f"({source}, sample {k}), and it could not be traced to a node to keep in float32"
                                 + (f" within {max_rounds} rounds" if rounds >= max_rounds else "")
                                 + "; exclude the node where it starts (exclude=[...]) or use a larger headroom")
    if runtime == "onnxruntime":
        _check_loads(low, target)
    seconds["convert"] = time.perf_counter() - t
    report.rounds = rounds
    report.converted = len(an.converted)
    report.kept = [(d.node, d.op_type, d.graph, d.reason) for d in an.kept]
    report.casts = sum(1 for n in low.all_nodes() if n.meta.get(PRECISION_META) == BOUNDARY)
    report.bytes_before, report.bytes_after = constant_bytes(model), constant_bytes(low)
    report.denormals = dict(an.denormals)
    report.saturated = {k: meas.saturated[k] for k in sorted(an.saturated)}
    if an.unmeasured:
        report.notes.append(f"{an.unmeasured} converted node(s) had no measured range (inside If/Loop bodies, or "
                            f"values onnxruntime could not expose): converted on the schema alone")
    if outs is not None:
        report.accuracy = _accuracy(meas.outputs, outs)
        report.eval_samples = len(outs)
    elif not evaluate:
        report.notes.append("accuracy not measured (evaluation off, or no backend here can run the model)")
    seconds["total"] = time.perf_counter() - t0
    return PrecisionResult(low, report, an, counts, seconds)


def _run_or_fall_back(low, feeds, backend: str, report: PrecisionReport):
    """Outputs of ``low`` on ``feeds`` with ``backend``; the torch backend falls back to onnxruntime
    (for float16) when it cannot build or run the model. Sets ``report.backend``."""
    bf16 = any(v.dtype == DataType.BFLOAT16 for n in low.all_nodes() for v in n.outputs)
    if backend == "torch":
        try:
            outs = evaluation.run(low, feeds, "torch")
            report.backend, report.backend_name = "the torch backend (computes in the lower type)", "torch"
            return outs
        except Exception as e:  # noqa: BLE001 — the torch backend or torch itself
            msg = " ".join(str(e).split())[:200]
            if bf16:
                report.notes.append(f"accuracy not measured: the torch backend cannot run the bf16 model ({msg})")
                return None
            report.notes.append(f"the torch backend cannot run the model ({msg}): accuracy measured in onnxruntime")
    try:
        outs = evaluation.run(low, feeds, "onnxruntime")
    except Exception as e:  # noqa: BLE001 — onnxruntime raises its own types
        raise PrecisionError(f"the converted model does not run in onnxruntime: {' '.join(str(e).split())[:300]}") \
            from None
    report.backend = ("onnxruntime CPU, which runs float16 ops without float16 kernels in float32: errors and "
                      "overflows of float16 arithmetic do not show")
    report.backend_name = "onnxruntime"
    return outs


def _keep_overflow(model, low, feeds, bad, backend: str, force_keep: dict, source: str, target: DataType,
                   meas, last: bool) -> bool:
    """Trace an output overflow to its node and add that node (or an If/Loop body's nodes) to ``force_keep``.
    False when nothing new can be kept."""
    if last:
        return False
    k, name = bad
    short = SHORT_NAMES[target]
    culprit = evaluation.trace_overflow(model, low, feeds[k], name, backend)
    if culprit is None:
        return False
    if any(True for _ in culprit.subgraphs()):
        # values inside If/Loop bodies are not measured: keep the bodies' converted nodes in float32
        where = f"{culprit.op_type} {node_key(culprit)!r}"
        inner = [n.meta.get(KEY_META) for sg in culprit.subgraphs() for g in sg.all_graphs() for n in g]
        inner = [key for key in inner if key is not None and key not in force_keep]
        for key in inner:
            force_keep[key] = (f"range exceeds {short} (overflowed in {short} inside the body of {where} on "
                               f"{source} sample {k}; values inside bodies are not measured)")
        return bool(inner)
    key = culprit.meta.get(KEY_META)
    if key is None or key in force_keep:
        return False
    m = max((meas.absmax.get(o.name, 0.0) for o in culprit.outputs), default=0.0)
    force_keep[key] = f"range exceeds {short} (overflowed in {short} on {source} sample {k}; max |x| = {m:.3g} in float32)"
    return True


def _accuracy(refs: list[dict], outs: list[dict]) -> list[OutputError]:
    from graft.compiler.techniques.numeric import agreement

    acc: dict[str, OutputError] = {}
    for ref, got in zip(refs, outs):
        for name, a in ref.items():
            if np.asarray(a).dtype.kind != "f":
                continue
            o = agreement(a, got[name], name)
            p = acc.get(name) or OutputError(name, 0.0, 0.0, 1.0, 0)
            acc[name] = OutputError(name, max(p.max_abs, o.max_abs), max(p.max_rel, o.max_rel),
                                    min(p.cosine, o.cosine), p.nonfinite + evaluation.newly_bad(got[name], a))
    return list(acc.values())


def _check_loads(low: ir.Model, target: DataType) -> None:
    """The converted model loads in onnxruntime CPU (float16 always should: its ops fall back to float32)."""
    try:
        session(ir.to_onnx(low))
    except Exception as e:  # noqa: BLE001
        raise PrecisionError(f"the {SHORT_NAMES[target]} model does not load in onnxruntime: "
                             f"{' '.join(str(e).split())[:300]}") from None


def _check_runtime(model: ir.Model, target: DataType, keep_io_types: bool) -> None:
    """Refuse bfloat16 for onnxruntime when its CPU provider has no kernel for the ops that would run in it."""
    from graft.compiler.techniques.precision import runtime

    an = analyse(model, target, None, keep_io_types=keep_io_types)
    low, _ = apply_plan(model, an, keep_io_types)
    missing = runtime.missing_kernels(low, target)
    if missing:
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        raise PrecisionError(f"onnxruntime {runtime.ort_version()} (CPUExecutionProvider) has no bfloat16 kernel "
                             f"for {shown}; the model would not load. Write it for a runtime with bfloat16 kernels "
                             f"without the onnxruntime check (runtime=None; graft compile --no-verify), compile "
                             f"with --target torch, or use fp16")
