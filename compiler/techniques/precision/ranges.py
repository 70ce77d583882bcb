"""Measured ranges: run the float32 model in onnxruntime and record what the lower type must hold.

Every float tensor of the main graph becomes an extra graph output
(:func:`graft.compiler.techniques.calibration.instrumented_proto`) and the model runs on each feed
(calibration data, or generated inputs, which the report marks as such). Per tensor:

- ``absmax``: the largest finite ``|x|``, the number the overflow check compares with the target
  type's range;
- ``nonfinite``: inf/NaN values the float32 model itself produced — a fault of the data or the
  model, reported as such and never blamed on the conversion.

Constants beyond the target's finite range (a ``-3.4e38`` additive attention mask; float16 holds
±65504) are a special case. Saturating such a constant to the type's largest finite value keeps
its meaning when the model only uses it as "minus infinity": the technique checks this by running
the float32 model with the constant saturated (variant A) and comparing every output with the
original. Accepted constants are converted saturated; ranges are then measured on variant A, and
the values that only exist because of the sentinel — those that change when the constant is
halved instead (variant B) — are left out of ``absmax``: they are the mask, which float16 holds as
``-65504`` or ``-inf``, not data that overflows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from graft import ir
from graft.compiler.techniques.calibration import instrumented_proto
from graft.ir.dtypes import DataType
from graft.rules.precision import limits

# outputs of the saturated model must equal the original's to this relative precision
SATURATION_RTOL = 1e-5
# at most this many out-of-range constants are tried one by one when saturating all at once changes outputs
MAX_SINGLE_TRIES = 16


@dataclass
class Measurements:
    """What the float32 model did on the feeds.

    Attributes:
        feeds: the inputs (one dict per run).
        source: where they came from; synthetic: generated, not real data.
        absmax: tensor name → largest finite |x| (mask values excluded, see the module doc).
        nonfinite: tensor name → inf/NaN count in the original float32 model (only tensors with some).
        outputs: per feed, graph output name → the original float32 model's output.
        captures: tensor name → its values on the first feeds (the inputs of reduction nodes).
        saturated: constant name → its largest finite |x|, for the constants that saturate without
            changing the outputs.
        unsaturable: constant name → (largest |x|, why saturating it is refused).
    """

    feeds: list[dict[str, np.ndarray]]
    source: str
    synthetic: bool
    absmax: dict[str, float] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    captures: dict[str, list[np.ndarray]] = field(default_factory=dict)
    saturated: dict[str, float] = field(default_factory=dict)
    unsaturable: dict[str, tuple[float, str]] = field(default_factory=dict)


def session(src: onnx.ModelProto | bytes | str):
    """An onnxruntime CPU session (a ModelProto, its bytes or a path) with basic graph optimizations
    (no fusion: exposed values stay)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    data = src if isinstance(src, (bytes, str)) else src.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def out_of_range_constants(model: ir.Model, target: DataType) -> dict[str, float]:
    """Main-graph float32 initializers with a finite value beyond ``target``'s range → their max |x|."""
    lim = limits(target).max
    out = {}
    for name, v in model.graph.initializers.items():
        if v.dtype != DataType.FLOAT or v.const.size == 0:
            continue
        a = v.const.array
        fin = np.isfinite(a)
        big = np.abs(np.where(fin, a, 0)).max()
        if big > lim:
            out[name] = float(big)
    return out


def _variant(proto: onnx.ModelProto, model: ir.Model, names, target: DataType, scale: float) -> bytes:
    """``proto`` with constants ``names`` saturated to ±scale × max of ``target`` (serialized)."""
    lim = limits(target).max * scale
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    idx = {t.name: i for i, t in enumerate(p.graph.initializer)}
    for n in names:
        a = np.asarray(model.graph.initializers[n].const.array, dtype=np.float32)
        sat = np.where(np.isfinite(a) & (np.abs(a) > lim), np.sign(a) * lim, a).astype(np.float32)
        p.graph.initializer[idx[n]].CopyFrom(numpy_helper.from_array(sat, n))
    return p.SerializeToString()


def _same_outputs(ref: list[dict], got: list[dict]) -> tuple[bool, str]:
    for i, (r, g) in enumerate(zip(ref, got)):
        for name, a in r.items():
            b = g[name]
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a64.shape != b64.shape:
                return False, f"output {name!r} changes shape on sample {i}"
            fa, fb = np.isfinite(a64), np.isfinite(b64)
            if not np.array_equal(fa, fb):
                return False, f"output {name!r} changes finiteness on sample {i}"
            if fa.any():
                scale = max(1.0, float(np.abs(a64[fa]).max()))
                d = float(np.abs(a64[fa] - b64[fb]).max())
                if d > SATURATION_RTOL * scale:
                    return False, f"output {name!r} changes by {d:.3g} on sample {i}"
    return True, ""


def _run_all(data: bytes, feeds, names) -> list[list[np.ndarray]]:
    sess = session(data)
    return [sess.run(names, f) for f in feeds]


def measure(model: ir.Model, feeds: list[dict[str, np.ndarray]], target: DataType, *, source: str,
            synthetic: bool, capture: set[str] = frozenset(), capture_feeds: int = 2) -> Measurements:
    """Run the float32 ``model`` (types inferred) on ``feeds``; see the module doc.

    Raises:
        RuntimeError: onnxruntime cannot run the model on a feed (names the sample).
    """
    meas = Measurements(feeds, source, synthetic)
    values = [v.name for v in model.graph.inputs if v.dtype == DataType.FLOAT and v.const is None]
    values += [o.name for n in model.graph for o in n.outputs if o.name and o.dtype == DataType.FLOAT]
    outputs = [v.name for v in model.graph.outputs]
    proto, exposed = instrumented_proto(model, [*outputs, *values])
    names = list(dict.fromkeys([*outputs, *exposed]))
    data = proto.SerializeToString()
    try:
        base = _run_all(data, feeds, names)
    except Exception as e:  # onnxruntime raises several types
        msg = " ".join(str(e).split())[:300]
        raise RuntimeError(f"onnxruntime cannot run the float32 model on {source}: {msg}") from None
    meas.outputs = [dict(zip(outputs, run[:len(outputs)])) for run in base]
    for run in base:
        for name, a in zip(names, run):
            if np.asarray(a).dtype.kind == "f":
                nf = int(a.size - np.count_nonzero(np.isfinite(a)))
                if nf:
                    meas.nonfinite[name] = meas.nonfinite.get(name, 0) + nf

    candidates = out_of_range_constants(model, target)
    variant_a = base
    variant_b = None
    if candidates:
        accepted = _saturable(meas, proto, model, candidates, target, feeds, names, outputs)
        if accepted:
            variant_a = _run_all(_variant(proto, model, accepted, target, 1.0), feeds, names)
            variant_b = _run_all(_variant(proto, model, accepted, target, 0.5), feeds, names)
    for k, run in enumerate(variant_a):
        other = variant_b[k] if variant_b is not None else None
        for j, (name, a) in enumerate(zip(names, run)):
            a = np.asarray(a)
            if a.dtype.kind != "f":
                continue
            keep = np.isfinite(a)
            if other is not None:
                keep &= (a == np.asarray(other[j]))
            if keep.any():
                m = float(np.abs(a[keep]).max())
                if m > meas.absmax.get(name, -1.0):
                    meas.absmax[name] = m
            elif name not in meas.absmax:
                meas.absmax[name] = 0.0
            if name in capture and k < capture_feeds:
                meas.captures.setdefault(name, []).append(np.array(a))
    for f in feeds[:capture_feeds]:  # graph inputs read by reduction nodes
        for name in capture:
            if name in f and name not in names:
                meas.captures.setdefault(name, []).append(np.asarray(f[name]))
    return meas


def _saturable(meas: Measurements, proto, model, candidates: dict[str, float], target, feeds, names,
               outputs) -> list[str]:
    """The out-of-range constants whose saturation leaves every float32 output unchanged."""
    n_out = len(outputs)

    def ok(group) -> tuple[bool, str]:
        runs = _run_all(_variant(proto, model, group, target, 1.0), feeds, names)
        return _same_outputs(meas.outputs, [dict(zip(outputs, r[:n_out])) for r in runs])

    good, why = ok(list(candidates))
    if good:
        meas.saturated.update(candidates)
        return list(candidates)
    accepted = []
    for i, (name, big) in enumerate(sorted(candidates.items())):
        if i >= MAX_SINGLE_TRIES:
            meas.unsaturable[name] = (big, f"not tried (more than {MAX_SINGLE_TRIES} out-of-range constants)")
            continue
        good, why = ok([name])
        if good:
            accepted.append(name)
            meas.saturated[name] = big
        else:
            meas.unsaturable[name] = (big, f"saturating it changes the float32 outputs ({why})")
    if accepted:  # accepted one by one: check them together too
        good, why = ok(accepted)
        if not good:
            for name in accepted:
                meas.unsaturable[name] = (meas.saturated.pop(name), f"saturated together with the others, "
                                                                     f"the float32 outputs change ({why})")
            accepted = []
    return accepted
