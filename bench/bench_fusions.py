"""Transformer fusions side by side: graft's ``fuse_ort`` pipeline, onnxruntime.transformers
``optimize_model`` (auto-detected heads, and ``num_heads`` given by hand) and onnxscript's
``optimize_for_ort``, on the same exported files, in one run.

For every model it prints: attention blocks fused (out of the model's layers), the max abs error
of each tool's output against the unfused model in onnxruntime, and onnxruntime latency (median
of interleaved runs) at 1 and 2 threads, batch 1 (``--batch8`` adds batch 8 for dynamic exports).

Models (tests/compiler/transformer_models.py, random weights, hidden ``--hidden``, 2 layers, 4
heads): BERT, ViT, CLIP text and vision towers, a Whisper encoder and wav2vec2, each exported
with ``torch.onnx.export(dynamo=False, opset 17)`` under eager and sdpa attention at dynamic and
static shapes, plus BERT and ViT through ``dynamo=True``; sequence 128, 224 px images, 10 s of
16 kHz audio. Then all-MiniLM-L6-v2 (real weights). ``--minilm`` measures only MiniLM: the input
against ``optimize``, ``fuse_ort`` and ``fuse_ort_skiplayernorm`` at one thread, sequence 128.

Usage::

    python bench/bench_fusions.py                  # everything (~15 min on 2 cores)
    python bench/bench_fusions.py --quick          # dynamic TorchScript exports only, fewer runs
    python bench/bench_fusions.py --minilm --runs 300

Timing: each candidate gets its own onnxruntime session (default graph optimizations, as users
run them); runs are interleaved (one run of each candidate per round) and the median is
reported, so a slower period of a shared host hits every candidate alike.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.compiler import transformer_models as tm  # noqa: E402

ATTENTION_OPS = {"Attention", "MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention",
                 "GroupQueryAttention"}
ORT_MODEL_TYPE = {"bert": "bert", "vit": "vit", "clip_text": "clip", "clip_vision": "clip", "whisper_enc": "bart",
                  "wav2vec2": "bert"}


# --------------------------------------------------------------------------- candidates
def graft_fuse(path: Path, out: Path, feeds, pipeline: str = "fuse_ort") -> Path:
    from graft.compiler import compile

    compile(str(path), pipeline=pipeline, example_inputs=feeds).save(out)
    return out


def ort_optimize(path: Path, out: Path, family: str, heads: int = 0, hidden: int = 0) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = optimize_model(str(path), model_type=ORT_MODEL_TYPE[family], num_heads=heads, hidden_size=hidden)
    m.save_model_to_file(str(out))
    return out


def onnxscript_optimize(path: Path, out: Path) -> Path:
    import onnx_ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = onnx_ir.load(str(path))
    model, _ = optimize_for_ort(model)
    onnx_ir.save(model, str(out))
    return out


def attention_count(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in m.graph.node if n.op_type in ATTENTION_OPS)


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def max_abs(ref: list, got: list) -> float:
    return max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(ref, got))


def run_times(sessions: dict, feeds, runs: int, warmup: int = 5) -> dict[str, list[float]]:
    """Seconds per run of each candidate, ``runs`` rounds interleaved across candidates."""
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    times = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    return times


def timed(sessions: dict, feeds, runs: int, warmup: int = 5) -> dict[str, float]:
    """Median ms per candidate, runs interleaved."""
    return {k: statistics.median(v) * 1e3 for k, v in run_times(sessions, feeds, runs, warmup).items()}


# --------------------------------------------------------------------------- one model
def bench_model(name: str, path: Path, family: str, hidden: int, heads: int, feeds_by_batch: dict, work: Path,
                runs: int, threads: list[int]) -> dict:
    """Build every candidate of ``path``; measure fusion count, error and latency."""
    cands: dict[str, Path | str] = {"input": path}
    makers = {
        "graft": lambda: graft_fuse(path, work / f"{name}.graft.onnx", feeds_by_batch[1]),
        "ort": lambda: ort_optimize(path, work / f"{name}.ort.onnx", family),
        "ort+heads": lambda: ort_optimize(path, work / f"{name}.ortheads.onnx", family, heads, hidden),
        "onnxscript": lambda: onnxscript_optimize(path, work / f"{name}.onnxscript.onnx"),
    }
    build_s = {}
    for k, make in makers.items():
        t0 = time.perf_counter()
        try:
            cands[k] = make()
        except Exception as e:  # a tool that fails on a model is a result too
            cands[k] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        build_s[k] = time.perf_counter() - t0
    row = {"model": name, "fused": {}, "err": {}, "ms": {}, "build_s": build_s}
    ref = {b: session(path, 1).run(None, f) for b, f in feeds_by_batch.items()}
    ok = {}
    for k, p in cands.items():
        if isinstance(p, str):
            row["fused"][k] = p
            continue
        row["fused"][k] = attention_count(p)
        try:
            row["err"][k] = max(max_abs(ref[b], session(p, 1).run(None, f)) for b, f in feeds_by_batch.items())
            ok[k] = p
        except Exception as e:
            row["err"][k] = f"does not run: {str(e).splitlines()[0][:80]}"
    for t in threads:
        for b, f in feeds_by_batch.items():
            row["ms"][(t, b)] = timed({k: session(p, t) for k, p in ok.items()}, f, runs)
    return row


def _fmt_ms(row, t, b, k):
    got = row["ms"].get((t, b), {})
    if k not in got:
        return "–"
    base = got.get("input")
    return f"{got[k]:.2f}" + (f" ({got[k] / base:.2f}×)" if base and k != "input" else "")


def print_table(rows: list[dict], layers: int, threads: list[int], batches: list[int]) -> None:
    tools = ["graft", "ort", "ort+heads", "onnxscript"]
    print("\n### Attention blocks fused / max abs error vs unfused\n")
    print("| model | " + " | ".join(tools) + " |")
    print("|---|" + "---|" * len(tools))
    for r in rows:
        cells = []
        for k in tools:
            f = r["fused"].get(k)
            if isinstance(f, str):
                cells.append(f)
                continue
            e = r["err"].get(k)
            e = f"{e:.1e}" if isinstance(e, float) else (e or "–")
            cells.append(f"{f}/{r['layers']}, {e}")
        print(f"| {r['model']} | " + " | ".join(cells) + " |")
    for t in threads:
        for b in batches:
            print(f"\n### onnxruntime latency, ms (× input), {t} thread{'s' if t > 1 else ''}, batch {b}\n")
            print("| model | input | " + " | ".join(tools) + " |")
            print("|---|---|" + "---|" * len(tools))
            for r in rows:
                if (t, b) not in r["ms"]:
                    continue
                print(f"| {r['model']} | " + " | ".join(_fmt_ms(r, t, b, k) for k in ["input", *tools]) + " |")
    fused = {k: sum(1 for r in rows if r["fused"].get(k) == r["layers"]) for k in tools}
    print(f"\nmodels with every attention block fused (of {len(rows)}): " +
          ", ".join(f"{k} {v}" for k, v in fused.items()))


# --------------------------------------------------------------------------- MiniLM
def minilm(runs: int, work: Path, threads: int = 1, seq: int = 128) -> None:
    from graft.compiler import compile
    from graft.ir import zoo

    src = zoo.minilm_onnx()
    paths = {"input": src}
    for p in ("optimize", "fuse_ort", "fuse_ort_skiplayernorm"):
        out = work / f"minilm.{p}.onnx"
        compile(str(src), pipeline=p).save(out)
        paths[p] = out
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 30000, (1, seq)).astype(np.int64),
             "attention_mask": np.ones((1, seq), np.int64)}
    sessions = {k: session(p, threads) for k, p in paths.items()}
    times = run_times(sessions, feeds, runs, warmup=10)
    print(f"\n### all-MiniLM-L6-v2, seq {seq}, batch 1, {threads} thread(s), median of {runs} interleaved runs\n")
    print("| model | median ms | p25–p75 ms | × input |")
    print("|---|---|---|---|")
    base = statistics.median(times["input"])
    for k, v in times.items():
        q = np.percentile(v, [25, 75]) * 1e3
        print(f"| {k} | {statistics.median(v) * 1e3:.2f} | {q[0]:.2f}–{q[1]:.2f} | {statistics.median(v) / base:.3f} |")


# --------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--runs", type=int, default=50, help="interleaved timed runs per candidate and setting")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch8", action="store_true", help="also time batch 8 (dynamic exports)")
    ap.add_argument("--quick", action="store_true", help="dynamic TorchScript exports only")
    ap.add_argument("--families", default=",".join(tm.FAMILIES))
    ap.add_argument("--minilm", action="store_true", help="only the MiniLM optimize/fuse_ort timing")
    ap.add_argument("--minilm-runs", type=int, default=300)
    ap.add_argument("--cache", default=None, help="directory for the exports (default: a temporary one)")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    work = Path(args.cache or tempfile.mkdtemp(prefix="graft-bench-fusions-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"onnxruntime {ort.__version__}, host {os.uname().machine}, {os.cpu_count()} CPUs; exports in {work}")
    if args.minilm:
        minilm(args.minilm_runs, work)
        return
    fams = args.families.split(",")
    variants = [tm.Variant(f, a, d, size="bench", hidden=args.hidden, heads=args.heads)
                for f in fams for a in ("eager", "sdpa") for d in ((True,) if args.quick else (True, False))]
    if not args.quick:
        variants += [tm.Variant(f, "sdpa", True, dynamo=True, size="bench", hidden=args.hidden, heads=args.heads)
                     for f in ("bert", "vit") if f in fams]
    rows = []
    batches = [1, 8] if args.batch8 else [1]
    for v in variants:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = tm.export(v, work)
        feeds = {1: tm.feeds(v)}
        if args.batch8 and v.dynamic:
            feeds[8] = tm.feeds(v, batch=8)
        row = bench_model(v.key, path, v.family, args.hidden, args.heads, feeds, work, args.runs, threads)
        row["layers"] = v.layers
        rows.append(row)
        print(f"  {v.key}: fused {row['fused']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print_table(rows, tm.LAYERS, threads, batches)
    minilm(args.minilm_runs, work)
    counts = collections.Counter(isinstance(r["fused"].get("graft"), int) for r in rows)
    print(f"\n{counts[True]} models compiled by graft")


if __name__ == "__main__":
    main()
