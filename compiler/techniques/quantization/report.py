"""The accuracy report every quantized compile ends with.

Per output (float model vs quantized model, same feeds, held-out when given):
- max abs error;
- max relative error, per sample: max |q - f| / max |f| (relative to the output's own
  magnitude; an elementwise ratio is meaningless for outputs that cross zero);
- cosine similarity of the flattened output, per sample: the minimum and the mean.

Per layer: SQNR = 10 log10(Σ f² / Σ (q - f)²) in dB of each quantized layer's output in the
quantized model against the float model (errors accumulate down the graph), and the SQNR of
the noise the layer itself *added*: with relative noise powers n = 10^(-SQNR/10) of its output
and n_in of its activation input, added SQNR = -10 log10(n - n_in) (noise powers of independent
errors add; Lin et al. 2016, "Fixed Point Quantization of Deep Convolutional Networks", §3.2).
Sorting by the added SQNR, lowest first, points at the layers that hurt the most —
candidates to keep in float.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graft import ir


@dataclass
class OutputError:
    """Error of one output over the evaluation feeds (see module docstring for definitions)."""

    name: str
    max_abs: float
    max_rel: float
    min_cosine: float
    mean_cosine: float


@dataclass
class LayerError:
    """One quantized layer: its output's SQNR (dB) and its activation input's (inf when exact)."""

    node: str
    op_type: str
    tensor: str
    sqnr_db: float
    input_sqnr_db: float

    @property
    def added_sqnr_db(self) -> float:
        """SQNR (dB) of the noise this layer added on top of its input's (inf: none)."""
        n_out = 10.0 ** (-self.sqnr_db / 10.0) if np.isfinite(self.sqnr_db) else (0.0 if self.sqnr_db > 0 else np.inf)
        n_in = 10.0 ** (-self.input_sqnr_db / 10.0) if np.isfinite(self.input_sqnr_db) else \
            (0.0 if self.input_sqnr_db > 0 else np.inf)
        added = n_out - n_in
        if not np.isfinite(added):
            return float("-inf")
        if added <= 0:
            return float("inf")
        return -10.0 * float(np.log10(added))


@dataclass
class AccuracyReport:
    """Per-output and per-layer errors of a quantized model against its float model.

    Attributes:
        samples: feeds evaluated; source: where they came from; held_out: they were not used
        to calibrate; synthetic: they are random (smoke test only).
    """

    outputs: list[OutputError] = field(default_factory=list)
    layers: list[LayerError] = field(default_factory=list)
    samples: int = 0
    source: str = ""
    held_out: bool = False
    synthetic: bool = False

    @property
    def min_cosine(self) -> float:
        return min((o.min_cosine for o in self.outputs), default=1.0)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def worst_layers(self, k: int = 5) -> list[LayerError]:
        """The ``k`` layers that added the most noise (lowest added SQNR, then lowest SQNR)."""
        return sorted(self.layers, key=lambda l: (l.added_sqnr_db, l.sqnr_db))[:k]

    def render(self, top: int = 8, width: int = 110) -> str:
        """The report as text (rich tables)."""
        from rich.console import Console
        from rich.table import Table

        console = Console(width=width, record=True, file=NullWriter(), color_system=None)
        kind = "held-out" if self.held_out else "calibration (not held out)"
        if self.synthetic:
            kind += "; RANDOM data: a smoke test, not an accuracy measurement"
        console.print(f"accuracy vs float on {self.samples} {kind} sample(s) from {self.source}")
        t = Table(show_edge=False)
        for c in ("output", "max abs", "max rel", "min cosine", "mean cosine"):
            t.add_column(c, justify="left" if c == "output" else "right")
        for o in self.outputs:
            t.add_row(o.name, f"{o.max_abs:.4g}", f"{o.max_rel:.4g}", f"{o.min_cosine:.5f}", f"{o.mean_cosine:.5f}")
        console.print(t)
        if self.layers:
            lt = Table(title=f"layers losing the most (of {len(self.layers)} quantized)", show_edge=False)
            for c in ("node", "op", "SQNR dB", "added-noise SQNR dB"):
                lt.add_column(c, justify="left" if c in ("node", "op") else "right")
            for l in self.worst_layers(top):
                lt.add_row(l.node, l.op_type, f"{l.sqnr_db:.1f}", f"{l.added_sqnr_db:.1f}")
            console.print(lt)
        return console.export_text()


class NullWriter:
    """A file that discards what is written (a rich Console that only records)."""

    def write(self, *_):
        return 0

    def flush(self):
        pass


def _sqnr_parts(f: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    f = np.asarray(f, np.float64)
    q = np.asarray(q, np.float64)
    ok = np.isfinite(f) & np.isfinite(q)
    return float(np.sum(f[ok] ** 2)), float(np.sum((f[ok] - q[ok]) ** 2))


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def accuracy_report(float_model: ir.Model, quant_model: ir.Model, feeds: list[dict], *, layers=(),
                    source: str = "", held_out: bool = False, synthetic: bool = False,
                    threads: int = 0) -> AccuracyReport:
    """Compare ``quant_model`` with ``float_model`` on ``feeds``.

    Args:
        layers: (node name, op type, output tensor, input tensor or None) of the quantized layers;
            tensors are looked up by name in both models.
        threads: onnxruntime intra-op threads (0: default).
    """
    from graft.compiler.techniques.calibration.ort_runner import instrumented_proto, run_feeds

    out_names = [v.name for v in float_model.graph.outputs]
    want = []
    for _, _, t, tin in layers:
        want.append(t)
        if tin:
            want.append(tin)
    fproto, f_exposed = instrumented_proto(float_model, [*out_names, *want])
    qproto, q_exposed = instrumented_proto(quant_model, [*out_names, *want])
    common = [n for n in f_exposed if n in set(q_exposed)]
    f_runs = run_feeds(fproto, feeds, common, threads)
    q_runs = run_feeds(qproto, feeds, common, threads)
    idx = {n: i for i, n in enumerate(common)}
    report = AccuracyReport(samples=len(feeds), source=source, held_out=held_out, synthetic=synthetic)
    for name in out_names:
        if name not in idx:
            continue
        i = idx[name]
        max_abs = max_rel = 0.0
        coss = []
        for fr, qr in zip(f_runs, q_runs):
            f = np.asarray(fr[i], np.float64).ravel()
            q = np.asarray(qr[i], np.float64).ravel()
            ok = np.isfinite(f) & np.isfinite(q)
            f, q = f[ok], q[ok]
            if f.size == 0:
                continue
            d = np.abs(f - q)
            max_abs = max(max_abs, float(d.max()))
            scale = float(np.abs(f).max())
            max_rel = max(max_rel, float(d.max()) / scale if scale > 0 else (0.0 if d.max() == 0 else np.inf))
            nf, nq = np.linalg.norm(f), np.linalg.norm(q)
            coss.append(1.0 if nf == 0 and nq == 0 else float(f @ q / max(nf * nq, 1e-300)))
        report.outputs.append(OutputError(name, max_abs, max_rel, min(coss, default=1.0),
                                          float(np.mean(coss)) if coss else 1.0))

    def sqnr(name):
        if name is None or name not in idx:
            return float("inf")
        i = idx[name]
        s = n = 0.0
        for fr, qr in zip(f_runs, q_runs):
            a, b = _sqnr_parts(fr[i], qr[i])
            s += a
            n += b
        return _db(s, n)

    for node, op_type, t, tin in layers:
        if t not in idx:
            continue
        report.layers.append(LayerError(node, op_type, t, sqnr(t), sqnr(tin)))
    return report
