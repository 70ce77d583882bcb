"""Mixed precision, side by side: graft's fp16 conversion against onnxconverter-common (issue 13).

For each model, the same float32 model goes to

- ``graft``: :func:`graft.compiler.techniques.precision.convert_precision` (``fp16``, keep_io_types),
  ranges measured on the model's own inputs (the same feeds the errors are measured on);
- ``occ``: onnxconverter-common's ``convert_float_to_float16(model, keep_io_types=True)``
  (its defaults: constants clamped to ±1e4, values under 1e-7 to ±1e-7).

Measured per model and tool:

- ``checker``: ``onnx.checker.check_model(full_check=True)`` passes;
- ``loads``: onnxruntime CPU builds a session and runs it;
- ``ort err``: max |y - y_fp32| / max |y_fp32| over the outputs, run in onnxruntime (whose CPU provider
  computes most float16 ops in float32: this mostly shows the weights' rounding);
- ``fp16 err``: the same, run by graft's torch backend, which computes in float16 (what a GPU does,
  roughly); ``inf/nan``: non-finite outputs where float32's are finite, in either run;
- ``size``: serialized bytes / float32's.

Then latency on this CPU (1 thread; median over interleaved rounds of the process CPU time per run):
onnxruntime fp16 vs fp32 (no gain is expected on a CPU), and torch bf16 (graft ``--target torch
--precision bf16``) vs fp32 on MiniLM.

Models: all-MiniLM-L6-v2 (real weights, a held-out sentence), PP-OCR cls/det/rec (rendered text
lines), the transformers families of ``tests/compiler/transformer_models.py`` (BERT, ViT, CLIP text
and vision, Whisper encoder, wav2vec2; eager and sdpa; TorchScript exporter, opset 17, dynamic
shapes), and the two fp16-hostile models of ``tests/compiler/test_precision_technique.py``.

Usage::

    .venv/bin/python bench/bench_precision.py                       # everything (needs onnxconverter-common)
    .venv/bin/python bench/bench_precision.py --models minilm,hostile --rounds 7 --out bench/precision.md
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "compiler"))


# ---------------------------------------------------------------- models: (name, proto, feeds)
def minilm_models():
    from graft.ir import zoo
    from sentence_data import feeds, sentences

    calib, held = sentences()
    return [("minilm", onnx.load(str(zoo.minilm_onnx())), feeds(held[:2]))]


def ppocr_models():
    from graft.ir import zoo
    from text_lines import render_text_lines

    x, _ = render_text_lines(16, seed=5)
    page = np.concatenate([np.concatenate(x[0:2], axis=2), np.concatenate(x[2:4], axis=2)], axis=1)[None]
    return [("ppocr-cls", onnx.load(str(zoo.ppocr_path("ppocr-cls"))), [{"x": x[:8]}]),
            ("ppocr-det", onnx.load(str(zoo.ppocr_path("ppocr-det"))), [{"x": page}]),
            ("ppocr-rec", onnx.load(str(zoo.ppocr_path("ppocr-rec"))), [{"x": x[8:12]}])]


def transformer_models(directory: str):
    from transformer_models import FAMILIES, Variant, export, feeds

    out = []
    for fam in FAMILIES:
        for attn in ("eager", "sdpa"):
            v = Variant(fam, attn)
            out.append((v.key, onnx.load(str(export(v, directory))), [feeds(v)]))
    return out


def hostile_models():
    from test_precision_technique import (layernorm_hostile, layernorm_hostile_feeds, masked_softmax_feeds,
                                masked_softmax_hostile)

    return [("hostile-layernorm", layernorm_hostile(), layernorm_hostile_feeds(2)),
            ("hostile-mask", masked_softmax_hostile(), masked_softmax_feeds(2))]


# ---------------------------------------------------------------- conversions
def graft_fp16(proto, feeds):
    from graft import ir
    from graft.compiler.techniques.precision import convert_precision
    from graft.rules.pipelines import get_pipeline

    m = ir.from_onnx(proto)
    get_pipeline("optimize")(m)
    res = convert_precision(m, "fp16", calibration=feeds)
    return ir.to_onnx(res.model), res


def occ_fp16(proto, feeds):
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(proto, keep_io_types=True), None


def _fp32_outputs(proto, feeds):
    from graft.compiler.techniques.precision.ranges import session

    s = session(proto)
    return [s.run(None, f) for f in feeds]


def _rel_err(ref, got) -> tuple[float, int]:
    worst, bad = 0.0, 0
    for r, g in zip(ref, got):
        for a, b in zip(r, g):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            fin = np.isfinite(a)
            bad += int(np.count_nonzero(fin & ~np.isfinite(b)))
            if fin.any() and np.isfinite(b[fin]).all():
                worst = max(worst, float(np.abs(a[fin] - b[fin]).max() / max(np.abs(a[fin]).max(), 1e-30)))
            elif fin.any():
                worst = float("inf")
    return worst, bad


def measure(name, proto, feeds, tool):
    from graft import ir
    from graft.compiler.techniques.precision import evaluate as evaluation
    from graft.compiler.techniques.precision.ranges import session

    row = {"model": name, "tool": tool}
    t = time.perf_counter()
    try:
        out, res = (graft_fp16 if tool == "graft" else occ_fp16)(proto, feeds)
    except Exception as e:  # noqa: BLE001 — a converter that fails is a result
        row.update(error=f"convert: {type(e).__name__}: {' '.join(str(e).split())[:80]}")
        return row
    row["seconds"] = time.perf_counter() - t
    try:
        onnx.checker.check_model(out, full_check=True)
        row["checker"] = "ok"
    except Exception as e:  # noqa: BLE001
        row["checker"] = "FAIL: " + " ".join(str(e).split())[:60]
    ref = _fp32_outputs(proto, feeds)
    try:
        s = session(out)
        got = [s.run(None, f) for f in feeds]
        row["loads"] = "yes"
        row["ort_err"], bad_ort = _rel_err(ref, got)
    except Exception as e:  # noqa: BLE001
        row["loads"] = "no: " + " ".join(str(e).split())[:60]
        bad_ort = 0
    try:
        m = ir.from_onnx(out)
        names = [o.name for o in out.graph.output]
        got = [[r[n] for n in names] for r in evaluation.run(m, feeds[:1], "torch")]
        row["fp16_err"], bad_t = _rel_err(ref[:1], got)
    except Exception as e:  # noqa: BLE001
        row["fp16_err"], bad_t = None, 0
        row.setdefault("note", f"torch backend: {' '.join(str(e).split())[:50]}")
    row["nonfinite"] = bad_ort + bad_t
    row["size"] = len(out.SerializeToString()) / len(proto.SerializeToString())
    if res is not None:
        row["kept"] = len(res.report.kept)
        row["casts"] = res.report.casts
    return row


# ---------------------------------------------------------------- latency
def _median_ms(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():  # interleaved: a slow spell of the shared machine hits every candidate
            t = time.process_time()
            fn()
            times[k].append((time.process_time() - t) * 1000.0)
    return {k: float(np.median(v)) for k, v in times.items()}


def latency(rounds: int) -> list[str]:
    import onnxruntime as ort
    import torch

    from graft import ir
    from graft.compiler import compile as graft_compile
    from graft.ir import zoo
    from sentence_data import feeds, sentences

    torch.set_num_threads(1)
    _, held = sentences()
    feed = feeds([" ".join(held[:6])])[0]  # one longer input: ~100 tokens
    path = str(zoo.minilm_onnx())
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    fp32 = graft_compile(path, precision=None)
    fp16 = graft_compile(path, precision="fp16", calibration=[feed])
    s32 = ort.InferenceSession(fp32.proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(fp16.proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ort_ms = _median_ms({"fp32": lambda: s32.run(None, feed), "fp16": lambda: s16.run(None, feed)}, rounds)
    m32 = ir.to_torch(fp32.model)
    bf = graft_compile(path, precision="bf16", target="torch", calibration=[feed])
    args = [torch.from_numpy(feed[v.name]) for v in fp32.model.graph.inputs]
    with torch.no_grad():
        ref = m32(*args).float().numpy()
        got = bf.module(*args).float().numpy()
        torch_ms = _median_ms({"fp32": lambda: m32(*args), "bf16": lambda: bf.module(*args)}, rounds)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    tokens = feed["input_ids"].shape[1]
    return [f"MiniLM, batch 1 × {tokens} tokens, 1 thread, median of {rounds} interleaved rounds (process CPU time):",
            f"- onnxruntime CPU: fp32 {ort_ms['fp32']:.1f} ms, fp16 {ort_ms['fp16']:.1f} ms "
            f"({ort_ms['fp32'] / ort_ms['fp16']:.2f}x)",
            f"- torch GraphModule: fp32 {torch_ms['fp32']:.1f} ms, bf16 {torch_ms['bf16']:.1f} ms "
            f"({torch_ms['fp32'] / torch_ms['bf16']:.2f}x); bf16 max rel error {err:.3g}, "
            f"{len(bf.precision.report.kept)} node(s) kept in float32"]


# ---------------------------------------------------------------- report
def _fmt(x, spec=".2g"):
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if x == float("inf") else format(x, spec)
    return str(x)


def table(rows) -> list[str]:
    head = "| model | tool | checker | loads in ORT | ORT err | fp16 err | inf/nan | size | kept | casts |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['tool']} | {r['checker']} | {r['loads']} | {_fmt(r.get('ort_err'))} | "
                     f"{_fmt(r.get('fp16_err'))} | {r.get('nonfinite', '-')} | {_fmt(r.get('size'), '.1%')} | "
                     f"{_fmt(r.get('kept'))} | {_fmt(r.get('casts'))} |")
    for tool in ("graft", "occ"):
        mine = [r for r in rows if r["tool"] == tool]
        ok = sum(1 for r in mine if r.get("checker") == "ok" and r.get("loads") == "yes" and not r.get("nonfinite"))
        lines.append(f"\n{tool}: {ok} of {len(mine)} models pass full_check, load and run in onnxruntime with "
                     f"finite outputs")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,ppocr,transformers,hostile",
                    help="comma-separated groups: minilm, ppocr, transformers, hostile")
    ap.add_argument("--tools", default="graft,occ")
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds (0: no latency)")
    ap.add_argument("--out", help="also write the report to this markdown file")
    args = ap.parse_args(argv)
    groups = args.models.split(",")
    models = []
    with tempfile.TemporaryDirectory() as d:
        if "minilm" in groups:
            models += minilm_models()
        if "ppocr" in groups:
            models += ppocr_models()
        if "transformers" in groups:
            models += transformer_models(d)
        if "hostile" in groups:
            models += hostile_models()
        rows = []
        for name, proto, feeds in models:
            for tool in args.tools.split(","):
                rows.append(measure(name, proto, feeds, tool))
                print(rows[-1], file=sys.stderr, flush=True)
    lines = ["# fp16: graft vs onnxconverter-common", ""] + table(rows)
    if args.rounds and "minilm" in groups:
        lines += ["", "## Latency on this CPU", ""] + latency(args.rounds)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
