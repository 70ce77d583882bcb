"""``--quantize auto``: build the candidate formats, time each on the target, keep the fastest within budget.

Candidates (default): ``static-per-tensor``, ``static-per-channel``, ``dynamic``; static ones need
calibration data, and a format the model's opset cannot express is skipped with the reason.
Each candidate is quantized, run in onnxruntime CPU (all graph optimizations on, as deployed)
on the evaluation feeds, and scored:

- latency: median over rounds of the process CPU time per feed (``time.process_time``; with one
  intra-op thread this is the compute the run costs, and it does not count time the OS gave to
  other processes — wall time on a shared machine does);
- error: the minimum over outputs and samples of the output cosine against the float model
  (or a user metric).

The fastest candidate whose error meets the budget wins; if none does, the most accurate one
is kept and the result says so. There is no fixed default because none is right everywhere:
static per-channel int8 can be slower than float on a CPU (QDQ boundaries around unquantized
ops) while dynamic int8 is several times faster on MatMul-heavy transformers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from graft import ir
from graft.compiler.techniques.quantization.fallback import cosine_metric
from graft.compiler.techniques.quantization.modes import check_opset, parse_mode
from graft.rules.quantize_params import QuantizationError

DEFAULT_CANDIDATES = ("static-per-tensor", "static-per-channel", "dynamic")


def measure_latency(proto_or_bytes, feeds: list[dict], *, threads: int = 1, rounds: int = 5,
                    warmup: int = 2) -> float:
    """Median over ``rounds`` of the mean process CPU time per feed, in milliseconds.

    onnxruntime CPU with all graph optimizations, ``threads`` intra-op threads (CPU time equals
    latency only for one thread; with more it is the total compute).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    data = proto_or_bytes if isinstance(proto_or_bytes, (bytes, str)) else proto_or_bytes.SerializeToString()
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    for f in feeds[:max(1, warmup)]:
        sess.run(None, f)
    times = []
    for _ in range(rounds):
        t = time.process_time()
        for f in feeds:
            sess.run(None, f)
        times.append((time.process_time() - t) / len(feeds) * 1000.0)
    return float(np.median(times))


@dataclass
class Candidate:
    """One format tried: its latency (ms per feed), error score, size, and why it was skipped or lost."""

    mode: str
    latency_ms: float | None = None
    score: float | None = None
    bytes: int | None = None
    status: str = ""
    result: object = None

    def row(self) -> tuple:
        lat = f"{self.latency_ms:.3f}" if self.latency_ms is not None else "-"
        sc = f"{self.score:.5f}" if self.score is not None else "-"
        size = f"{self.bytes / 1e6:.2f}" if self.bytes is not None else "-"
        return self.mode, lat, sc, size, self.status


@dataclass
class AutoResult:
    """All candidates (float first), the chosen one, and its :class:`QuantizeResult`."""

    candidates: list[Candidate] = field(default_factory=list)
    chosen: str = ""
    result: object = None
    budget: float = 0.99

    def table(self, width: int = 100) -> str:
        """Every candidate's latency and error, as text."""
        from rich.console import Console
        from rich.table import Table

        from graft.compiler.techniques.quantization.report import NullWriter

        console = Console(width=width, record=True, file=NullWriter(), color_system=None)
        t = Table(title=f"quantization formats (budget: score >= {self.budget})", show_edge=False)
        for c in ("format", "latency ms", "score", "MB", "status"):
            t.add_column(c, justify="left" if c in ("format", "status") else "right")
        for c in self.candidates:
            t.add_row(*c.row())
        console.print(t)
        return console.export_text()


def _model_bytes(model: ir.Model) -> int:
    return sum(v.const.nbytes for v in model.graph.initializers.values())


def auto_quantize(model, calibration=None, *, candidates=DEFAULT_CANDIDATES, budget: float = 0.99, eval_data=None,
                  metric=None, threads: int = 1, rounds: int = 5, exclude=None, calib_method: str = "minmax",
                  progress: bool = True, **kw) -> AutoResult:
    """Quantize ``model`` in each candidate format and keep the fastest one scoring >= ``budget``.

    Args:
        candidates: formats to try (names of :data:`graft.compiler.techniques.quantization.MODES`).
        budget: minimum score (default metric: the worst output cosine against float).
        eval_data: feeds to time and score on (default: the calibration data, else random).
        metric: ``(float outputs, quantized outputs, feed) -> score`` per sample.
        threads, rounds: timing setup (see :func:`measure_latency`).
        kw: passed to :func:`graft.compiler.techniques.quantization.quantize` (e.g. ``smooth``).

    Returns:
        :class:`AutoResult`; ``.result`` is the chosen :class:`QuantizeResult` (its notes hold the table).

    Raises:
        QuantizationError: no candidate could be built at all.
    """
    from graft.compiler.techniques.calibration.data import CalibrationData, as_calibration_data
    from graft.compiler.techniques.calibration.ort_runner import run_feeds
    from graft.compiler.techniques.quantization.core import load_model, prepare, quantize_format

    metric = metric or cosine_metric
    base = load_model(model)
    float_model = prepare(load_model(base), kw.get("prepare_pipeline", "optimize"), kw.get("simplify_shapes", True))
    if eval_data is not None:
        feeds = list(as_calibration_data(eval_data, float_model))
    elif calibration is not None:
        feeds = list(as_calibration_data(calibration, float_model))
    else:
        feeds = list(CalibrationData.random(float_model, n=8))
    feeds = feeds[:64]
    ref_src = ir.to_onnx(base).SerializeToString()
    ref_outs = run_feeds(ref_src, feeds)
    out = AutoResult(budget=budget)
    f = Candidate("float (input model)", measure_latency(ref_src, feeds, threads=threads, rounds=rounds), 1.0,
                  _model_bytes(base), "reference")
    out.candidates.append(f)
    for name in candidates:
        c = Candidate(name)
        out.candidates.append(c)
        qmode = parse_mode(name)
        if qmode.kind == "static" and calibration is None:
            c.status = "skipped: needs calibration data"
            continue
        try:
            check_opset(qmode, base.opset)
        except QuantizationError:
            if not kw.get("upgrade_opset"):
                c.status = f"skipped: needs opset >= {qmode.min_opset} (model has {base.opset})"
                continue
        try:
            res = quantize_format(base, name, calibration, exclude=exclude, calib_method=calib_method,
                                  report=False, progress=progress, **kw)
        except QuantizationError as e:
            c.status = f"failed: {e}"
            continue
        proto = ir.to_onnx(res.model).SerializeToString()
        q_outs = run_feeds(proto, feeds)
        c.score = min(metric(a, b, fd) for a, b, fd in zip(ref_outs, q_outs, feeds))
        c.latency_ms = measure_latency(proto, feeds, threads=threads, rounds=rounds)
        c.bytes = _model_bytes(res.model)
        c.result = res
    built = [c for c in out.candidates[1:] if c.result is not None]
    if not built:
        raise QuantizationError("auto: no candidate format could be built: " +
                                "; ".join(f"{c.mode}: {c.status}" for c in out.candidates[1:]))
    ok = [c for c in built if c.score >= budget]
    if ok:
        best = min(ok, key=lambda c: c.latency_ms)
        best.status = "chosen: fastest within budget"
        for c in ok:
            if c is not best:
                c.status = "within budget, slower"
        for c in built:
            if c not in ok:
                c.status = "over budget"
    else:
        best = max(built, key=lambda c: c.score)
        best.status = "chosen: most accurate (none met the budget)"
        for c in built:
            if c is not best:
                c.status = "over budget"
    out.chosen = best.mode
    out.result = best.result
    out.result.notes.append("auto format selection:\n" + out.table())
    if best.latency_ms > f.latency_ms:
        out.result.notes.append(f"the chosen format ({best.mode}) is slower than the float model here "
                                f"({best.latency_ms:.3f} vs {f.latency_ms:.3f} ms)")
    return out
