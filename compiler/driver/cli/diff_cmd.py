"""``graft diff A B``: what changed between two ONNX models, and which rule did it."""
from __future__ import annotations

import json

import click

from graft.compiler.driver.cli._errors import fail, parse_dims
from graft.compiler.driver.cli._model_path import console, load_proto_arg


@click.command("diff")
@click.argument("model_a", metavar="A")
@click.argument("model_b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Print the diff as JSON (schema graft.diff/1).")
@click.option("--check", is_flag=True,
              help="Also run both models in onnxruntime on the same generated inputs and compare outputs.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
              help="Size of a named symbolic input dim for --check (repeatable); other unknown dims get 2.")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated inputs for --check.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="With --check, exit 1 when an output differs by more than this (max abs).")
@click.option("--max", "max_items", default=10, show_default=True, type=click.IntRange(min=1),
              help="Nodes listed per section before the rest is counted.")
def diff_cmd(model_a: str, model_b: str, as_json: bool, check: bool, dims: tuple[str, ...], seed: int,
             atol: float, max_items: int) -> None:
    """Show what was removed, added and changed from model A to model B.

    A and B are .onnx files or zoo names (ppocr-det, ppocr-rec, ppocr-cls, minilm).
    Nodes are matched by name (unnamed ones by op type and output names). When B
    came from graft, added nodes are grouped by the rule that made them, with the
    A nodes each rule replaced. Exits 1 if a model cannot be read, or --check
    cannot run both models or finds an output that differs beyond --atol.
    """
    from graft.compiler.driver.diff import diff_models

    dim_sizes = parse_dims(dims)
    pa, pb = load_proto_arg(model_a), load_proto_arg(model_b)
    d = diff_models(pa, pb, check=check, seed=seed, dim_sizes=dim_sizes, names=(model_a, model_b), atol=atol)
    if as_json:
        click.echo(json.dumps(d.to_json(), indent=2, allow_nan=False))
    else:
        from rich.console import Group

        from graft.compiler.driver.diff_text import renderables

        console().print(Group(*renderables(d.to_json(), max_items=max_items)))
    chk = d.to_json()["check"]
    if chk is not None and chk["error"] and not chk["outputs"]:
        fail(f"--check could not run both models: {chk['error']}")
    bad = [o for o in (chk or {}).get("outputs", []) if not o["within_atol"]]
    if bad:
        o = bad[0]
        if o["problem"] == "shape":
            how = f"has shape {o['shape_b']} in B, {o['shape']} in A"
        elif o["problem"] == "nonfinite":
            how = "has NaN/inf in one model where the other is finite"
        else:
            how = f"differs by max abs {o['max_abs']:.3g} (atol {atol:g})"
        more = f" (and {len(bad) - 1} more output(s))" if len(bad) > 1 else ""
        fail(f"--check: output {o['output']!r} {how}{more}")
