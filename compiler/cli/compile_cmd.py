"""``graft compile IN -o OUT``: run a pipeline (and user rules), verify, write atomically, report."""
from __future__ import annotations

import os
from pathlib import Path

import click

from compiler.cli import main
from compiler.cli._errors import fail, parse_dims


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _input_path(arg: str) -> Path:
    from compiler import zoo

    path = Path(arg)
    if path.exists() or arg not in zoo.NAMES:
        if not path.exists():
            fail(f"{arg}: no such file (give an .onnx path or a zoo model: {', '.join(zoo.NAMES)})")
        return path
    try:
        return zoo.resolve(arg)
    except zoo.ZooError as e:
        fail(f"{arg}: {e}")


@main.command("compile")
@click.argument("model", metavar="IN")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the ONNX result.")
@click.option("--pipeline", default="optimize", show_default=True,
              help="Named pipeline (see `graft rules`); 'none' runs only --rules.")
@click.option("--rules", "rule_files", multiple=True, metavar="FILE",
              help="Python file of compiler.Rule objects (or a RULES list), run after the pipeline (repeatable).")
@click.option("--no-verify", is_flag=True,
              help="Skip the numeric comparison with the input model (structural checks still run).")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Largest absolute output difference accepted.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
              help="Size of a named symbolic input dim for verification (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="No summary, only errors.")
def compile_cmd(model: str, output: str, pipeline: str, rule_files: tuple[str, ...], no_verify: bool,
                atol: float, dims: tuple[str, ...], quiet: bool) -> None:
    """Compile IN (an .onnx file or a zoo name: ppocr-cls, ppocr-det, ppocr-rec, minilm) into OUT.

    Loads IN (onnx.checker), runs the pipeline and any --rules, checks the result
    (ir.verify, onnx.checker full_check) and, unless --no-verify, compares its
    outputs with IN's in onnxruntime on generated inputs. OUT is written
    atomically, and only if every step succeeded. Exit status 1 on any error,
    with one line on stderr (GRAFT_DEBUG=1 adds the traceback).
    """
    from compiler.api import CompileError, InvalidOutputError, NumericMismatchError, compile
    from compiler.passes import get_pipeline
    from compiler.rewriter import RuleError
    from compiler.rule import RuleDefinitionError
    from compiler.user_rules import UserRuleFileError, load_rule_files
    from ir import IRError, ModelLoadError

    dim_sizes = parse_dims(dims)
    src = _input_path(model)
    out = Path(output)
    if out.resolve() == src.resolve() or _same_file(out, src):
        fail(f"{output}: is the input model; refusing to overwrite it (choose another -o path)")
    try:
        get_pipeline(pipeline)
    except KeyError as e:
        fail(f"--pipeline {pipeline}: {e.args[0]} (`graft rules` lists them)")
    try:
        user_rules = load_rule_files(rule_files)
    except UserRuleFileError as e:
        fail(f"{e} (fix the rule file)")
    try:
        result = compile(model, pipeline=pipeline, rules=user_rules or None, verify=not no_verify,
                         atol=atol, dim_sizes=dim_sizes)
    except ModelLoadError as e:
        msg = str(e).rstrip()
        fail(msg if msg.endswith(")") else f"{msg} (give a complete, valid ONNX model)")
    except RuleDefinitionError as e:
        fail(f"{e} (rename or drop one of the rules)")
    except RuleError as e:
        fail(f"{model}: {e}; no output written (fix the rule, or leave it out)")
    except NumericMismatchError as e:
        if not quiet and e.result is not None:
            from compiler.report import render

            render(e.result)
        fail(f"{model}: {e} (no output written; fix the rule, or pass --no-verify to write it anyway)")
    except InvalidOutputError as e:
        fail(f"{model}: {e}")
    except (CompileError, IRError) as e:
        fail(f"{model}: {e}")
    except Exception as e:  # noqa: BLE001 — a graft bug: still one line, the traceback on request
        fail(f"{model}: internal error {type(e).__name__}: {e} (rerun with GRAFT_DEBUG=1 for the traceback "
             f"and report it)")
    try:
        result.save(out)
    except OSError as e:
        fail(f"{output}: cannot write ({e.strerror or e}); check the directory exists and is writable")
    if not quiet:
        from compiler.report import render

        render(result)
        click.echo(f"wrote {output}")
