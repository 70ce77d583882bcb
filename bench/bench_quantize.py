"""Int8 quantization, side by side: graft against onnxruntime.quantization (issue 4 targets).

For each model, the same float model and the same calibration data go to every quantizer:

- ``ort quantize_dynamic`` (per tensor and per channel, int8 weights) and ``ort quantize_static``
  (QDQ, per tensor and per channel, MinMax, uint8 activations, int8 weights) from
  ``onnxruntime.quantization``;
- graft: ``graft.compiler.techniques.quantization.quantize`` in its formats (static per channel / per tensor,
  dynamic, dynamic with outlier channel splitting) and ``auto``. On MiniLM also graft dynamic
  with ``ort_cpu_forms=False`` (residual Adds left as Add, so onnxruntime fuses them into its
  SkipLayerNormalization kernel, ~5x slower than Add + LayerNormalization here): the row shows
  what :mod:`graft.rules.quantize_ort` is worth.

Every graft decision (which activations get their outlier channels split, the split threshold)
is made from the calibration sentences only; the held-out sentences are used only here, to measure.

Measured, per model and quantizer:
- latency: onnxruntime CPU, 1 intra-op thread, all graph optimizations, batch 1; the median over
  ``--rounds`` rounds (interleaved across quantizers) of the process CPU time per feed
  (``time.process_time``: on a shared machine wall time counts other processes' time slices);
  speedup = float latency / latency;
- accuracy: all-MiniLM-L6-v2 — cosine of the mask-aware mean-pooled sentence embedding to float's,
  minimum and mean over the 103 held-out sentences of ``examples/data/sentences.txt``;
  digits CNN — top-1 accuracy on the held-out 30% of scikit-learn's digits, vs float's;
  PP-OCR cls — agreement with float's predicted direction on rendered text lines (and accuracy
  against the true direction);
- size: serialized model bytes / float's.

Targets (issue 4): MiniLM int8 cosine ≥ 0.99 for every sentence, ≥ 2× float speed at 1 thread,
size ≤ 27%, no worse than the best onnxruntime quantizer on accuracy and speed; digits int8
within 0.5 points; PP-OCR cls agreement ≥ 99% on ≥ 200 lines.

Usage::

    .venv/bin/python bench/bench_quantize.py                     # all three models
    .venv/bin/python bench/bench_quantize.py --models minilm --rounds 9 --out bench/quantize.md
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))


# ---------------------------------------------------------------- timing
def sessions(paths: dict[str, str]):
    import onnxruntime as ort

    out = {}
    for name, p in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        out[name] = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    return out


def latencies(sess: dict, feeds: list[dict], rounds: int) -> dict[str, float]:
    """Median over interleaved rounds of CPU ms per feed."""
    for s in sess.values():
        for f in feeds[:3]:
            s.run(None, f)
    times = {k: [] for k in sess}
    for _ in range(rounds):
        for k, s in sess.items():
            t = time.process_time()
            for f in feeds:
                s.run(None, f)
            times[k].append((time.process_time() - t) / len(feeds) * 1000.0)
    return {k: float(np.median(v)) for k, v in times.items()}


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def ort_quantizers(src: str, calib: list[dict], d: str, static: bool = True) -> dict[str, str]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    out = {}
    logging.disable(logging.WARNING)
    try:
        for pc in (False, True):
            p = os.path.join(d, f"ort_dynamic{'_pc' if pc else ''}.onnx")
            quantize_dynamic(src, p, weight_type=QuantType.QInt8, per_channel=pc)
            out[f"ort quantize_dynamic{' per-channel' if pc else ''}"] = p
        if static:
            for pc in (False, True):
                p = os.path.join(d, f"ort_static{'_pc' if pc else ''}.onnx")
                quantize_static(src, p, _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=pc,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                out[f"ort quantize_static{' per-channel' if pc else ''}"] = p
    finally:
        logging.disable(logging.NOTSET)
    return out


def graft_quantizers(src: str, calib: list[dict], d: str, modes: dict[str, dict]) -> dict[str, str]:
    from graft.compiler.techniques.quantization import quantize

    out = {}
    for label, kw in modes.items():
        kw = dict(kw)
        mode = kw.pop("mode")
        t = time.perf_counter()
        res = quantize(src, mode, calib, report=False, progress=False, **kw)
        p = os.path.join(d, f"graft_{label.replace(' ', '_').replace('/', '_')}.onnx")
        res.save(p)
        out[f"graft {label}"] = p
        print(f"  graft {label}: quantized in {time.perf_counter() - t:.1f} s"
              + (f" (auto chose {res.mode})" if mode == "auto" else ""), flush=True)
    return out


def table(title: str, rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"### {title}", "", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- models
def bench_minilm(rounds: int) -> str:
    from sentence_data import embedding_cosine, feeds, sentences

    from graft.ir import zoo

    src = str(zoo.minilm_onnx())
    calib_s, held_s = sentences()
    calib, held = feeds(calib_s), feeds(held_s)
    # the 512-row position and 2-row token-type tables stay float (0.6% of the model, 3 run-time ops
    # fewer each); chosen on the calibration sentences: min cosine 0.9935 against 0.9934 with them int8
    small_tables_float = {"embedding_min_rows": 1024}
    with tempfile.TemporaryDirectory() as d:
        paths = {"float": src}
        paths.update(ort_quantizers(src, calib, d))
        paths.update(graft_quantizers(src, calib, d, {
            "dynamic, SkipLayerNorm left to ORT": {"mode": "dynamic", "ort_cpu_forms": False, **small_tables_float},
            "dynamic": {"mode": "dynamic", **small_tables_float},
            "dynamic + split outliers": {"mode": "dynamic", "smooth": "split", **small_tables_float},
            "static per-channel": {"mode": "static"},
        }))
        sess = sessions(paths)
        lat = latencies(sess, held, rounds)
        ref = [sess["float"].run(None, f) for f in held]
        rows = []
        for k, s in sess.items():
            cos = [embedding_cosine(r, s.run(None, f), f) for r, f in zip(ref, held)]
            rows.append((k, f"{min(cos):.4f}", f"{np.mean(cos):.4f}", f"{sum(c >= 0.99 for c in cos)}/{len(cos)}",
                         f"{lat[k]:.3f}", f"{lat['float'] / lat[k]:.2f}x",
                         f"{os.path.getsize(paths[k]) / os.path.getsize(src):.3f}"))
    return table(f"all-MiniLM-L6-v2 ({len(held)} held-out sentences, batch 1, 1 thread)", rows,
                 ("quantizer", "min cos", "mean cos", "cos>=0.99", "ms/sentence", "speedup", "size"))


def bench_digits(rounds: int) -> str:
    from digits_cnn import accuracy, make_digits_model

    with tempfile.TemporaryDirectory() as d:
        src, x_tr, y_tr, x_te, y_te = make_digits_model(d)
        calib = [{"image": x_tr[i:i + 1]} for i in range(256)]
        paths = {"float": src}
        paths.update(ort_quantizers(src, calib, d))
        paths.update(graft_quantizers(src, calib, d, {
            "static per-channel": {"mode": "static"},
            "static per-channel percentile": {"mode": "static", "calib_method": "percentile"},
            "static per-tensor": {"mode": "static-per-tensor"},
            "dynamic": {"mode": "dynamic"},
            "auto": {"mode": "auto"},
        }))
        sess = sessions(paths)
        feeds = [{"image": x_te[i:i + 1]} for i in range(64)]
        lat = latencies(sess, feeds, rounds)
        f_acc = accuracy(src, x_te, y_te)
        rows = []
        for k, p in paths.items():
            acc = accuracy(p, x_te, y_te)
            rows.append((k, f"{acc:.2f}", f"{acc - f_acc:+.2f}", f"{lat[k]:.4f}", f"{lat['float'] / lat[k]:.2f}x",
                         f"{os.path.getsize(p) / os.path.getsize(src):.3f}"))
    return table(f"digits CNN (scikit-learn digits, {len(y_te)} held-out images, batch 1, 1 thread)", rows,
                 ("quantizer", "accuracy %", "vs float", "ms/image", "speedup", "size"))


def bench_ppocr_cls(rounds: int) -> str:
    import onnx
    from onnx import version_converter
    from text_lines import render_text_lines

    from graft.ir import zoo

    x, labels = render_text_lines(264, seed=0)
    calib = [{"x": x[i:i + 1]} for i in range(64)]
    held_x, held_y = x[64:], labels[64:]
    with tempfile.TemporaryDirectory() as d:
        # both quantizers get the model at opset 13 (per-channel QDQ needs it; the original is opset 11)
        src = os.path.join(d, "ppocr_cls_opset13.onnx")
        onnx.save(version_converter.convert_version(onnx.load(str(zoo.ppocr_path("ppocr-cls"))), 13), src)
        paths = {"float": src}
        paths.update(ort_quantizers(src, calib, d))
        paths.update(graft_quantizers(src, calib, d, {
            "static per-channel": {"mode": "static"},
            "static per-tensor": {"mode": "static-per-tensor"},
            "dynamic": {"mode": "dynamic"},
            "auto": {"mode": "auto"},
        }))
        sess = sessions(paths)
        feeds = [{"x": held_x[i:i + 1]} for i in range(32)]
        lat = latencies(sess, feeds, rounds)

        def predict(s):
            return np.concatenate([s.run(None, {"x": held_x[i:i + 1]})[0] for i in range(len(held_x))]).argmax(1)

        pf = predict(sess["float"])
        rows = []
        for k, s in sess.items():
            p = predict(s)
            rows.append((k, f"{(p == pf).mean() * 100:.1f}", f"{(p == held_y).mean() * 100:.1f}", f"{lat[k]:.3f}",
                         f"{lat['float'] / lat[k]:.2f}x", f"{os.path.getsize(paths[k]) / os.path.getsize(src):.3f}"))
    return table(f"PP-OCR mobile v2.0 cls ({len(held_x)} rendered text lines, batch 1, 1 thread)", rows,
                 ("quantizer", "agrees with float %", "correct %", "ms/line", "speedup", "size"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "digits", "ppocr-cls"],
                    choices=["minilm", "digits", "ppocr-cls"])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median)")
    ap.add_argument("--out", default=None, help="also write the tables (markdown) to this file")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    runs = {"minilm": bench_minilm, "digits": bench_digits, "ppocr-cls": bench_ppocr_cls}
    parts = []
    for name in args.models:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        parts.append(runs[name](args.rounds))
        print(parts[-1], flush=True)
        print(f"({name}: {time.perf_counter() - t:.0f} s)\n", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
