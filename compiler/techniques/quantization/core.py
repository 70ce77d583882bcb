"""Quantizing a model in one format (every ``mode`` but ``auto``): analyses, then rules, then a report.

:func:`quantize_format` is what :func:`graft.compiler.techniques.quantization.quantize` runs for one format,
and what ``auto`` (:mod:`~graft.compiler.techniques.quantization.auto`) runs for each candidate. Flow:
1. load a copy of the model; check that its opset can express the format (or convert it when
   ``upgrade_opset``); run the ``prepare`` pipeline (``optimize``: BatchNormalization folding,
   constant folding, clean-up) and shape inference;
2. analyses: resolve exclusions; static — choose nodes and tensors
   (:func:`~graft.compiler.techniques.quantization.select.static_plan`), calibrate them in onnxruntime,
   equalize Concat ranges; dynamic — optionally SmoothQuant factors from calibration;
3. rules, bound to a :class:`~graft.rules.quantize_context.QuantContext`, to a fixed point
   (static insertion + propagation; or dynamic; or weight-only), then dead-code removal;
4. an :class:`~graft.compiler.techniques.quantization.report.AccuracyReport` against the float model.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from graft import ir
from graft.rules.quantize_context import QuantContext, node_key
from graft.compiler.techniques.quantization.modes import Mode, check_opset, parse_mode
from graft.rules.quantize_params import INT4_SYM, INT8_SYM, UINT8_ASYM, QuantizationError
from graft.compiler.techniques.quantization.report import AccuracyReport, accuracy_report


@dataclass
class QuantizeResult:
    """A quantized model and how it was made.

    Attributes:
        model: the quantized :class:`ir.Model`.
        float_model: the prepared float model it was quantized from (the report's reference).
        mode: the format (``static-per-channel``, ``dynamic``, ...).
        counts: rule name → rewrites.
        layers: (node, op type, output tensor, input tensor) of each quantized layer.
        excluded: node names left in float (asked for, or chosen by the accuracy fallback).
        table: the calibration table (static, or dynamic with smoothing), else None.
        report: the accuracy report (None when ``report=False``).
        notes: what the user should know (synthetic data, skipped nodes, opset conversion).
        seconds: phase → wall time.
    """

    model: ir.Model
    float_model: ir.Model
    mode: str
    counts: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    excluded: set = field(default_factory=set)
    table: object = None
    report: AccuracyReport | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    auto: object = None  # the AutoResult when mode="auto"

    @property
    def proto(self) -> onnx.ModelProto:
        return ir.to_onnx(self.model)

    def save(self, path: str | os.PathLike) -> None:
        """Write the quantized ONNX model atomically."""
        ir.save(self.model, path)

    def summary(self) -> str:
        lines = [f"quantized ({self.mode}): {len(self.layers)} layer(s); rules: " +
                 ", ".join(f"{k}×{v}" for k, v in sorted(self.counts.items()))]
        if self.excluded:
            lines.append(f"kept in float: {len(self.excluded)} node(s)")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.report is not None:
            lines.append(self.report.render())
        return "\n".join(lines)


def load_model(model) -> ir.Model:
    """A fresh IR copy of ``model`` (path, zoo name, ModelProto or ir.Model; never edited in place)."""
    if isinstance(model, ir.Model):
        # weights still in an external data file stay references to it (no bytes are read)
        return ir.from_onnx(ir.to_onnx(model, keep_external=True))
    if isinstance(model, onnx.ModelProto):
        return ir.from_onnx(model)
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if not p.exists() and isinstance(model, str):
            from graft.ir import zoo

            if model in zoo.NAMES:
                p = zoo.resolve(model)
        return ir.load(p)
    raise TypeError(f"quantize() takes a path, zoo name, onnx.ModelProto or ir.Model, got {type(model).__name__}")


def _upgrade(model: ir.Model, opset: int) -> ir.Model:
    from onnx import version_converter

    proto = ir.to_onnx(model)
    try:
        conv = version_converter.convert_version(proto, opset)
    except Exception as e:  # the converter raises RuntimeError/ConvertError by version
        raise QuantizationError(f"converting the model from opset {model.opset} to {opset} failed: {e}") from None
    return ir.from_onnx(conv)


def prepare(model: ir.Model, pipeline: str | None = "optimize", simplify: bool = True) -> ir.Model:
    """In place: the float pipeline (BN folding, constant folding, ...), constant Reshape specs where
    symbolic shapes prove them (:mod:`graft.compiler.techniques.quantization.prepare`), and shape inference."""
    if pipeline:
        from graft.rules.pipelines import get_pipeline

        get_pipeline(pipeline)(model)
    if simplify:
        from graft.compiler.techniques.quantization.prepare import simplify_shapes

        simplify_shapes(model)
    from graft.ir.shapes import infer_shapes

    infer_shapes(model)
    return model


def _eval_feeds(eval_data, calibration, model, limit: int = 64):
    from graft.compiler.techniques.calibration.data import as_calibration_data

    if eval_data is not None:
        d = as_calibration_data(eval_data, model)
        return list(d)[:limit], d.source, True, d.synthetic
    if calibration is not None:
        d = as_calibration_data(calibration, model)
        return list(d)[:limit], d.source, False, d.synthetic
    from graft.compiler.techniques.calibration.data import CalibrationData

    d = CalibrationData.random(model, n=4)
    return list(d), d.source, True, True


def quantize_format(model, mode: str = "static", calibration=None, *, exclude=None, calib_method: str = "minmax",
                    percentile: float = 99.99, activation: str = "uint8", op_types=None, block_size: int = 32,
                    min_weight_elements: int = 0, smooth=None, prepare_pipeline: str | None = "optimize",
                    simplify_shapes: bool = True, calib_backend: str = "onnxruntime",
                    upgrade_opset: bool = False, eval_data=None, report: bool = True, progress: bool = True,
                    threads: int = 0, accuracy_target: float | None = None, max_float_layers: int = 8,
                    accuracy_metric=None, ort_cpu_forms: bool = True, embedding_min_rows: int = 0,
                    embedding_per_row: bool = True, weight_format: str = "dq", symmetric: bool = True,
                    accuracy_level: int = 0, quantize_embeddings: bool = False) -> QuantizeResult:
    """Quantize ``model`` in one format: what :func:`graft.compiler.techniques.quantization.quantize` does for
    every ``mode`` but ``auto`` (arguments, result and errors as documented there). ``auto`` builds its
    candidates with this function."""
    t0 = time.perf_counter()
    m = load_model(model)
    if mode == "none":
        prepare(m, None, False)
        return QuantizeResult(m, m, "none")
    qmode = parse_mode(mode)
    if activation not in ("uint8", "int8"):
        raise QuantizationError(f"activation must be 'uint8' (asymmetric) or 'int8' (symmetric), got {activation!r}")
    notes: list[str] = []
    nbits = None
    if qmode.kind == "weight-only":
        from graft.rules.quantize_nbits import NBitsOptions

        nbits = NBitsOptions(qmode.bits, block_size, symmetric, weight_format, accuracy_level,
                             quantize_embeddings).check()
    # com.microsoft.MatMulNBits reads no ai.onnx opset feature: only the DequantizeLinear form needs 21
    need = 1 if nbits is not None and nbits.form == "matmulnbits" else qmode.min_opset
    if m.opset < need:
        if not upgrade_opset:
            check_opset(qmode, m.opset)
        notes.append(f"converted the model from opset {m.opset} to {need} for {qmode.name}")
        m = _upgrade(m, need)
    seconds = {}
    t = time.perf_counter()
    prepare(m, prepare_pipeline, simplify_shapes)
    seconds["prepare"] = time.perf_counter() - t
    float_model = ir.from_onnx(ir.to_onnx(m, keep_external=True))
    from graft.ir.shapes import infer_shapes

    infer_shapes(float_model)
    from graft.compiler.techniques.quantization.select import resolve_exclusions

    excluded = resolve_exclusions(m, exclude)
    kw = dict(calib_method=calib_method, percentile=percentile, activation=activation, op_types=op_types,
              block_size=block_size, min_weight_elements=min_weight_elements, smooth=smooth, progress=progress,
              threads=threads, calib_backend=calib_backend, ort_cpu_forms=ort_cpu_forms,
              embedding_min_rows=embedding_min_rows, embedding_per_row=embedding_per_row, nbits=nbits)
    res = _run_mode(m, float_model, qmode, calibration, excluded, notes, **kw)
    if accuracy_target is not None and res.layers:
        from graft.compiler.techniques.quantization.fallback import fall_back_to_float

        res = fall_back_to_float(res, float_model, qmode, calibration, excluded, accuracy_target, max_float_layers,
                                 lambda exc, n: _run_mode(load_model(float_model), float_model, qmode, calibration,
                                                          exc, n, **kw), metric=accuracy_metric, threads=threads)
    seconds.update(res.seconds)
    res.seconds = seconds
    if report:
        t = time.perf_counter()
        attach_report(res, eval_data, calibration, threads)
        seconds["report"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return res


def attach_report(res: QuantizeResult, eval_data, calibration, threads: int) -> None:
    """Put the accuracy report of ``res`` against its float model on it (``res.report``), in place."""
    feeds, src, held, synth = _eval_feeds(eval_data, calibration, res.float_model)
    if synth:
        res.notes.append("the accuracy report uses random inputs: a smoke test, not a measurement")
    res.report = accuracy_report(res.float_model, res.model, feeds, layers=res.layers, source=src, held_out=held,
                                 synthetic=synth, threads=threads)


def _run_mode(m: ir.Model, float_model: ir.Model, qmode: Mode, calibration, excluded: set[str], notes: list[str], *,
              calib_method, percentile, activation, op_types, block_size, min_weight_elements, smooth, progress,
              threads, calib_backend, ort_cpu_forms=True, embedding_min_rows=0,
              embedding_per_row=True, nbits=None) -> QuantizeResult:
    from graft.compiler.engine.rewriter import Rewriter
    from graft.compiler.engine.rule import RuleSet
    from graft.rules.dead_code import eliminate_dead_code

    seconds: dict[str, float] = {}
    layers: list = []
    table = None
    roots: dict[str, object] = {}

    def on_rewrite(rule, match, new_nodes):
        for n in match.nodes:
            if n.op_type in ("Conv", "Gemm", "MatMul", "Add", "Mul", "Gather", "GlobalAveragePool", "AveragePool"):
                roots.setdefault(node_key(n), n.op_type)

    counts: dict[str, int] = {}

    def run(rules, name):
        r = Rewriter(RuleSet(rules, name=name), on_rewrite=on_rewrite).run(m)
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v

    t = time.perf_counter()
    if qmode.kind == "static":
        table, plan = _static(m, qmode, calibration, excluded, notes, run, calib_method, percentile, activation,
                              op_types, progress, threads, calib_backend)
        seconds["calibrate"] = table.seconds
        roots = {k: v for k, v in roots.items() if k in plan.nodes}
    elif qmode.kind == "dynamic":
        ctx = QuantContext(per_channel=qmode.per_channel, excluded=excluded, min_weight_elements=min_weight_elements,
                           weight=INT8_SYM, embedding_min_rows=embedding_min_rows,
                           embedding_per_row=embedding_per_row)
        if smooth is not None:
            from graft.compiler.techniques.quantization.smooth import smoothing_factors

            if calibration is None:
                raise QuantizationError("SmoothQuant (smooth=...) needs calibration data to measure activation "
                                        "ranges; pass calibration=... or smooth=None")
            table, ctx.smoothing = smoothing_factors(m, calibration, smooth, excluded, progress=progress,
                                                     threads=threads, backend=calib_backend)
            from graft.rules.quantize_dynamic import smoothing_rules

            run(smoothing_rules(ctx), "smoothing")
            roots.clear()
        from graft.rules.quantize_dynamic import dynamic_rules

        run(dynamic_rules(ctx), "dynamic")
        if ort_cpu_forms:
            from graft.rules import quantize_ort

            # not through run(): these rewrites touch no layer, so they stay out of the report's layer list
            r = Rewriter(RuleSet(quantize_ort.RULES, name="ort_cpu_forms")).run(m)
            for k, v in r.counts.items():
                counts[k] = counts.get(k, 0) + v
    else:
        ctx = QuantContext(excluded=excluded, per_channel=True, block_size=block_size,
                           weight=INT4_SYM if qmode.bits == 4 else INT8_SYM, min_weight_elements=min_weight_elements)
        from graft.rules.quantize_nbits import NBitsOptions, nbits_rules

        if nbits is None:
            nbits = NBitsOptions(qmode.bits, block_size).check()
        run(nbits_rules(ctx, nbits), "weight_only")
        if nbits.form == "matmulnbits" and "com.microsoft" not in m.opset_imports:
            m.opset_imports["com.microsoft"] = 1
    seconds["rewrite"] = time.perf_counter() - t
    eliminate_dead_code(m)
    _restore_names(m)
    from graft.ir.verifier import problems

    found = problems(m)
    if found:
        raise QuantizationError(f"the quantized model fails ir.verify: {found[0]} (rules fired: "
                                f"{', '.join(sorted(counts))}); this is a graft bug, please report it")
    from graft.ir.shapes import infer_shapes

    infer_shapes(m)
    for key, op_type in roots.items():
        fn = next((n for n in float_model.graph if node_key(n) == key), None)
        if fn is None or not fn.outputs:
            continue
        tin = fn.inputs[0].name if fn.inputs and fn.inputs[0] is not None and \
            fn.inputs[0].constant() is None else None
        layers.append((key, op_type, fn.outputs[0].name, tin))
    return QuantizeResult(m, float_model, qmode.name, counts, layers, set(excluded), table, None, notes, seconds)


def _static(m, qmode, calibration, excluded, notes, run, calib_method, percentile, activation, op_types, progress,
            threads, calib_backend):
    from graft.compiler.techniques.calibration import calibrate
    from graft.compiler.techniques.quantization.select import DEFAULT_STATIC_OPS, equalize_concat_ranges, static_plan
    from graft.rules import quantize_propagate
    from graft.rules.quantize_static import static_rules

    if calibration is None:
        raise QuantizationError(f"{qmode.name} quantization needs calibration data (calibration=PATH to an .npz or a "
                                f"directory of .npy, or an iterable of feeds; CLI: --calibration PATH). Use "
                                f"mode='dynamic' to quantize without it")
    asym = activation == "uint8"
    plan = static_plan(m, excluded, op_types or DEFAULT_STATIC_OPS, asymmetric=asym)
    if not plan.nodes:
        notes.append("no node could be quantized statically: " + "; ".join(f"{k}: {v}" for k, v in
                                                                           list(plan.skipped.items())[:5]))
    t = time.perf_counter()
    table = calibrate(m, calibration, sorted(plan.tensors), method=calib_method, percentile=percentile,
                      progress=progress, threads=threads, backend=calib_backend)
    table.seconds = time.perf_counter() - t
    if table.synthetic:
        notes.append(f"calibration data is {table.source}: ranges from random data are a smoke test only")
    equalize_concat_ranges(table, plan.concat_groups)
    ctx = QuantContext(table=table, tensors=set(plan.tensors), activation=UINT8_ASYM if asym else INT8_SYM,
                       per_channel=qmode.per_channel, excluded=excluded, nodes=set(plan.nodes))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        run([*static_rules(ctx), *quantize_propagate.RULES], "static_qdq")
    return table, plan


def _restore_names(model: ir.Model) -> None:
    """Re-emitted nodes got fresh names (conv1_1); give back the input model's name where it is free."""
    from graft.rules.quantize_context import QNAME_KEY

    taken = {n.name for n in model.graph}
    for n in model.graph:
        key = n.meta.get(QNAME_KEY)
        if key and key != n.name and key not in taken:
            taken.discard(n.name)
            n.name = key
            taken.add(key)
