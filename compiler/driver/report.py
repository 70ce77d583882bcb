"""The compile summary: rules fired, size before → after, output agreement, time.

Rendered with rich tables; :func:`render` prints to a console, :func:`render_text`
returns plain text (no colour codes) for logs and tests.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported where a summary is drawn: `graft compile -q` needs only warnings()
    from rich.console import Console, Group


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _delta(a: int, b: int) -> str:
    if a == 0:
        return ""
    return f"{(b - a) / a:+.1%}"


def _num(x: float) -> str:
    return f"{x:.3g}"


def build(result) -> Group:
    """The summary of a :class:`graft.compiler.driver.api.CompileResult` as rich renderables."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = []
    head = Text.assemble(("graft compile ", "bold"), f"{result.source}  ",
                         ("pipeline ", "dim"), f"{result.pipeline}  ",
                         ("target ", "dim"), f"{result.target}  ",
                         ("time ", "dim"), f"{result.timings.get('total', 0.0):.2f} s")
    parts.append(head)

    rules = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    rules.add_column("rule", no_wrap=True)
    rules.add_column("fired", justify="right")
    for name, n in sorted(result.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        rules.add_row(name, str(n))
    if not result.counts:
        rules.add_row(Text("(no rule fired)", style="dim"), "0")
    limited = [p for p, r in result.stop_reasons.items() if r.value != "saturated"]

    size = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col, just in (("", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        size.add_column(col, justify=just)
    b, a = result.before, result.after
    size.add_row("nodes", f"{b.nodes:,}", f"{a.nodes:,}", _delta(b.nodes, a.nodes))
    size.add_row("parameters", f"{b.parameters:,}", f"{a.parameters:,}", _delta(b.parameters, a.parameters))
    size.add_row("bytes", _bytes(b.bytes), _bytes(a.bytes), _delta(b.bytes, a.bytes))

    # stacked, not side by side: long rule names must never be truncated in a narrow terminal
    parts.append(rules)
    parts.append(size)
    if limited:
        parts.append(Text(f"iteration limit reached in: {', '.join(limited)} (the graph is valid but may "
                          f"not be fully rewritten)", style="yellow"))

    prune = getattr(result, "prune", None)
    if prune is not None:  # structured pruning: groups, params/MACs, deviation (compiler/pruning/report.py)
        from graft.compiler.techniques.pruning.report import renderables as pruning_renderables

        parts.extend(pruning_renderables(prune))
    for note in getattr(result, "notes", ()):
        parts.append(Text(f"note: {note}", style="yellow"))
    v = result.verification
    if v.outputs:
        outs = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for col in ("output", "max abs", "max rel", "cosine", ""):
            outs.add_column(col, justify="left" if col == "output" else "right")
        for o in v.outputs:
            ok = o.within(v.atol, v.rtol)
            outs.add_row(o.name, _num(o.max_abs), _num(o.max_rel), f"{o.cosine:.6f}",
                         Text("ok", style="green") if ok else Text("DIFFERS", style="bold red"))
        parts.append(outs)
    shapes = ", ".join(f"{k}{list(s)}" for k, s in v.inputs.items())
    if v.status == "passed":
        kind = "generated inputs" if v.generated else "the given inputs"
        parts.append(Text(f"verified: outputs agree within atol {v.atol:g} on {kind} {shapes}", style="green"))
    elif v.status == "failed" and prune is not None and not prune.zero_only:
        parts.append(Text(f"outputs differ from the input model's, as pruning channels with weights does "
                          f"(inputs {shapes}); fine-tune to recover accuracy", style="cyan"))
    elif v.status == "failed" and getattr(result, "precision", None) is not None:
        parts.append(Text(f"outputs differ from the input model's, as lower precision does (inputs {shapes}); "
                          f"the precision report below measures by how much", style="cyan"))
    elif v.status == "failed" and getattr(result, "quantization", None) is not None:
        below = "the accuracy report below" if result.quantization.report is not None else "the table above"
        parts.append(Text(f"outputs differ from the input model's, as quantization does (inputs {shapes}); "
                          f"{below} measures by how much", style="cyan"))
    elif v.status == "failed":
        parts.append(Text(f"verification FAILED (atol {v.atol:g}, inputs {shapes})", style="bold red"))
        if v.blame is not None:
            parts.append(Text(v.blame.describe(), style="red"))
    elif v.status == "skipped":
        parts.append(Text(f"verification skipped: {v.reason}", style="yellow"))
    else:
        parts.append(Text("numeric verification off", style="dim"))
    return Group(*parts)


def warnings(result) -> list[str]:
    """One-line warnings a quiet run (``graft compile -q``) still prints: the output was written
    but not verified, or a rewrite pass stopped at its iteration limit."""
    out = []
    limited = [name for name, r in result.stop_reasons.items() if r.value != "saturated"]
    if limited:
        out.append(f"iteration limit reached in {', '.join(limited)} (the graph is valid but may not be fully "
                   f"rewritten; a rule may undo another's rewrite)")
    if result.verification.status == "skipped":
        out.append(f"verification skipped: {' '.join(result.verification.reason.split())}")
    return out


def render(result, console: Console | None = None) -> None:
    """Print the summary to ``console`` (default: stdout)."""
    from rich.console import Console

    (console or Console()).print(build(result))


def render_text(result, width: int = 100) -> str:
    """The summary as plain text."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(build(result))
    return buf.getvalue()
