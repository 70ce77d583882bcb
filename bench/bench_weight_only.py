"""Weight-only int4/int8, side by side: graft against onnxruntime's MatMulNBitsQuantizer (issue 11).

::

    .venv/bin/python bench/bench_weight_only.py                          # small LLM + MiniLM (~5 min)
    .venv/bin/python bench/bench_weight_only.py --llm tinyllama          # + the 1.1B model (4.4 GB; ~25 GB disk)
    .venv/bin/python bench/bench_weight_only.py --llm PATH.onnx --no-minilm --json out.json

Per model, every method runs in a fresh child process (its peak RSS is the child's
``ru_maxrss``) and writes its output with external data:

- ``graft dq``: ``graft compile --no-verify --quantize weight-only-int4`` — standard ONNX
  ``DequantizeLinear(block_size) → MatMul``, which onnxruntime fuses into MatMulNBits at
  ``accuracy_level`` 4 (int8 activations; its ``session.qdq_matmulnbits_accuracy_level`` default);
- ``graft nbits``: ``--weight-format matmulnbits`` (MatMulNBits, accuracy_level unset: float32
  compute on CPU), and ``graft nbits a4``: ``--accuracy-level 4``;
- ``ort rtn``: ``MatMulNBitsQuantizer(model, bits, block_size, is_symmetric=True)`` (its default
  RTN kernel), ``ort hqq``: the same with ``HQQWeightOnlyQuantConfig``; ``ort gptq`` needs
  ``neural_compressor`` and is reported as not run without it.

Then, for the float model and each output: latency in onnxruntime (median of ``--repeat`` runs,
interleaved across models so machine load drifts equally) at batch 1 and 8, 1 and 2 intra-op
threads; accuracy against float — for the LLMs the cosine of the logits on random token ids
(per sample: min and mean), for all-MiniLM-L6-v2 (real weights) the sentence-embedding cosine on
the held-out sentences of ``examples/sentence_data.py``.

The machine's load average is printed with the table: on a shared machine latency numbers drift;
compare within one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRAFT = str(Path(sys.executable).parent / "graft")

_PEAK = """
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
if r.returncode:
    sys.exit((r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else "failed")
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""

_ORT = """
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, HQQWeightOnlyQuantConfig
src, out, algo, bits, block = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = onnx.load(src)
cfg = None
if algo == "hqq":
    cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
elif algo == "gptq":
    import neural_compressor  # noqa: F401 — onnxruntime's GPTQ runs in it
    raise SystemExit("gptq: needs calibration wiring (not done)")
q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, algo_config=cfg)
q.process()
q.model.save_model_to_file(out, use_external_data_format=True)
"""


@dataclass
class Run:
    method: str
    path: Path | None = None
    wall: float = float("nan")
    peak: int = 0
    size: int = 0
    error: str = ""
    latency: dict = field(default_factory=dict)  # (batch, threads) -> [seconds]
    cos_min: float = float("nan")
    cos_mean: float = float("nan")


def _files_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.parent.iterdir() if f.name == p.name or f.name.startswith(p.name + "."))


def _measure(cmd: list[str], timeout: float) -> tuple[float, int, str]:
    try:
        r = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return float("nan"), 0, f"timed out after {timeout:.0f} s"
    if r.returncode:
        return float("nan"), 0, (r.stderr.strip().splitlines() or ["failed"])[-1][:200]
    wall, peak = r.stdout.split()[-2:]
    return float(wall), int(peak), ""


def quantize_all(src: Path, work: Path, bits: int, block: int, methods: list[str], opset: int,
                 timeout: float) -> list[Run]:
    runs = []
    for m in methods:
        out = work / f"{m.replace(' ', '_')}.onnx"
        if m.startswith("graft"):
            cmd = [GRAFT, "compile", str(src), "-o", str(out), "--no-verify", "-q", "--quantize",
                   f"weight-only-int{bits}", "--block-size", str(block)]
            if m != "graft dq":
                cmd += ["--weight-format", "matmulnbits"]
            elif opset < 21:
                cmd += ["--upgrade-opset"]
            if m == "graft nbits a4":
                cmd += ["--accuracy-level", "4"]
        else:
            cmd = [sys.executable, "-c", _ORT, str(src), str(out), m.split()[1], str(bits), str(block)]
        wall, peak, err = _measure(cmd, timeout)
        r = Run(m, out if not err else None, wall, peak, _files_size(out) if not err else 0, err)
        runs.append(r)
        print(f"  {m:14s} " + (f"{wall:7.1f} s  peak {peak / 2**30:6.2f} GiB  out {r.size / 2**20:8.1f} MiB"
                               if not err else f"not run: {err}"), flush=True)
    return runs


def _session(path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency(runs: list[Run], feeds_by_batch: dict[int, dict], threads_list, repeat: int) -> None:
    """Median wall time of one run per (batch, threads), models interleaved run by run."""
    live = [r for r in runs if r.path is not None]
    for threads in threads_list:
        sessions = [(r, _session(r.path, threads)) for r in live]
        for batch, feeds in feeds_by_batch.items():
            for _, s in sessions:  # warm-up (allocations, pre-packing)
                s.run(None, feeds)
            times = {id(r): [] for r, _ in sessions}
            for _ in range(repeat):
                for r, s in sessions:
                    t = time.perf_counter()
                    s.run(None, feeds)
                    times[id(r)].append(time.perf_counter() - t)
            for r, _ in sessions:
                r.latency[(batch, threads)] = statistics.median(times[id(r)])
        del sessions


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def accuracy(runs: list[Run], samples: list[dict], embed) -> None:
    """Cosine against the float model (``runs[0]``) of ``embed(session, feed)`` per sample."""
    ref = _session(runs[0].path, 2)
    want = [embed(ref, f) for f in samples]
    del ref
    for r in runs:
        if r.path is None:
            continue
        s = _session(r.path, 2)
        cs = [_cos(embed(s, f), w) for f, w in zip(samples, want)]
        r.cos_min, r.cos_mean = min(cs), float(np.mean(cs))


def table(title: str, runs: list[Run], batches, threads_list) -> str:
    lat_cols = [(b, t) for b in batches for t in threads_list]
    head = ["method", "compile s", "peak RSS GiB", "output MiB"] + [f"b{b} t{t} ms" for b, t in lat_cols] + \
        ["cos min", "cos mean"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        if r.error and r.path is None and r.method != "fp32":
            lines.append(f"| {r.method} | not run: {r.error} |" + " |" * (len(head) - 2))
            continue
        cells = [r.method, "–" if r.method == "fp32" else f"{r.wall:.1f}",
                 "–" if r.method == "fp32" else f"{r.peak / 2**30:.2f}", f"{r.size / 2**20:.1f}"]
        cells += [f"{r.latency[k] * 1e3:.1f}" if k in r.latency else "–" for k in lat_cols]
        cells += [f"{r.cos_min:.5f}", f"{r.cos_mean:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _llm_module():
    spec = importlib.util.spec_from_file_location("make_llm", ROOT / "bench" / "make_llm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


LLM_SIZES = {"small": dict(hidden=512, layers=8, heads=8, kv_heads=1, intermediate=1408),
             "medium": dict(hidden=2048, layers=4, vocab=32000),
             "tinyllama": {}}


def bench_llm(spec: str, work: Path, a) -> str:
    if spec in LLM_SIZES:
        mod = _llm_module()
        src = work / f"llm_{spec}.onnx"
        if not src.exists():
            print(f"generating {spec} LLM …", flush=True)
            mod.build(src, replace(mod.TINYLLAMA, **LLM_SIZES[spec]))
    else:
        src = Path(spec)
    import onnx

    header = onnx.load(str(src), load_external_data=False)
    vocab = header.graph.output[0].type.tensor_type.shape.dim[-1].dim_value or 32000
    opset = next((o.version for o in header.opset_import if o.domain in ("", "ai.onnx")), 21)
    print(f"{src}: {_files_size(src) / 2**30:.2f} GiB", flush=True)
    runs = [Run("fp32", src, size=_files_size(src))] + quantize_all(src, work, a.bits, a.block, a.methods, opset,
                                                                     a.timeout)
    rng = np.random.default_rng(0)
    feeds = {b: {"input_ids": rng.integers(0, vocab, (b, a.seq))} for b in a.batches}
    latency(runs, feeds, a.threads, a.repeat)
    samples = [{"input_ids": rng.integers(0, vocab, (1, 32))} for _ in range(a.samples)]
    accuracy(runs, samples, lambda s, f: s.run(None, f)[0])
    return table(f"{src.name} ({_files_size(src) / 2**30:.2f} GiB fp32), int{a.bits} block {a.block}, "
                 f"latency at seq {a.seq}", runs, a.batches, a.threads)


def bench_minilm(work: Path, a) -> str:
    sys.path.insert(0, str(ROOT / "examples"))
    import sentence_data

    from graft.ir import zoo

    import onnx

    src0 = zoo.minilm_onnx()
    src = work / "minilm.onnx"
    if not src.exists():  # with external data, like the others (and in a folder graft may write beside)
        onnx.save_model(onnx.load(str(src0)), str(src), save_as_external_data=True, location="minilm.onnx.data")
    print(f"{src}: {_files_size(src) / 2**20:.1f} MiB", flush=True)
    runs = [Run("fp32", src, size=_files_size(src))] + quantize_all(src, work, a.bits, a.block, a.methods, 17,
                                                                     a.timeout)
    _, held = sentence_data.sentences()
    feeds = sentence_data.feeds(held)
    rng = np.random.default_rng(0)
    lat = {b: {"input_ids": rng.integers(1000, 2000, (b, 128)), "attention_mask": np.ones((b, 128), np.int64)}
           for b in a.batches}
    latency(runs, lat, a.threads, a.repeat)
    accuracy(runs, feeds, lambda s, f: sentence_data.mean_pool(s.run(None, f)[0], f["attention_mask"]))
    return table(f"all-MiniLM-L6-v2 (real weights), int{a.bits} block {a.block}: sentence-embedding cosine on "
                 f"{len(feeds)} held-out sentences; latency at seq 128", runs, a.batches, a.threads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm", action="append", default=None,
                    help="small (~220 MB), medium (~1 GB), tinyllama (4.4 GB) or an .onnx path (repeatable; "
                         "default: small)")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=["graft dq", "graft nbits", "graft nbits a4", "ort rtn",
                                                      "ort hqq", "ort gptq"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seq", type=int, default=1, help="LLM latency sequence length (1: one decode-like step)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--samples", type=int, default=8, help="LLM accuracy samples (random ids, batch 1, seq 32)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--work", help="folder for models and outputs (default: a temporary one, removed after)")
    ap.add_argument("--json", help="also write the raw numbers here")
    a = ap.parse_args(argv)
    tmp = None
    if a.work:
        work = Path(a.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="graft-bench-wo-")
        work = Path(tmp.name)
    out = []
    try:
        for spec in a.llm or ["small"]:
            out.append(bench_llm(spec, work, a))
        if not a.no_minilm:
            out.append(bench_minilm(work, a))
    finally:
        load = os.getloadavg()
        print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
              f"python {sys.version.split()[0]}", flush=True)
        for t in out:
            print("\n" + t)
        if a.json:
            Path(a.json).write_text(json.dumps({"tables": out, "load": load}, indent=1))
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
