"""The pruning report: groups (requested vs actual), parameters and MACs per layer, output deviation.

Shown in the compile summary (:func:`renderables`), as JSON (:meth:`PruneReport.to_json`),
and, for any two ONNX models, as the per-layer section of ``graft diff``
(:func:`layer_diff`, :func:`layer_diff_renderables`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rich import box
from rich.table import Table
from rich.text import Text

from graft.compiler.techniques.pruning.macs import LayerCost


@dataclass
class GroupRow:
    """One channel group: what was asked, what was removed, and why it differs."""

    name: str
    kind: str
    size: int
    block: int
    removed: int
    requested: float
    blocked: int
    exact_removed: int
    note: str = ""
    module: str = ""

    @property
    def label(self) -> str:
        """The torch module path when known, else the source node's name."""
        return self.module or self.name

    @property
    def kept(self) -> int:
        return self.size - self.removed

    @property
    def actual(self) -> float:
        return self.removed / self.size if self.size else 0.0


@dataclass
class PruneReport:
    """What a pruning run did.

    Attributes:
        criterion, scope, ratio, round_to, zero_only: the request.
        groups: every channel group found (unprunable ones with their reason in ``note``).
        before, after: per-layer :class:`LayerCost` (matched by node name).
        params_before, params_after: parameter elements of the whole model.
        deviation: output agreement of the pruned model with the original (filled when checked).
        config_updates: model-config fields the new shapes imply when uniform across layers
            (``num_attention_heads``, ``intermediate_size``, ``hidden_size`` for transformers).
        input_shapes: the input sizes MACs were counted at.
        notes: what the caller should know beyond the numbers (a config that cannot describe the
            pruned shapes).
    """

    criterion: str
    scope: str
    ratio: float
    round_to: int
    zero_only: bool
    groups: list[GroupRow]
    before: list[LayerCost]
    after: list[LayerCost]
    params_before: int
    params_after: int
    input_shapes: dict = field(default_factory=dict)
    deviation: list = field(default_factory=list)
    config_updates: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def macs_before(self) -> int:
        return sum(r.macs for r in self.before)

    @property
    def macs_after(self) -> int:
        return sum(r.macs for r in self.after)

    @property
    def pruned_groups(self) -> list[GroupRow]:
        return [g for g in self.groups if g.removed]

    def layers(self) -> list[dict]:
        """Per-layer rows ``{"name", "op", "params": [before, after], "macs": [before, after]}``."""
        return _join_layers(self.before, self.after)

    def to_json(self) -> dict:
        return {
            "request": {"criterion": self.criterion, "scope": self.scope, "ratio": self.ratio,
                        "round_to": self.round_to, "zero_only": self.zero_only},
            "inputs": {k: list(v) for k, v in self.input_shapes.items()},
            "total": {"params": [self.params_before, self.params_after],
                      "macs": [self.macs_before, self.macs_after]},
            "groups": [{"name": g.name, "kind": g.kind, "size": g.size, "block": g.block, "removed": g.removed,
                        "kept": g.kept, "requested": g.requested, "actual": round(g.actual, 6),
                        "blocked": g.blocked, "exact_removed": g.exact_removed, "note": g.note,
                        "module": g.module}
                       for g in self.groups],
            "layers": self.layers(),
            "deviation": [{"output": o.name, "max_abs": o.max_abs, "max_rel": o.max_rel, "cosine": o.cosine}
                          for o in self.deviation],
            "config_updates": self.config_updates,
            "notes": list(self.notes),
        }


def _join_layers(before: list[LayerCost], after: list[LayerCost]) -> list[dict]:
    b = {r.name: r for r in before}
    a = {r.name: r for r in after}
    rows = []
    for name in list(dict.fromkeys([*b, *a])):
        rb, ra = b.get(name), a.get(name)
        rows.append({"name": name, "op": (rb or ra).op,
                     "params": [rb.params if rb else 0, ra.params if ra else 0],
                     "macs": [rb.macs if rb else 0, ra.macs if ra else 0]})
    return rows


def _n(x: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def _pct(a: int, b: int) -> str:
    return f"{(b - a) / a:+.1%}" if a else ""


def renderables(report: PruneReport, max_rows: int = 12) -> list:
    """Rich renderables: totals, groups pruned (requested vs actual), parameters and MACs of the layers that
    changed most (before → after), the output deviation and any notes."""
    parts = []
    head = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="pruning", title_justify="left")
    for col, just in (("", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        head.add_column(col, justify=just)
    head.add_row("parameters", f"{report.params_before:,}", f"{report.params_after:,}",
                 _pct(report.params_before, report.params_after))
    head.add_row("MACs", _n(report.macs_before), _n(report.macs_after), _pct(report.macs_before, report.macs_after))
    parts.append(head)
    req = "zero channels only" if report.zero_only else \
        f"ratio {report.ratio:g} ({report.scope}), criterion {report.criterion}" + \
        (f", round to {report.round_to}" if report.round_to > 1 else "")
    parts.append(Text(f"request: {req}; MACs at inputs " +
                      ", ".join(f"{k}{list(v)}" for k, v in report.input_shapes.items()), style="dim"))
    groups = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col, just in (("group", "left"), ("kind", "left"), ("kept/size", "right"), ("requested", "right"),
                      ("actual", "right"), ("note", "left")):
        groups.add_column(col, justify=just)
    shown = [g for g in report.groups if g.removed or g.note]
    for g in shown[:max_rows]:
        groups.add_row(g.label, g.kind, f"{g.kept}/{g.size}", f"{g.requested:.0%}", f"{g.actual:.1%}",
                       Text(g.note[:70], style="dim"))
    if len(shown) > max_rows:
        groups.add_row(Text(f"... {len(shown) - max_rows} more", style="dim"), "", "", "", "", "")
    parts.append(groups)
    parts.extend(_layer_table(report.layers(), max_rows))
    unprunable = [g for g in report.groups if g.blocked == g.size]
    if unprunable:
        parts.append(Text(f"{len(unprunable)} group(s) cannot be pruned, e.g. {unprunable[0].label}: "
                          f"{unprunable[0].note}", style="yellow"))
    if report.deviation:
        worst = max(report.deviation, key=lambda o: o.max_abs)
        parts.append(Text(f"output deviation: max abs {worst.max_abs:.3g}, cosine {worst.cosine:.6f} "
                          f"({worst.name})", style="cyan"))
    if report.config_updates:
        parts.append(Text("config: " + ", ".join(f"{k}={v}" for k, v in report.config_updates.items())))
    for note in report.notes:
        parts.append(Text(note, style="yellow"))
    return parts


def _layer_table(layers: list[dict], max_rows: int) -> list:
    """Parameters and MACs per compute layer, before → after: the layers that changed, largest MAC cut first
    (every layer, normalizations included, is in :meth:`PruneReport.layers`)."""
    changed = [r for r in layers if r["macs"][0] and (r["params"][0] != r["params"][1] or
                                                       r["macs"][0] != r["macs"][1])]
    if not changed:
        return []
    changed.sort(key=lambda r: (r["macs"][1] - r["macs"][0], r["params"][1] - r["params"][0]))
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="params / MACs per layer",
              title_justify="left")
    for col, just in (("layer", "left"), ("op", "left"), ("params", "right"), ("", "right"), ("MACs", "right"),
                      (" ", "right")):
        t.add_column(col, justify=just)
    for r in changed[:max_rows]:
        t.add_row(r["name"], r["op"], f"{r['params'][0]:,} → {r['params'][1]:,}", _pct(*r["params"]),
                  f"{_n(r['macs'][0])} → {_n(r['macs'][1])}", _pct(*r["macs"]))
    if len(changed) > max_rows:
        t.add_row(Text(f"... {len(changed) - max_rows} more", style="dim"), "", "", "", "", "")
    return [t]


# --------------------------------------------------------------------------- graft diff section
def layer_diff(a, b, dim_sizes: dict | None = None) -> dict:
    """Parameters and MACs per compute layer (Conv, ConvTranspose, Gemm, MatMul) of two ONNX models.

    Layers are paired in graph order when both models have as many compute layers (rewrites such as
    BatchNormalization folding rename nodes but keep their order), else by node name.

    Args:
        a, b: ``onnx.ModelProto`` or paths.

    Returns:
        ``{"total": {"params": [a, b], "macs": [a, b]}, "layers": [{"name", "op", "params": [a, b],
        "macs": [a, b]}] (only layers that differ), "inputs": {input: shape}}``, or ``{"error": str}``
        when shapes cannot be inferred.
    """
    from graft import ir
    from graft.compiler.techniques.pruning.macs import layer_costs, total_params
    from graft.compiler.techniques.pruning.shapes import input_sizes

    try:
        ma, mb = (ir.load(p, check=False) if isinstance(p, str) else ir.from_onnx(p) for p in (a, b))
        ca, cb = layer_costs(ma, dim_sizes=dim_sizes), layer_costs(mb, dim_sizes=dim_sizes)
        inputs = {k: list(v) for k, v in input_sizes(ma, dim_sizes).items()}
    except Exception as e:  # noqa: BLE001 - shape inference failures of arbitrary models: report, not crash
        return {"error": f"{type(e).__name__}: {e}"}
    compute = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    la = [r for r in ca if r.op in compute]
    lb = [r for r in cb if r.op in compute]
    if len(la) == len(lb):
        rows = [{"name": x.name if x.name == y.name else f"{x.name} → {y.name}", "op": y.op,
                 "params": [x.params, y.params], "macs": [x.macs, y.macs]} for x, y in zip(la, lb)]
    else:
        rows = _join_layers(la, lb)
    rows = [r for r in rows if r["params"][0] != r["params"][1] or r["macs"][0] != r["macs"][1]]
    return {"total": {"params": [total_params(ma), total_params(mb)],
                      "macs": [sum(r.macs for r in ca), sum(r.macs for r in cb)]},
            "layers": rows, "inputs": inputs}


def layer_diff_renderables(data: dict, max_rows: int = 10) -> list:
    """The ``graft diff`` section for :func:`layer_diff`'s result."""
    if not data:
        return []
    if "error" in data:
        return [Text(f"params/MACs per layer: not available ({data['error'][:120]})", style="dim")]
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="params / MACs per layer",
              title_justify="left")
    for col, just in (("layer", "left"), ("op", "left"), ("params A", "right"), ("params B", "right"),
                      ("MACs A", "right"), ("MACs B", "right")):
        t.add_column(col, justify=just)
    tot = data["total"]
    t.add_row(Text("total", style="bold"), "", f"{tot['params'][0]:,}", f"{tot['params'][1]:,}",
              _n(tot["macs"][0]), _n(tot["macs"][1]))
    for r in data["layers"][:max_rows]:
        t.add_row(r["name"], r["op"], f"{r['params'][0]:,}", f"{r['params'][1]:,}", _n(r["macs"][0]),
                  _n(r["macs"][1]))
    if len(data["layers"]) > max_rows:
        t.add_row(Text(f"... {len(data['layers']) - max_rows} more changed layers", style="dim"), "", "", "", "", "")
    return [t, Text("MACs at inputs " + ", ".join(f"{k}{v}" for k, v in data["inputs"].items()), style="dim")]
