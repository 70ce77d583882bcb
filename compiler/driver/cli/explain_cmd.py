"""``graft explain RULE MODEL``: where a rule matches in a model, and why it does not elsewhere."""
from __future__ import annotations

import difflib

import click

from graft.compiler.driver.cli._errors import fail
from graft.compiler.driver.cli._model_path import console, resolve_model_arg


def find_rule(name: str, rules_file: str | None):
    """The rule called ``name``: from ``rules_file`` when given, else (or failing that) built in.

    A rule file that cannot be loaded, or no such rule, ends the process with a one-line
    error (:func:`fail`) listing the close names and the rules the file defines.
    """
    from graft.compiler.driver.user_rules import UserRuleFileError, load_rule_file

    file_rules = []
    if rules_file is not None:
        try:
            file_rules = load_rule_file(rules_file)
        except UserRuleFileError as e:
            fail(str(e))
        for r in file_rules:
            if r.name == name:
                return r
    from graft import rules

    try:
        return rules.get(name)
    except KeyError as e:
        if rules_file is None:
            fail(e.args[0])
        known = [r.name for r in file_rules]
        close = difflib.get_close_matches(name, known + [r.name for r in rules.all_rules()], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        fail(f"no rule named {name!r} in {rules_file} (it defines {', '.join(known)}) "
             f"nor among the built-in rules{hint}")


def _pattern_text(pn) -> str:
    """``BatchNormalization(Conv(x, w, b?), gamma, beta, mean, var)``."""
    from graft.compiler.engine.pattern import Optional, PatternNode, PatternOutput, Var

    def arg(a) -> str:
        if isinstance(a, Optional):
            return arg(a.inner) + "?"
        if isinstance(a, PatternOutput):
            return f"{node(a.node)}[{a.index}]"
        if isinstance(a, PatternNode):
            return node(a)
        if isinstance(a, Var):
            return a.name
        return repr(a)

    def node(p) -> str:
        head = "any_op" if p.is_wildcard else (f"{p.domain}::{p.op_type}" if p.domain else p.op_type)
        attrs = [f"{k}={v.name if hasattr(v, 'name') else ('<predicate>' if callable(v) else v)}"
                 for k, v in p.attrs.items()]
        return f"{head}({', '.join([arg(a) for a in p.inputs] + attrs)})"

    return node(pn)


def _node_text(n) -> str:
    if n is None:
        return "-"
    return f"{n.op_type} {n.name!r}" if n.name else f"{n.op_type} (output {n.outputs[0].name!r})"


def _bound_text(m) -> str:
    from graft.compiler.engine.pattern import Var

    parts = []
    for k, v in m.bindings.items():
        if isinstance(k, Var):
            parts.append(f"{k.name}={'-' if v is None else v.name}")
        elif isinstance(k, str) and k.startswith("attr:"):
            parts.append(f"{k[5:]}={v!r}")
    return ", ".join(parts)


def _named_nodes(m) -> str:
    """``bn=BatchNormalization@0`` per named pattern node (its op is in the pattern shown above)."""
    from graft.ir import Node

    def short(n):
        return n.name or f"(output {n.outputs[0].name!r})"

    named = [f"{k}={short(v)}" for k, v in m.bindings.items() if isinstance(k, str) and isinstance(v, Node)]
    return "\n".join(named) or "\n".join(_node_text(n) for n in m.nodes)


@click.command("explain")
@click.argument("rule_name", metavar="RULE")
@click.argument("model", metavar="MODEL")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False),
              help="Python file defining graft.compiler.Rule objects (module level or in RULES).")
@click.option("--max", "max_items", default=10, show_default=True, type=click.IntRange(min=1),
              help="Rows shown per section (matches, misses).")
def explain_cmd(rule_name: str, model: str, rules_file: str | None, max_items: int) -> None:
    """Show where RULE would fire in MODEL, and the nearest misses where it would not.

    RULE is a built-in rule name (see `graft rules`) or one defined in --rules FILE.
    MODEL is an .onnx file or a zoo name (ppocr-det, ppocr-rec, ppocr-cls, minilm).
    Each miss gives the reason and the node concerned, nearest (most of the
    pattern matched) first.
    """
    from rich import box
    from rich.table import Table

    from graft import ir
    from graft.compiler.engine.rewriter import explain

    rule = find_rule(rule_name, rules_file)
    path = resolve_model_arg(model)
    try:
        graph = ir.load(path, fold_initializer_inputs=None)  # as `graft compile` reads an IR < 4 model
    except ir.ModelLoadError as e:
        if "topologically sorted" in str(e):  # say "cycle" when it is one, as `graft compile` does
            from graft.compiler.driver.api import check_file

            try:
                check_file(path)
            except ir.ModelLoadError as e2:
                fail(str(e2))
        fail(str(e))
    try:
        hits, misses = explain(graph, rule)
    except Exception as e:  # a user rule's check may raise anything: name the rule, not a traceback
        from graft.compiler.driver.user_rules import user_frame

        where = user_frame(e)
        at = f" (at {where})" if where else ""
        fail(f"rule {rule.name!r} ({rule.where}): its pattern predicate or check raised {type(e).__name__}: {e}{at}")

    size = sum(len(list(r.walk())) for r in rule.roots)
    root = rule.roots[0]
    out = console()
    out.print(f"rule {rule.name}  ({rule.where})")
    if rule.doc:
        out.print(f"  {rule.doc}")
    out.print(f"  pattern: {', '.join(_pattern_text(r) for r in rule.roots)}")
    tried = "nodes" if root.is_wildcard else f"{root.op_type} nodes"
    out.print(f"model {model}: {len(hits) + len(misses)} {tried} tried; "
                  f"{len(hits)} match, {len(misses)} miss\n")

    def table(title: str, *cols: str) -> Table:
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for c in cols:
            t.add_column(c, overflow="fold")
        return t

    if hits:
        t = table(f"matches ({len(hits)})", "#", "matched nodes", "bound values")
        for i, m in enumerate(hits[:max_items], 1):
            t.add_row(str(i), _named_nodes(m), _bound_text(m))
        if len(hits) > max_items:
            t.caption, t.caption_justify = f"… and {len(hits) - max_items} more", "left"
        out.print(t)
    if misses:
        if hits:
            out.print()
        t = table(f"nearest misses ({len(misses)})", "#", "root", "got to", "reason", "at node")
        for i, (node, miss) in enumerate(misses[:max_items], 1):
            got = f"{size}/{size}, refused" if miss.depth > size else f"{miss.depth}/{size} pattern nodes"
            t.add_row(str(i), _node_text(node), got, miss.reason, _node_text(miss.node))
        if len(misses) > max_items:
            t.caption, t.caption_justify = f"… and {len(misses) - max_items} more", "left"
        out.print(t)
    if not hits and not misses:
        out.print(f"no {tried} in the model: the rule has nowhere to start")
