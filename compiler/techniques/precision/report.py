"""The precision report: what the conversion did, and how far the outputs moved."""
from __future__ import annotations

from dataclasses import dataclass, field

from graft.ir.dtypes import DataType
from graft.rules.precision import limits


@dataclass
class OutputError:
    """Agreement of one output with float32 over the feeds: worst max abs / max rel error, lowest cosine,
    and values non-finite in the converted model where float32's are finite."""

    name: str
    max_abs: float
    max_rel: float
    cosine: float
    nonfinite: int


@dataclass
class PrecisionReport:
    """What the conversion did (see :meth:`render`).

    Attributes:
        target: ``float16`` or ``bfloat16``; keep_io_types: graph inputs/outputs stayed float32.
        data: where the measured ranges come from; synthetic: generated inputs, not real data.
        converted: float nodes converted; kept: [(node, op type, graph, reason)] of the others.
        casts: Casts at precision boundaries in the output.
        bytes_before, bytes_after: bytes of constant data.
        saturated: constant name → its largest |x|, saturated to the type's largest finite value.
        denormals: constant name → (values now subnormal, values now 0, elements).
        fp32_nonfinite: graph output → inf/NaN values the float32 model itself gave on the data.
        accuracy: per output, against float32 on the data (None when not measured); backend: what ran it.
        rounds: conversion rounds (one more per overflow traced back).
        notes: anything else the user should know.
    """

    target: str
    keep_io_types: bool
    data: str
    synthetic: bool
    converted: int = 0
    kept: list = field(default_factory=list)
    casts: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    saturated: dict = field(default_factory=dict)
    denormals: dict = field(default_factory=dict)
    fp32_nonfinite: dict = field(default_factory=dict)
    accuracy: list[OutputError] | None = None
    backend: str = ""
    backend_name: str = ""
    rounds: int = 1
    samples: int = 0
    eval_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def reasons(self) -> dict[str, int]:
        """Reason (its kind, before any ``(``) → number of nodes kept for it."""
        out: dict[str, int] = {}
        for _, _, _, r in self.kept:
            k = r.split(" (")[0].split(" '")[0]
            out[k] = out.get(k, 0) + 1
        return out

    def render(self, max_rows: int = 12) -> str:
        total = self.converted + len(self.kept)
        io = "inputs/outputs kept float32" if self.keep_io_types else f"inputs/outputs in {self.target}"
        lines = [f"precision {self.target}: {self.converted} of {total} float nodes converted, {len(self.kept)} kept "
                 f"in float32; {self.casts} Cast(s) at precision boundaries; {io}"]
        if self.bytes_before:
            lines.append(f"  constant data: {self.bytes_before / 2**20:,.2f} MiB -> {self.bytes_after / 2**20:,.2f} MiB "
                         f"({self.bytes_after / self.bytes_before:.1%})")
        kind = "generated inputs, random, not representative data:" if self.synthetic else "calibration data"
        lines.append(f"  ranges measured in float32 on {kind} {self.data}, {self.samples} sample(s)")
        if self.kept:
            lines.append("  kept in float32: " + ", ".join(f"{k} ×{n}" for k, n in self.reasons().items()))
            for node, op, graph, reason in self.kept[:max_rows]:
                where = "" if graph == "main" else f" [in {graph}]"
                lines.append(f"    {op} {node!r}{where}: {reason}")
            if len(self.kept) > max_rows:
                lines.append(f"    … and {len(self.kept) - max_rows} more")
        for name, big in self.saturated.items():
            lim = limits(DataType.FLOAT16 if self.target == "float16" else DataType.BFLOAT16).max
            lines.append(f"  constant {name!r} (max |x| = {big:.3g}) saturated to ±{lim:.6g}: the float32 outputs "
                         f"do not change when it is")
        if self.denormals:
            sub = sum(s for s, _, _ in self.denormals.values())
            zero = sum(z for _, z, _ in self.denormals.values())
            worst = max(self.denormals.items(), key=lambda kv: kv[1][0] + kv[1][1])
            lines.append(f"  denormal weights: {sub:,} value(s) in {len(self.denormals)} constant(s) become subnormal in "
                         f"{self.target}, {zero:,} become 0 (most: {worst[0]!r}, {worst[1][0] + worst[1][1]:,} of "
                         f"{worst[1][2]:,})")
        for name, n in self.fp32_nonfinite.items():
            lines.append(f"  float32 output {name!r} is already inf/NaN on the data ({n:,} values): a fault of the "
                         f"data or the model, not of the conversion")
        if self.accuracy is not None:
            lines.append(f"  accuracy vs float32 on {self.eval_samples} sample(s), run by {self.backend}:")
            for o in self.accuracy:
                bad = f", {o.nonfinite:,} newly non-finite" if o.nonfinite else ""
                lines.append(f"    {o.name}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}, cosine {o.cosine:.6f}{bad}")
        if self.rounds > 1:
            lines.append(f"  {self.rounds - 1} node(s) kept in float32 after their overflow was traced in a converted run")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


