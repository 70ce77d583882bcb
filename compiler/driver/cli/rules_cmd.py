"""``graft rules``: the built-in rules (name, root op, one-line doc) and the named pipelines."""
from __future__ import annotations

import click

from graft.compiler.driver.cli._errors import fail


def root_op(rule) -> str:
    """``Conv``, ``com.microsoft::FusedMatMul``, ``*`` (any op), or ``A+B`` for several roots."""
    parts = []
    for r in rule.roots:
        if r.is_wildcard:
            parts.append("*")
        else:
            parts.append(f"{r.domain}::{r.op_type}" if r.domain not in ("", "ai.onnx") else r.op_type)
    return "+".join(parts)


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    w0 = max((len(r[0]) for r in rows), default=0)
    w1 = max((len(r[1]) for r in rows), default=0)
    return [f"  {a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]


@click.command("rules")
@click.option("--rules", "rule_files", multiple=True, metavar="FILE",
              help="Also list the rules of a user rule file (repeatable).")
def rules_cmd(rule_files: tuple[str, ...]) -> None:
    """List built-in rules (name, root op, summary) and the named pipelines."""
    from graft import rules as builtin
    from graft.rules.pipelines import get_pipeline, pipeline_names
    from graft.compiler.driver.user_rules import UserRuleFileError, load_rule_file

    loaded = []
    for f in rule_files:  # every file loads before anything is printed: an error is the only output
        try:
            loaded.append((f, load_rule_file(f)))
        except UserRuleFileError as e:
            fail(f"{e} (fix the rule file)")
    click.echo("rules:")
    for line in _table([(r.name, root_op(r), r.doc) for r in builtin.all_rules()]):
        click.echo(line)
    for f, extra in loaded:
        click.echo(f"rules in {f}:")
        for line in _table([(r.name, root_op(r), r.doc) for r in extra]):
            click.echo(line)
    click.echo("pipelines:")
    for line in _table([(name, get_pipeline(name).describe(), "") for name in pipeline_names()]):
        click.echo(line)
