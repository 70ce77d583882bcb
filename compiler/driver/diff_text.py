"""Text rendering of a model diff (:mod:`graft.compiler.driver.diff`) with rich tables.

Short by design: op types whose count did not change, nodes a rule accounts
for, and kept nodes that only read a rule's new output are summarized as counts;
only what no rule explains is listed node by node (up to ``max_items`` each).
"""
from __future__ import annotations

import io

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text


def _n(x: int) -> str:
    return f"{x:,}"


def _d(x: int) -> str:
    return f"{x:+,}" if x else "0"


def _ops(counts: dict[str, int]) -> str:
    return "\n".join(f"{op}×{n}" for op, n in counts.items()) or "-"


def _with_inits(ops: dict[str, int], inits: list[str]) -> str:
    if not inits:
        return _ops(ops)
    text = f"{len(inits)} initializer{'s' if len(inits) > 1 else ''}"
    return f"{_ops(ops)}\n+ {text}" if ops else text


def _more(items: list[str], max_items: int) -> str:
    shown = ", ".join(items[:max_items])
    return shown + (f", … (+{len(items) - max_items} more)" if len(items) > max_items else "")


def _table(title: str, *columns: str, right: tuple[int, ...] = (), no_wrap: tuple[int, ...] = (0,)) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, c in enumerate(columns):
        # the first column names things (rules, ops, graphs): keep it whole
        t.add_column(c, justify="right" if i in right else "left", overflow="fold", no_wrap=i in no_wrap)
    return t


def renderables(data: dict, *, max_items: int = 10) -> list:
    """The report as rich renderables (what ``graft diff`` prints), a blank line between sections."""
    spaced: list = []
    for r in _sections(data, max_items):
        if spaced:
            spaced.append(Text(""))
        spaced.append(r)
    return spaced


def _sections(data: dict, max_items: int) -> list:
    a, b = data["a"], data["b"]
    out: list = [Text(f"A: {a['name']}\nB: {b['name']}")]
    summary = _table("", "", "A", "B", "Δ", right=(1, 2, 3))
    for key, label in (("nodes", "nodes"), ("parameters", "parameters"), ("bytes", "bytes"),
                       ("initializers", "initializers"), ("constant_nodes", "Constant nodes")):
        summary.add_row(label, _n(a[key]), _n(b[key]), _d(b[key] - a[key]))
    out.append(summary)
    if data["identical"]:
        out.append(Text("identical: no node, op count, graph input/output or initializer differs"))
        out.extend(_check(data))
        return out

    ops = [r for r in data["ops"] if r["delta"]]
    if ops:
        t = _table("op counts", "op", "A", "B", "Δ", right=(1, 2, 3))
        for r in sorted(ops, key=lambda r: (r["delta"], r["op"])):
            t.add_row(r["op"], _n(r["a"]), _n(r["b"]), _d(r["delta"]))
        same = len(data["ops"]) - len(ops)
        if same:
            t.caption, t.caption_justify = f"{same} op type(s) with the same count", "left"
        out.append(t)

    if data["rules"]:
        # op lists are one op per line: never break an op name
        t = _table("rules (graft provenance in B)", "rule", "rewrites", "created", "replaced", "dropped",
                   "rewired", right=(1, 5), no_wrap=(0, 2, 3, 4))
        for r in data["rules"]:
            t.add_row(r["rule"], _n(r["rewrites"]), _with_inits(r["created"], r["created_initializers"]),
                      _ops(r["replaced"]), _with_inits(r["dropped"], r["dropped_initializers"]), _n(r["rewired"]))
        out.append(t)
        lines = [f"{r['rule']} replaced: {_more(r['replaced_nodes'], max_items)}"
                 for r in data["rules"] if r["replaced_nodes"]]
        lines += [f"{r['rule']} also replaced nodes made earlier in the pipeline: "
                  f"{_more(r['intermediate'], max_items)}" for r in data["rules"] if r["intermediate"]]
        if lines:
            out.append(Text("\n".join(lines)))

    out.extend(_nodes(data["nodes"], max_items))
    out.extend(_io(data["io"]))
    inits = data["initializers"]
    if any(inits.values()):
        out.append(Text(f"initializers: {len(inits['removed'])} removed, {len(inits['added'])} added, "
                        f"{len(inits['changed'])} changed"
                        + (f" ({_more(inits['changed'], max_items)})" if inits["changed"] else "")))
    if data.get("layers"):  # structured pruning: params / MACs per layer (compiler/pruning/report.py)
        from graft.compiler.techniques.pruning.report import layer_diff_renderables

        out.extend(layer_diff_renderables(data["layers"], max_rows=max_items))
    out.extend(_check(data))
    return out


def _nodes(nodes: dict, max_items: int) -> list:
    removed, added, changed = nodes["removed"], nodes["added"], nodes["changed"]
    by_rule_removed = sum(1 for n in removed if n["rule"])
    to_init = sum(1 for n in removed if n["how"] == "to_initializer")
    by_rule_added = sum(1 for n in added if n["rule"])
    rewired = sum(1 for c in changed if c["rewired_only"])
    moved = f", {to_init} Constant nodes now initializers" if to_init else ""
    out = [Text(f"nodes: {len(removed)} removed ({by_rule_removed} by rules{moved}), "
                f"{len(added)} added ({by_rule_added} by rules), "
                f"{len(changed)} changed ({rewired} only rewired to a rule's output), "
                f"{nodes['unchanged']} unchanged")]
    for title, items in (("removed (no rule)", [n for n in removed if not n["rule"] and not n["how"]]),
                         ("added (no provenance)", [n for n in added if not n["rule"]])):
        if not items:
            continue
        t = _table(title, "graph", "node", "op", "outputs")
        for n in items[:max_items]:
            t.add_row(n["graph"], n["name"], n["op"], ", ".join(n["outputs"]))
        if len(items) > max_items:
            t.caption, t.caption_justify = f"… and {len(items) - max_items} more", "left"
        out.append(t)
    other = [c for c in changed if not c["rewired_only"]]
    if other:
        t = _table("changed", "graph", "node", "op", "what changed")
        for c in other[:max_items]:
            what = []
            if "op_b" in c:
                what.append(f"op {c['op']} → {c['op_b']}")
            what += [f"input {i['index']}: {i['a']} → {i['b']}" for i in c["inputs"] if not i["rewired"]]
            what += [f"{x['name']}: {x['a']} → {x['b']}" for x in c["attributes"]]
            t.add_row(c["graph"], c["name"], c["op"], "\n".join(what))
        if len(other) > max_items:
            t.caption, t.caption_justify = f"… and {len(other) - max_items} more", "left"
        out.append(t)
    return out


def _io(io_: dict) -> list:
    rows = []
    for kind in ("inputs", "outputs"):
        d = io_[kind]
        rows += [(kind[:-1], n, "removed", "") for n in d["removed"]]
        rows += [(kind[:-1], n, "added", "") for n in d["added"]]
        rows += [(kind[:-1], c["name"], "type", f"{c['a']} → {c['b']}") for c in d["changed"]]
    if not rows:
        return []
    t = _table("graph inputs/outputs", "", "name", "change", "type")
    for r in rows:
        t.add_row(*r)
    return [t]


def _check(data: dict) -> list:
    chk = data.get("check")
    if chk is None:
        return []
    out = []
    if chk["outputs"]:
        feeds = ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in chk.get("inputs", {}).items())
        head = Text(f"output agreement (onnxruntime; generated inputs {feeds})")
        t = _table("", "output", "shape", "max abs", "max rel", "cosine", "", right=(2, 3, 4))
        for o in chk["outputs"]:
            name = o["output"] if o["output_b"] in (None, o["output"]) else f"{o['output']} / {o['output_b']}"
            problem = o.get("problem")
            shape = str(o["shape"]) if problem != "shape" else f"{o['shape']} vs {o['shape_b']}"
            cos = "-" if o["cosine"] is None else f"{o['cosine']:.6f}"
            verdict = {"shape": "SHAPE DIFFERS", "nonfinite": "NaN/inf DIFFER"}.get(problem) or \
                ("ok" if o.get("within_atol", True) else f"DIFFERS (atol {chk['atol']:g})")
            t.add_row(name, shape, _g(o["max_abs"]), _g(o["max_rel"]), cos, verdict)
        out.append(Group(head, t))
    if chk["error"]:
        out.append(Text(f"check: {chk['error']}"))
    return out


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_text(data: dict, *, width: int = 120, max_items: int = 10) -> str:
    """The report as plain text (no colour), ``width`` characters wide."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False,
                      emoji=False, soft_wrap=False)
    console.print(Group(*renderables(data, max_items=max_items)))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
